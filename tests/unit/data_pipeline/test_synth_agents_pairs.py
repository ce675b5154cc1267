"""`synth api --agents` keeps every round's text and writes pairs.jsonl: the kept draft against each lower-scored
draft of the same question at least api.agents.pair_margin below it, against the fake server's critic_climb (totals
6, 11, 15, 18 as the drafts are revised)."""

from __future__ import annotations

import json

import pytest
from test_synth_api import make_cfg, numbered, read_jsonl, write_questions  # noqa: E402

from cbt_llm.core.config import ApiSynthConfig
from cbt_llm.domain.chat_format import build_user_message
from cbt_llm.domain.rubrics import RUBRICS, RubricCritic
from data_pipeline.sources.formats import PairExample, to_examples
from data_pipeline.synth.agents import PAIRS_FILE, pairs_of, run_synth_api_agents, write_pairs
from tests.fixtures.fake_openai_server import REVISION_MARK, FakeOpenAIServer

CRITIC = RubricCritic(RUBRICS["cbt"])


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def agents_cfg(tmp_path, srv, questions, margin=2.0, threshold=15.0, max_rounds=3) -> ApiSynthConfig:
    cfg = make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", questions))
    update = {"enabled": True, "threshold": threshold, "max_rounds": max_rounds, "pair_margin": margin}
    cfg.agents = cfg.agents.model_copy(update=update)
    return cfg


def test_every_round_is_kept_and_pairs_are_written_above_the_margin(tmp_path):
    qs = numbered(2) + [("crisis", "危机:我最近总想自杀,觉得活着没有意义。")]
    with FakeOpenAIServer(critic="critic_climb") as srv:
        summary = run_synth_api_agents(agents_cfg(tmp_path, srv, qs), CRITIC)
    out = tmp_path / "out"
    records = {r["id"]: r for r in read_jsonl(out / "records.jsonl")}
    for r in records.values():
        drafts = r["meta"]["agents"]["drafts"]
        assert r["meta"]["agents"]["scores"] == [6, 11, 15] and len(drafts) == 3
        assert [d.count(REVISION_MARK) for d in drafts] == [0, 1, 2] and drafts[2] == r["answer"]
    pairs = read_jsonl(out / PAIRS_FILE)
    # the kept draft (round 3, 15) against round 1 (6: margin 9) and round 2 (11: margin 4), per question
    assert [p["id"] for p in pairs] == [f"{q}-r{k}" for q in records for k in (1, 2)]
    assert summary["pairs"]["pairs"] == 6 and summary["pairs"]["records_with_pairs"] == 3
    assert json.loads((out / "summary.json").read_text())["pairs"]["pairs"] == 6
    for p in pairs:
        rec = records[p["meta"]["record_id"]]
        k = p["meta"]["rounds"]["rejected"]
        assert p["chosen"] == rec["answer"] and p["rejected"] == rec["meta"]["agents"]["drafts"][k - 1]
        assert p["meta"]["scores"] == {"chosen": 15, "rejected": [6, 11][k - 1]}
        assert p["meta"]["margin"] == 15 - p["meta"]["scores"]["rejected"] >= 2
        assert p["messages"] == [{"role": "user", "content": build_user_message(rec["question"], rec["description"])}]
        assert p["meta"]["crisis"] == rec["meta"]["crisis"] and p["meta"]["source"] == "synth-api-agents"
        ex = to_examples(p, "preference", "系统", "x:1")[0]  # prepare's preference format reads them as written
        assert isinstance(ex, PairExample) and ex.crisis == rec["meta"]["crisis"]
    # a larger margin keeps only the widest gap; the file is rewritten from records.jsonl, never appended to
    assert write_pairs(out, 5.0)["pairs"] == 3
    assert {p["id"].rsplit("-", 1)[1] for p in read_jsonl(out / PAIRS_FILE)} == {"r1"}
    assert write_pairs(out, 10.0)["pairs"] == 0 and read_jsonl(out / PAIRS_FILE) == []


def test_a_rerun_rewrites_the_pairs_of_every_record_once(tmp_path):
    with FakeOpenAIServer(critic="critic_climb") as srv:
        run_synth_api_agents(agents_cfg(tmp_path, srv, numbered(2)), CRITIC)
        first = (tmp_path / "out" / PAIRS_FILE).read_text()
        summary = run_synth_api_agents(agents_cfg(tmp_path, srv, numbered(3)), CRITIC)  # resumes: one new question
    assert summary["skipped"] == 2
    pairs = read_jsonl(tmp_path / "out" / PAIRS_FILE)
    assert (tmp_path / "out" / PAIRS_FILE).read_text().startswith(first)
    # in records.jsonl's order (records are written as they finish), each record's pairs once
    assert sorted(p["id"] for p in pairs) == [f"q{i:03d}-r{k}" for i in range(3) for k in (1, 2)]


def test_pairs_of_skips_equal_and_close_scores_and_records_without_drafts():
    rec = {
        "id": "a",
        "question": "问题",
        "description": "",
        "meta": {"agents": {"scores": [12, 11, 12, 9], "kept": 3, "drafts": ["x", "y", "z", "w"]}},
    }
    assert [p["id"] for p in pairs_of(rec, 2.0)] == ["a-r4"]  # 12 (a tie) and 11 (gap 1) are no pairs
    assert [p["id"] for p in pairs_of(rec, 0.5)] == ["a-r2", "a-r4"]
    assert [p["id"] for p in pairs_of(rec, 0.0)] == ["a-r2", "a-r4"]  # an equal score is never a lower one
    same = {**rec, "meta": {"agents": {"scores": [5, 9], "kept": 2, "drafts": ["z", "z"]}}}
    assert pairs_of(same, 2.0) == []  # the same text on both sides is no preference
    assert pairs_of({**rec, "meta": {"agents": {"scores": [5, 9], "kept": 2}}}, 2.0) == []
    assert ApiSynthConfig().agents.pair_margin == 2.0
