"""PsyQA / JSONL question ingest (data_pipeline/sources/psyqa.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.sources.psyqa import load_psyqa, load_question_jsonl, load_questions, split_keywords
from tests.fixtures.paths import PSYQA_SAMPLE

# The PsyQA sample needs a user agreement, so it is never shipped: it is read from the shared data folder
# next to the repository.
PSYQA_SAMPLE = PSYQA_SAMPLE


def _need_sample() -> Path:
    if not PSYQA_SAMPLE.is_file():
        pytest.skip(f"PsyQA sample not found at {PSYQA_SAMPLE} (not shipped: it needs the PsyQA user agreement)")
    return PSYQA_SAMPLE


def test_psyqa_sample_all_questions_ingested():
    path = _need_sample()
    raw = json.loads(path.read_text(encoding="utf-8"))
    questions, rejects = load_psyqa(path)
    assert rejects == []
    assert len(questions) == len(raw) == 100
    ids = [q["id"] for q in questions]
    assert len(set(ids)) == 100
    assert ids == [f"psyqa-{e['questionID']}" for e in raw]
    for q, e in zip(questions, raw):
        assert set(q) == {"id", "question", "description", "keywords"}
        assert q["question"] == e["question"].strip()
        assert isinstance(q["keywords"], list) and q["keywords"]
        assert q["keywords"] == [k.strip() for k in e["keywords"].split(",") if k.strip()]
        assert all("," not in k for k in q["keywords"])
    # The first sample entry, checked by value.
    assert questions[0]["keywords"] == ["恋爱", "恋爱经营"]
    # load_questions detects the format from the file and gives the same result.
    assert load_questions(str(path)) == (questions, [])


def test_bad_psyqa_entries_are_rejected_with_reasons(tmp_path):
    entries = [
        {"question": "我总是很焦虑怎么办?", "description": "描述", "keywords": "情绪,焦虑", "questionID": 1},
        {"description": "没有问题字段", "keywords": "情绪", "questionID": 2},
        {"question": 123, "description": "", "keywords": "情绪", "questionID": 3},
        {"question": "为什么我睡不着?", "description": ["不是字符串"], "keywords": "", "questionID": 4},
        {"question": "为什么我睡不着?", "description": "", "keywords": 5, "questionID": 5},
        {"question": "为什么我睡不着?", "description": "", "keywords": "睡眠"},
        {"question": "How do I stop worrying?", "description": "", "keywords": "", "questionID": 7},
        {"question": "重复的编号?", "description": "", "keywords": "", "questionID": 1},
        "not an object",
        {"question": "   ", "description": "", "keywords": "", "questionID": 9},
        {"question": "没有描述也可以?", "description": None, "keywords": "成长,,自我成长, ", "questionID": "10"},
    ]
    path = tmp_path / "psyqa.json"
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    questions, rejects = load_psyqa(path)
    assert [q["id"] for q in questions] == ["psyqa-1", "psyqa-10"]
    assert questions[1] == {
        "id": "psyqa-10",
        "question": "没有描述也可以?",
        "description": "",
        "keywords": ["成长", "自我成长"],
    }
    reasons = {r["source"].rsplit("#", 1)[1]: r["reason"] for r in rejects}
    assert len(rejects) == 9 and all(r["stage"] == "input" for r in rejects)
    assert "missing 'question'" in reasons["1"]
    assert "'question' must be a string" in reasons["2"]
    assert "'description' must be a string" in reasons["3"]
    assert "keywords must be a string or a list" in reasons["4"]
    assert "missing or invalid id" in reasons["5"]
    assert "no Chinese" in reasons["6"]
    assert "duplicate id psyqa-1" in reasons["7"]
    assert "not a JSON object" in reasons["8"]
    assert "'question' is empty" in reasons["9"]


def test_psyqa_file_that_is_not_a_list_fails_with_one_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"question": "x"}', encoding="utf-8")
    with pytest.raises(ValueError, match="must be a list"):
        load_psyqa(path)
    path.write_text('[{"question": ', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid PsyQA JSON"):
        load_psyqa(path)


def test_jsonl_questions_and_schema_records(tmp_path):
    record = {
        "id": "synth-7",
        "question": "我害怕考试失败",
        "description": "每次考试前都睡不着",
        "keywords": ["学业", "焦虑"],
        "cbt": {"empathy": "一", "key_thought": "二", "challenge": "三", "strategy": "四", "encouragement": "五"},
        "answer": "一二三四五",
        "distortions": [],
        "source": "synth-template",
        "meta": {"crisis": False},
    }
    lines = [
        json.dumps(record, ensure_ascii=False),
        json.dumps(
            {"id": "q-2", "question": "和父母吵架了", "keywords": "家庭,沟通\uff0c父母\u3001冲突"}, ensure_ascii=False
        ),
        "{not json",
        json.dumps({"question": "没有编号"}, ensure_ascii=False),
        json.dumps({"id": "q-2", "question": "重复编号"}, ensure_ascii=False),
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    questions, rejects = load_question_jsonl(path)
    assert questions == [
        {
            "id": "synth-7",
            "question": "我害怕考试失败",
            "description": "每次考试前都睡不着",
            "keywords": ["学业", "焦虑"],
        },
        {"id": "q-2", "question": "和父母吵架了", "description": "", "keywords": ["家庭", "沟通", "父母", "冲突"]},
    ]
    assert [(r["source"].rsplit(":", 1)[1], r["reason"].split(" (")[0]) for r in rejects] == [
        ("3", "not valid JSON"),
        ("4", "missing or invalid id"),
        ("5", "duplicate id q-2"),
    ]


def test_load_questions_glob_rejects_ids_repeated_across_files(tmp_path):
    for name, ids in (("a.jsonl", ["x", "y"]), ("b.jsonl", ["y", "z"])):
        (tmp_path / name).write_text(
            "".join(json.dumps({"id": i, "question": f"问题{i}"}, ensure_ascii=False) + "\n" for i in ids),
            encoding="utf-8",
        )
    questions, rejects = load_questions(str(tmp_path / "*.jsonl"))
    assert [q["id"] for q in questions] == ["x", "y", "z"]
    assert len(rejects) == 1 and rejects[0]["id"] == "y" and "earlier input file" in rejects[0]["reason"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_questions(str(tmp_path / "nothing*.json"))


def test_split_keywords():
    assert split_keywords("a, b,,a") == ["a", "b"]
    assert split_keywords(["x", " y "]) == ["x", "y"]
    assert split_keywords(None) == []
    with pytest.raises(ValueError):
        split_keywords([1, 2])


def test_prepare_reads_psyqa_entries_through_the_same_parser(tmp_path):
    """prepare's `psyqa` format and the synth api ingest share parse_question: same checks, same details; only
    the ingest also asks for Chinese text (its prompt is Chinese)."""
    from cbt_llm.domain.record import RecordError
    from data_pipeline.sources.formats import to_examples

    ans = [{"answer_text": "先试着把担心写下来。"}]
    for entry, reason, detail in [
        ({"description": "", "questionID": 2, "answers": ans}, "missing_field", "missing 'question'"),
        (
            {"question": "为什么?", "keywords": 5, "questionID": 5, "answers": ans},
            "wrong_type",
            "keywords must be a string",
        ),
        ({"question": "为什么?", "answers": ans}, "missing_field", "missing or invalid id"),
    ]:
        with pytest.raises(RecordError, match=detail) as err:
            to_examples(entry, "psyqa", "system", "f:1")
        assert err.value.reason == reason
    (ex,) = to_examples(
        {"question": " 睡不着? ", "description": None, "keywords": "睡眠", "questionID": 7, "answers": ans},
        "psyqa",
        "system",
        "f:1",
    )
    assert ex.example_id == "psyqa-7-0" and ex.question == "睡不着?"
    english = {"question": "Why can't I sleep?", "questionID": 8, "answers": ans}
    assert to_examples(english, "psyqa", "system", "f:1")[0].example_id == "psyqa-8-0"
    path = tmp_path / "q.json"
    path.write_text(json.dumps([english]), encoding="utf-8")
    assert "no Chinese" in load_psyqa(path)[1][0]["reason"]
