"""`cbt-llm prepare` end to end on small corpora, with one embedded Ray session for the whole module.

What must hold: packed rows decode back to the conversations, labels cover exactly the answers and their
end token, no question crosses the split, every kind of bad record is quarantined with its reason while every
good one survives, a re-run is byte-identical, the other input formats prepare, a packed row's loss equals
the sum of its examples' losses, and shards refuse a tokenizer they were not made with. The validation split is
also written as text (heldout.jsonl) and the train split as question fingerprints, which evaluation checks a
question set against.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.cbt import join_answer
from cbt_llm.domain.chat_format import IM_END, build_user_message
from cbt_llm.inference.tokenizer import load_tokenizer
from data_pipeline.packing import split_by_position_ids
from data_pipeline.prepare import PrepareError, run_prepare
from data_pipeline.prepare.ray_session import init_ray
from data_pipeline.shards import IGNORE as IGNORE_INDEX
from data_pipeline.shards import ManifestError, load_manifest, sha256_file, train_question_hashes
from data_pipeline.sources.formats import normalise_question, question_hash
from data_pipeline.tokenizer import train_tokenizer_from_texts
from tests.fixtures.paths import PSYQA_SAMPLE

PSYQA = PSYQA_SAMPLE
SYSTEM = "你是一名心理咨询师,请用认知行为疗法回答。"
SEQ_LEN = 384
MAX_CHARS = 3000

_TOPICS = ["失眠", "考试焦虑", "同事关系", "父母争吵", "工作压力", "分手以后", "社交恐惧", "拖延", "自卑", "孤独"]
_PARTS = {
    "empathy": ["你的感受是可以理解的。", "听起来你最近真的很辛苦。", "谢谢你愿意说出来。"],
    "key_thought": ["你似乎认为一次失败就代表全部。", "你好像觉得别人都在评价你。", "你可能在想事情只会越来越糟。"],
    "challenge": ["有没有证据说明事情并非如此?", "如果朋友这样想,你会怎么对他说?", "最坏的结果真的会发生吗?"],
    "strategy": ["可以试着把担心写下来,每天安排放松时间。", "试试每天做十分钟的深呼吸练习。", "把大任务拆成小步骤。"],
    "encouragement": [
        "相信你能慢慢好起来,必要时请寻求专业心理咨询师的帮助。",
        "你已经迈出了第一步,也可以找专业咨询师聊聊。",
    ],
}


def make_record(i: int, rng: random.Random, n_questions: int = 60) -> dict:
    """A valid schema-v1 record; questions repeat (several answers per question) so the split is tested."""
    q = f"关于{_TOPICS[i % n_questions % len(_TOPICS)]}的问题{i % n_questions}:我该怎么办?"
    cbt = {k: "".join(rng.choice(v) for _ in range(rng.randint(1, 3))) for k, v in _PARTS.items()}
    return {
        "id": f"rec-{i:05d}",
        "question": q,
        "description": "我最近" + "很难受" * rng.randint(0, 8),
        "keywords": ["压力"],
        "cbt": cbt,
        "answer": join_answer(cbt),
        "distortions": ["catastrophizing"],
        "source": "synth-test",
        "meta": {"crisis": False},
    }


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def conversation(rec: dict, system: str = SYSTEM) -> list[dict]:
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": build_user_message(rec["question"], rec["description"])},
        {"role": "assistant", "content": rec["answer"]},
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Corpus files, a tiny tokenizer and one Ray session shared by every test here."""
    d = tmp_path_factory.mktemp("prep")
    rng = random.Random(0)
    good = [make_record(i, rng) for i in range(240)]
    # a long answer (under max_chars, over seq_len tokens): kept, truncated
    long_cbt = dict(good[0]["cbt"], strategy="把大任务拆成小步骤,每天完成一点。" * 90)
    good.append(dict(good[1], id="rec-long", cbt=long_cbt, answer=join_answer(long_cbt)))
    # good records in two files, one zstd-compressed, to cover both readers
    (d / "a.jsonl").write_text("".join(dumps(r) + "\n" for r in good[:120]), encoding="utf-8")
    (d / "b.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(dumps(r) + "\n" for r in good[120:]).encode())
    )

    bad_lines: list[tuple[bytes, str]] = []

    def bad(obj, reason):
        bad_lines.append((obj if isinstance(obj, bytes) else dumps(obj).encode(), reason))

    base = make_record(9000, rng)
    bad('{"id": "broken", "question": "你好",'.encode(), "malformed_json")
    bad(b'{"id": "bad-utf8", "question": "\xff\xfe\xfd"}', "invalid_utf8")
    bad([1, 2, 3], "not_object")
    bad(dict(base, id="wrong-type", question=12345), "wrong_type")
    bad({k: v for k, v in dict(base, id="no-answer").items() if k != "answer"}, "missing_field")
    bad(dict(base, id="empty-q", question="   "), "empty_field")
    bad(dict(base, id="empty-part", cbt=dict(base["cbt"], empathy="")), "empty_field")
    bad(dict(base, id="no-chinese", question="how are you?"), "invalid_value")
    bad(dict(base, id="extra", mood="sad"), "unknown_field")
    bad(dict(base, id="huge", description="很" * (MAX_CHARS + 10)), "too_long")
    bad(good[5], "duplicate")  # exact copy of a good record in an earlier file
    with (d / "c_bad.jsonl").open("wb") as fh:
        fh.write(b"\n")  # blank lines are not records
        for raw, _ in bad_lines:
            fh.write(raw + b"\n")

    texts = [t for r in good for t in (r["question"], r["description"], r["answer"])] + [SYSTEM]
    tok_dir = train_tokenizer_from_texts(texts, 700, d / "tok")
    started, _ = init_ray(None, Path("/tmp") / f"cbtr-{d.name[-12:]}")
    yield {"dir": d, "good": good, "bad": bad_lines, "tok": str(tok_dir)}
    if started:
        import ray

        ray.shutdown()


def make_cfg(env, out: str, inputs=None, **data) -> Config:
    base = {
        "inputs": inputs or [str(env["dir"] / "*.jsonl*")],
        "out_dir": str(env["dir"] / out),
        "tokenizer": env["tok"],
        "system_prompt": SYSTEM,
        "seq_len": SEQ_LEN,
        "pack_window": 100,
        "val_fraction": 0.2,
        "max_chars": MAX_CHARS,
        "world_size": 2,
    }
    base.update(data)
    return Config.model_validate({"data": base})


# Digests of a run's outputs on the fixed corpora below (seeded records, tokenizer trained on them): the shards,
# rejects, question files and manifest must stay byte-identical whatever the pipeline does inside. The shards'
# (and so the manifest's) moved once, on purpose, when shards gained Parquet page checksums (bench/RESULTS.md).
_DIGESTS: dict[str, dict[str, str]] = {
    "out": {
        "heldout.jsonl": "62ea85900848776e",
        "rejects/rejects-00000.jsonl": "30f21620080f6d26",
        "train/part-00000-of-00002.parquet": "a317f0f39b4d06cc",
        "train/part-00001-of-00002.parquet": "649bb253002c99fc",
        "train_questions.u64": "84b41a66fcee9c52",
        "validation/part-00000-of-00001.parquet": "3738fed2ab9b8270",
        "manifest.json(content)": "9c90a7a86db1c5c2",
    },
    "padded": {
        "heldout.jsonl": "e3b0c44298fc1c14",
        "rejects/rejects-00000.jsonl": "46f4c12dd51494fc",
        "train/part-00000-of-00004.parquet": "7d9f175c46849ff7",
        "train/part-00001-of-00004.parquet": "0375a9cf371509d6",
        "train/part-00002-of-00004.parquet": "b32cdec6eb0413c0",
        "train/part-00003-of-00004.parquet": "43aaf87d4e58d76b",
        "train_questions.u64": "be265b87869aabd5",
        "manifest.json(content)": "7ddada957ba0d277",
    },
    "alp": {
        "heldout.jsonl": "d90dca34b3643662",
        "rejects/rejects-00000.jsonl": "37dd65585bd3352e",
        "train/part-00000-of-00002.parquet": "110321374a4d3a65",
        "train/part-00001-of-00002.parquet": "f7544dd178b7a716",
        "train_questions.u64": "da31eebac7670b85",
        "validation/part-00000-of-00001.parquet": "fe4a4d2e9bf6e1c6",
        "manifest.json(content)": "8e104ef459cc2f26",
    },
    "sg": {
        "heldout.jsonl": "28f6b7734f4a7539",
        "rejects/rejects-00000.jsonl": "a07b2e252bc44259",
        "train/part-00000-of-00002.parquet": "1c598115aa0bee8e",
        "train/part-00001-of-00002.parquet": "d1a177d06599f8f4",
        "train_questions.u64": "0c48ad44d2f12260",
        "validation/part-00000-of-00001.parquet": "01ab564d3ace4eca",
        "manifest.json(content)": "36a9bb09c695eb87",
    },
}
_RUN_SPECIFIC = ("config_hash",)  # hashes data.inputs and data.tokenizer, which are temp paths here


def output_digests(out: Path, man: dict, root: Path) -> dict[str, str]:
    """sha256 of every file prepare wrote (paths under `root` made relative, since the rejects name their source
    file) and of the manifest's content less its run-specific fields."""
    digests = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name not in ("prepare_metrics.json", "manifest.json"):
            data = p.read_bytes().replace(str(root).encode(), b"<root>")
            digests[str(p.relative_to(out))] = hashlib.sha256(data).hexdigest()[:16]
    content = {k: v for k, v in man.items() if k not in _RUN_SPECIFIC}
    content["tokenizer"] = {"hash": man["tokenizer"]["hash"]}  # name_or_path is a temp path
    content["inputs"] = [{"path": Path(i["path"]).name, "bytes": i["bytes"]} for i in man["inputs"]]
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False).encode()
    digests["manifest.json(content)"] = hashlib.sha256(blob).hexdigest()[:16]
    return digests


def read_split(out: Path, manifest: dict, split: str) -> list[dict]:
    rows = []
    for sh in manifest["splits"][split]["shards"]:
        rows.extend(pq.read_table(out / sh["path"]).to_pylist())
    return rows


def segments(rows: list[dict]):
    """(example_id, input_ids, labels) of every example in packed rows, split at position_ids restarts."""
    for r in rows:
        spans = split_by_position_ids(r["position_ids"])
        assert len(spans) == r["num_examples"] == len(r["example_ids"])
        for eid, (s, e) in zip(r["example_ids"], spans):
            assert r["position_ids"][s:e] == list(range(e - s))
            yield eid, r["input_ids"][s:e], r["labels"][s:e]


@pytest.fixture(scope="module")
def prepared(env):
    cfg = make_cfg(env, "out")
    manifest = run_prepare(cfg)
    return cfg, Path(cfg.data.out_dir), manifest


def test_rows_decode_to_conversations_and_labels_to_answers(env, prepared):
    cfg, out, man = prepared
    tok = load_tokenizer(env["tok"])
    by_id = {r["id"]: r for r in env["good"]}
    seen = 0
    for split in ("train", "validation"):
        rows = read_split(out, man, split)
        assert all(len(r["input_ids"]) <= SEQ_LEN for r in rows)
        for eid, ids, labels in segments(rows):
            rec = by_id[eid]
            text = tok.apply_chat_template(conversation(rec), tokenize=False)
            learned = [t for t in labels if t != IGNORE_INDEX]
            if eid == "rec-long":  # truncated: a prefix of the conversation, answer cut short
                assert len(ids) == SEQ_LEN and text.startswith(tok.decode(ids))
                assert rec["answer"].startswith(tok.decode(learned))
            else:
                assert tok.decode(ids) == text
                assert tok.decode(learned) == rec["answer"] + IM_END
                # learned positions are one contiguous run ending on <|im_end|>, right after the prompt
                pos = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
                assert pos == list(range(pos[0], pos[-1] + 1))
                assert ids[pos[-1]] == tok.convert_tokens_to_ids(IM_END)
                assert tok.decode(ids[: pos[0]]).endswith("<|im_start|>assistant\n")
                assert [ids[i] for i in pos] == learned
            seen += 1
    assert seen == len(env["good"]) == man["counts"]["kept"]
    assert man["counts"]["truncated"] == 1


def test_no_question_in_both_splits(env, prepared):
    cfg, out, man = prepared
    by_id = {r["id"]: r for r in env["good"]}
    qs = {
        split: {normalise_question(by_id[e]["question"]) for e, _, _ in segments(read_split(out, man, split))}
        for split in ("train", "validation")
    }
    assert qs["train"] and qs["validation"]
    assert not qs["train"] & qs["validation"]
    n_val = man["counts"]["examples"]["validation"]
    assert 0.08 < n_val / man["counts"]["kept"] < 0.35  # ~val_fraction 0.2, over 60 questions


def test_heldout_is_the_validation_split_as_text(env, prepared):
    cfg, out, man = prepared
    by_id = {r["id"]: r for r in env["good"]}
    val_ids = [e for e, _, _ in segments(read_split(out, man, "validation"))]
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(held) == len(val_ids) == man["counts"]["examples"]["validation"] > 0
    assert {h["id"] for h in held} == set(val_ids)
    for h in held:
        rec = by_id[h["id"]]
        assert h == {
            "id": rec["id"],
            "question": rec["question"],
            "description": rec["description"],
            "keywords": rec["keywords"],
            "reference": rec["answer"],
            "crisis": False,
            "distortions": rec["distortions"],
        }
    assert man["heldout"] == {
        "path": "heldout.jsonl",
        "records": len(held),
        "sha256": sha256_file(out / "heldout.jsonl"),
    }
    assert man["split_rule"] == {"key": "normalised question", "val_fraction": 0.2, "seed": cfg.data.seed}
    # the train split as fingerprints: one per distinct train question, none of a validation question
    train_qs = {by_id[e]["question"] for e, _, _ in segments(read_split(out, man, "train"))}
    hashes = train_question_hashes(out, man)
    assert list(hashes) == sorted({question_hash(q) for q in train_qs})
    assert man["train_questions"]["questions"] == len(hashes) == len({normalise_question(q) for q in train_qs})
    assert not {question_hash(h["question"]) for h in held} & set(hashes.tolist())
    assert man["train_questions"]["sha256"] == sha256_file(out / "train_questions.u64")


def test_eval_question_set_overlapping_train_is_refused(env, prepared):
    from evaluation.questions import TrainOverlapError, check_no_train_overlap, load_heldout

    cfg, out, man = prepared
    held = load_heldout(out)
    check_no_train_overlap([h["question"] for h in held], out)  # the held-out set passes
    check_no_train_overlap(["一个语料里从来没有的问题:我该怎么办?"], out)  # so does a question prepare never saw
    train_q = next(by["question"] for by in env["good"] if by["id"] not in {h["id"] for h in held})
    # the same question spelled differently (full-width punctuation, spaces, case) is still the train question
    respelled = " " + train_q.replace(":", "\uff1a").replace("?", "\uff1f") + " \n"
    assert respelled != train_q and normalise_question(respelled) == normalise_question(train_q)
    with pytest.raises(TrainOverlapError) as exc:
        check_no_train_overlap([held[0]["question"], respelled, held[1]["question"]], out, what="eval.questions")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("eval.questions: 1 of 3 questions are in the train split") and train_q[:6] in msg
    assert "heldout.jsonl" in msg


def test_bad_records_quarantined_with_reason_and_good_ones_survive(env, prepared):
    cfg, out, man = prepared
    rejects = [
        json.loads(line) for line in (out / "rejects" / "rejects-00000.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    expected = [reason for _, reason in env["bad"]]
    assert [r["reason"] for r in rejects] == expected
    assert all(r["source_file"].endswith("c_bad.jsonl") for r in rejects)
    assert [r["line"] for r in rejects] == list(range(2, 2 + len(expected)))  # line 1 is blank
    assert "rec-00005" in rejects[-1]["detail"] and "a.jsonl:6" in rejects[-1]["detail"]
    assert "question" in rejects[3]["detail"]  # wrong_type names the field
    counts = man["counts"]
    assert counts["read"] == len(env["good"]) + len(expected)
    assert counts["rejected_total"] == len(expected)
    assert counts["rejected"] == {r: expected.count(r) for r in set(expected)}
    kept_ids = {e for s in ("train", "validation") for e, _, _ in segments(read_split(out, man, s))}
    assert kept_ids == {r["id"] for r in env["good"]}


def test_manifest_shards_and_balance(env, prepared):
    cfg, out, man = prepared
    train = man["splits"]["train"]["shards"]
    assert len(train) % 2 == 0 and len(train) >= 2
    assert [s["path"] for s in train] == [f"train/part-{k:05d}-of-{len(train):05d}.parquet" for k in range(len(train))]
    assert max(man["rows_per_rank"]) - min(man["rows_per_rank"]) <= 1
    assert sum(man["rows_per_rank"]) == man["counts"]["rows"]["train"] == sum(s["rows"] for s in train)
    assert man["rows_uneven"] == man["counts"]["rows"]["train"] % 2
    assert sum(s["tokens"] for s in train) == man["counts"]["tokens"]["train"]
    assert sum(s["examples"] for s in train) == man["counts"]["examples"]["train"]
    assert man["packing_efficiency"]["train"] == pytest.approx(
        man["counts"]["tokens"]["train"] / (man["counts"]["rows"]["train"] * SEQ_LEN), abs=1e-6
    )
    # examples here are 100-300 tokens in 384: packing must put more than one in most rows
    assert man["counts"]["examples"]["train"] / man["counts"]["rows"]["train"] > 1.5
    assert man["packing_efficiency"]["train"] > 0.75
    t = pq.read_table(out / train[0]["path"])
    assert t.schema.field("input_ids").type == pa.list_(pa.int32())
    assert t.schema.field("num_examples").type == pa.int32()
    assert load_manifest(out, verify_checksums=True)["config_hash"] == man["config_hash"]
    metrics = json.loads((out / "prepare_metrics.json").read_text())
    assert metrics["records_read"] == man["counts"]["read"] and metrics["tokens/s"] > 0
    assert not list(out.glob(".staging-*"))


def test_outputs_match_recorded_digests(env, prepared):
    cfg, out, man = prepared
    assert output_digests(out, man, env["dir"]) == _DIGESTS["out"]


def test_rerun_is_byte_identical(env, prepared):
    cfg, out, man = prepared
    before = {
        p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "prepare_metrics.json"
    }
    again = run_prepare(cfg)
    after = {
        p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "prepare_metrics.json"
    }
    assert again == man
    assert before == after
    # another folder, same inputs and config: same shards (config_hash leaves out_dir out)
    other = run_prepare(make_cfg(env, "out2"))
    assert other["splits"] == man["splits"] and other["config_hash"] == man["config_hash"]


def test_strict_fails_on_first_bad_record(env, capsys):
    from cbt_llm.cli import main

    cfg = make_cfg(env, "strict")
    with pytest.raises(PrepareError, match=r"c_bad.jsonl:2: malformed_json"):
        run_prepare(cfg, strict=True)
    assert not (Path(cfg.data.out_dir) / "manifest.json").exists()
    rc = main(
        [
            "prepare",
            f"data.inputs=[{env['dir'] / 'c_bad.jsonl'}]",
            f"data.tokenizer={env['tok']}",
            f"data.out_dir={env['dir'] / 'strict2'}",
            "--strict",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("error: --strict: bad record at ") and "malformed_json" in err[-1]


def test_tokenizer_hash_mismatch_refused(env, prepared):
    cfg, out, man = prepared
    assert load_manifest(out, tokenizer=env["tok"])["tokenizer"]["hash"] == man["tokenizer"]["hash"]
    other = train_tokenizer_from_texts([r["answer"] for r in env["good"]], 500, env["dir"] / "tok_other")
    with pytest.raises(ManifestError, match="tokenizer mismatch"):
        load_manifest(out, tokenizer=str(other))
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(env["dir"] / "nowhere")


def test_bad_sizes_fail_before_work(env):
    with pytest.raises(ConfigError, match="num_shards=3 is not a multiple of data.world_size=2"):
        run_prepare(make_cfg(env, "x", num_shards=3))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        run_prepare(make_cfg(env, "x", inputs=[str(env["dir"] / "nope*.jsonl")]))


def test_padding_mode_and_overlong_reject(env):
    man = run_prepare(make_cfg(env, "padded", packing=False, overlong="reject", val_fraction=0.0, num_shards=4))
    out = Path(env["dir"] / "padded")
    rows = read_split(out, man, "train")
    assert len(man["splits"]["train"]["shards"]) == 4 and man["splits"]["validation"]["shards"] == []
    assert man["counts"]["rejected"]["overlong"] == 1 and man["counts"]["truncated"] == 0
    pad = man["pad_token_id"]
    real = 0
    for r in rows:
        assert len(r["input_ids"]) == SEQ_LEN and r["num_examples"] == 1
        n_pad = next(i for i, t in enumerate(reversed(r["input_ids"])) if t != pad)
        assert n_pad > 0 and all(t == IGNORE_INDEX for t in r["labels"][SEQ_LEN - n_pad :])
        assert r["position_ids"] == list(range(SEQ_LEN))
        real += SEQ_LEN - n_pad
    assert man["counts"]["tokens"]["train"] == real
    assert man["packing_efficiency"]["train"] == pytest.approx(real / (len(rows) * SEQ_LEN), abs=1e-6)
    assert man["counts"]["rows"]["train"] == man["counts"]["kept"] == len(env["good"]) - 1
    assert output_digests(out, man, env["dir"]) == _DIGESTS["padded"]


def test_alpaca_json_and_sharegpt_parquet(env):
    d = env["dir"] / "fmt"
    d.mkdir()
    alp = [
        {"instruction": f"请解释{t}的常见原因{i}", "input": "我是学生" if i % 2 else "", "output": r["answer"]}
        for i, (t, r) in enumerate(zip(_TOPICS * 10, env["good"]))
    ]
    alp.append({"instruction": "", "output": "空指令"})
    (d / "alpaca.json").write_text(dumps(alp), encoding="utf-8")
    man = run_prepare(make_cfg(env, "alp", inputs=[str(d / "alpaca.json")], format="alpaca"))
    assert man["counts"]["kept"] == len(alp) - 1 and man["counts"]["rejected"] == {"empty_field": 1}
    out = env["dir"] / "alp"
    assert output_digests(out, man, env["dir"]) == _DIGESTS["alp"]
    tok = load_tokenizer(env["tok"])
    outputs = {a["output"] for a in alp}
    for _, _ids, labels in segments(read_split(out, man, "train") + read_split(out, man, "validation")):
        assert tok.decode([t for t in labels if t != IGNORE_INDEX]).removesuffix(IM_END) in outputs

    convs = []
    for i in range(40):
        turns = [
            {"from": "human", "value": f"第{i}轮:{_TOPICS[i % 10]}怎么办?"},
            {"from": "gpt", "value": env["good"][i]["answer"]},
        ]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "还有别的办法吗?"}, {"from": "gpt", "value": "可以每天散步二十分钟。"}]
        if i % 4 == 0:
            turns.insert(0, {"from": "system", "value": "你是一位温和的咨询师。"})
        convs.append({"id": f"sg-{i}", "conversations": turns})
    convs.append(
        {"id": "sg-bad", "conversations": [{"from": "gpt", "value": "先回答"}, {"from": "human", "value": "再提问"}]}
    )
    pq.write_table(pa.Table.from_pylist(convs), d / "sharegpt.parquet")
    man = run_prepare(make_cfg(env, "sg", inputs=[str(d / "sharegpt.parquet")], format="sharegpt", val_fraction=0.1))
    assert man["counts"]["kept"] == 40 and man["counts"]["rejected"] == {"invalid_value": 1}
    out = env["dir"] / "sg"
    assert output_digests(out, man, env["dir"]) == _DIGESTS["sg"]
    by_id = {c["id"]: c for c in convs}
    n_multi = 0
    for eid, ids, labels in segments(read_split(out, man, "train") + read_split(out, man, "validation")):
        gpt = [t["value"] for t in by_id[eid]["conversations"] if t["from"] == "gpt"]
        text = tok.decode(ids)
        assert text.startswith("<|im_start|>system\n" + ("你是一位温和的咨询师。" if int(eid[3:]) % 4 == 0 else SYSTEM))
        assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "".join(g + IM_END for g in gpt)
        n_multi += len(gpt) == 2
    assert n_multi == 14


@pytest.mark.skipif(not PSYQA.is_file(), reason=f"PsyQA sample not found at {PSYQA} (not redistributable; optional)")
def test_psyqa_sample_end_to_end(env):
    data = json.loads(PSYQA.read_text(encoding="utf-8"))
    n_answers = sum(len(q["answers"]) for q in data)
    texts = [q["question"] + q["description"] for q in data] + [a["answer_text"] for q in data for a in q["answers"]]
    tok_dir = train_tokenizer_from_texts(texts, 1500, env["dir"] / "tok_psyqa")
    cfg = make_cfg(
        env, "psyqa", inputs=[str(PSYQA)], format="psyqa", tokenizer=str(tok_dir), seq_len=1024, pack_window=1000
    )
    man = run_prepare(cfg)
    c = man["counts"]
    assert c["read"] == len(data) == 100
    assert c["kept"] + c["rejected_total"] == n_answers == 268
    assert set(c["rejected"]) <= {"duplicate", "too_long", "empty_field"}
    out = Path(cfg.data.out_dir)
    sides: dict[str, set] = {}
    for split in ("train", "validation"):
        for eid, _, _ in segments(read_split(out, man, split)):
            sides.setdefault(eid.rsplit("-", 1)[0], set()).add(split)
    assert all(len(s) == 1 for s in sides.values())  # all answers of a question on one side


def test_packed_loss_equals_sum_of_separate_losses(env, prepared):
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg, out, man = prepared
    tok = load_tokenizer(env["tok"])
    rows = read_split(out, man, "train")
    row = max(rows, key=lambda r: r["num_examples"])
    assert row["num_examples"] >= 2
    torch.manual_seed(0)
    mcfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
        attn_implementation="sdpa",
        use_cache=False,
    )
    model = Qwen2ForCausalLM(mcfg).float().eval()

    def summed_loss(ids, pos, labels):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos])).logits[0]
        return torch.nn.functional.cross_entropy(
            logits[:-1], torch.tensor(labels[1:]), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    packed = summed_loss(row["input_ids"], row["position_ids"], row["labels"])
    separate = sum(
        summed_loss(row["input_ids"][s:e], list(range(e - s)), row["labels"][s:e])
        for s, e in split_by_position_ids(row["position_ids"])
    )
    assert packed.item() > 0
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)
    # without position_ids the examples would see each other: the loss must differ (the test has teeth)
    with torch.no_grad():
        leaky = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
    leaky_loss = torch.nn.functional.cross_entropy(
        leaky[:-1], torch.tensor(row["labels"][1:]), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    assert abs(leaky_loss.item() - separate.item()) > 1e-3


def test_mask_finds_the_answer_not_an_earlier_copy_of_it(env):
    from data_pipeline.prepare.encode import tokenize_conversation

    tok = load_tokenizer(env["tok"])
    answer = "试试每天做十分钟的深呼吸练习。"
    msgs = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"别人说:{answer}有用吗?"},
        {"role": "assistant", "content": answer},
    ]
    ids, labels = tokenize_conversation(tok, msgs, IM_END)
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == answer + IM_END


def test_dedup_index_keeps_first_copy_across_merges():
    """The compact duplicate index answers like a dict that never overwrites, including for copies that
    arrive after their first copy was merged into the sorted arrays, and within one batch."""
    from data_pipeline.prepare.dedup import FirstSeen

    rng = np.random.default_rng(0)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=300, dtype=np.int64)
    stream = rng.choice(hashes, size=2000)  # every hash repeats, across and within batches
    seen, ref = FirstSeen(chunk=16), {}
    for b in range(0, len(stream), 37):
        batch = stream[b : b + 37]
        merged = seen.lookup_merged(batch)
        for i, h in enumerate(batch.tolist()):
            where = b + i
            assert seen.get(h, int(merged[i])) == ref.get(h)
            if h not in ref:
                ref[h] = where
                seen.add(h, where)
        seen.merge_if_full()
    assert len(seen.keys) > 0 and len(seen) == len(ref)
    assert dict(zip(seen.keys.tolist(), seen.vals.tolist())) | seen.recent == ref


def test_shard_writer_streams_the_spool(tmp_path, monkeypatch):
    """Shards are written one row group at a time from the spool, never the spool or a whole shard at once,
    and the bytes equal one write_table of the whole shard."""
    from data_pipeline.prepare import write as P

    n = 50
    rows = {
        "input_ids": [[i] * (1 + i % 7) for i in range(n)],
        "labels": [[-100] + [i] * (i % 7) for i in range(n)],
        "position_ids": [list(range(1 + i % 7)) for i in range(n)],
        "num_examples": [1] * n,
        "example_ids": [[f"e{i}"] for i in range(n)],
    }
    spool = tmp_path / "spool.parquet"
    pq.write_table(pa.table(rows, schema=P.ROW_SCHEMA), spool, row_group_size=9, compression="none")
    monkeypatch.setattr(P, "_SHARD_ROW_GROUP", 4)
    written: list[int] = []
    real = pq.ParquetWriter.write_table

    def spy(self, table, row_group_size=None):
        written.append(table.num_rows)
        return real(self, table, row_group_size=row_group_size)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", spy)
    entries = P.write_shards(spool, tmp_path / "out", "train", 3, 0, True)
    assert max(written) <= 4 and sum(written) == n
    assert [e["rows"] for e in entries] == P.shard_sizes(n, 3)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", real)
    start = 0
    for e in entries:
        whole = pq.read_table(spool).slice(start, e["rows"]).combine_chunks()
        start += e["rows"]
        pq.write_table(whole, tmp_path / "ref.parquet", row_group_size=4, **P._PARQUET_KW)
        assert (tmp_path / "out" / e["path"]).read_bytes() == (tmp_path / "ref.parquet").read_bytes()


def test_chatml_string_join_equals_the_jinja_template(env):
    """The fast path renders exactly what apply_chat_template renders with our template, on contents jinja or
    a naive format could treat differently; a tokenizer with any other template keeps its jinja."""
    from cbt_llm.domain.chat_format import chat_renderer, render_chatml

    tok = load_tokenizer(env["tok"])
    assert chat_renderer(tok) is render_chatml
    contents = [
        "{{ x }}",
        "{% if %}",
        "  leading and trailing  \n",
        "",
        "<|im_end|>",
        "a\r\nb\tc",
        "😀心理 {0} %s",
        "\\n",
    ]
    for c in contents:
        msgs = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": c},
            {"role": "assistant", "content": c + "答"},
            {"role": "user", "content": "还有呢?"},
            {"role": "assistant", "content": c},
        ]
        assert render_chatml(msgs) == tok.apply_chat_template(msgs, tokenize=False)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|>\n")
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]
    assert chat_renderer(tok)(msgs) == tok.apply_chat_template(msgs, tokenize=False) != render_chatml(msgs)


def test_reused_system_turn_and_byte_positions_equal_the_tokenizer_offsets(env):
    """The actor's fast path (a system turn's tokens reused, token positions from the bytes behind the ids, no
    offsets from the tokenizer) gives the ids, labels and token starts the plain path gives, on awkward
    contents, several system prompts and none; it falls back where it cannot be exact."""
    from tokenizers import AddedToken, normalizers

    from cbt_llm.domain.chat_format import render_chatml
    from data_pipeline.prepare.encode import SystemTurns, encode_batch, token_byte_lengths

    def same(tok, convs, turns, lengths):
        plain = encode_batch(tok, render_chatml, convs, IM_END, starts=True)
        fast = encode_batch(tok, render_chatml, convs, IM_END, starts=True, system_turns=turns, byte_lengths=lengths)
        return all(np.array_equal(a, b) for a, b in zip(plain, fast))

    tok = load_tokenizer(env["tok"])
    contents = ["", "<|im_end|>", "<|im_start|>x", "a\r\nb\tc ", "😀心理 e\u0301", "  ", "𝔘\n\n"]
    convs = [
        [{"role": "system", "content": system}, {"role": "user", "content": c}, {"role": "assistant", "content": c}]
        for system in (SYSTEM, "另一个系统提示", SYSTEM + " ")
        for c in contents
    ] + [[{"role": "user", "content": c}, {"role": "assistant", "content": c + "答"}] for c in contents]
    turns, lengths = SystemTurns.for_tokenizer(tok, render_chatml), token_byte_lengths(tok)
    assert turns is not None and lengths is not None
    assert same(tok, convs, turns, lengths) and len(turns.turns) == 3
    # an NFC normalizer (Qwen's) on text that is not NFC: positions must come from the tokenizer's offsets
    tok.backend_tokenizer.normalizer = normalizers.NFC()
    assert same(tok, convs, turns, token_byte_lengths(tok))
    # a token that strips the whitespace beside it joins turns: no reuse
    tok.backend_tokenizer.add_special_tokens([AddedToken("<|im_start|>", lstrip=True, special=True)])
    assert SystemTurns.for_tokenizer(tok, render_chatml) is None
    # not a byte-level BPE: no byte positions
    tok.backend_tokenizer.decoder = None
    assert token_byte_lengths(tok) is None


def test_overlong_policy_per_row_in_a_batch(env):
    """Truncate, reject and prompt_overlong decided for a whole batch at once give what one conversation at a
    time gives: the first seq_len tokens, or the row rejected with its reason, others untouched."""
    from data_pipeline.prepare.encode import tokenize_conversation
    from data_pipeline.prepare.parse import PARSED_FIELDS
    from data_pipeline.prepare.tokens import Tokenize

    tok = load_tokenizer(env["tok"])
    short, long_prompt = conversation(env["good"][1]), conversation(env["good"][2])
    long_prompt[1]["content"] *= 40
    long_answer = conversation(env["good"][-1])  # rec-long
    convs = [short, long_prompt, None, long_answer, short]
    cols = {name: [_blank(name, k) for k in range(len(convs))] for name, _ in PARSED_FIELDS}
    cols["ok"] = [c is not None for c in convs]
    cols["messages"] = [dumps(c) if c else "" for c in convs]
    table = pa.table({name: pa.array(cols[name], typ) for name, typ in PARSED_FIELDS})
    seq = 120
    for policy, rejected in (("truncate", {1: "prompt_overlong"}), ("reject", {1: "overlong", 3: "overlong"})):
        out = Tokenize(env["tok"], seq, policy, IM_END)(table).to_pydict()
        for k, c in enumerate(convs):
            if k in rejected:
                assert (out["ok"][k], out["reason"][k], out["input_ids"][k]) == (False, rejected[k], [])
                assert out["detail"][k].startswith(f"e{k}: ") and out["raw"][k] == dumps(c)[:1000]
                continue
            ids, labels = tokenize_conversation(tok, c, IM_END) if c else ([], [])
            assert out["input_ids"][k] == list(ids[:seq]) and out["labels"][k] == list(labels[:seq])
            assert out["truncated"][k] == (len(ids) > seq) == (k == 3)
            assert out["ok"][k] == (c is not None)


def test_actor_loads_the_same_tokenizer_without_transformers(env):
    """The actors' tokenizer.json-only load (no transformers import) is used only when it is exactly what
    transformers loads with our template, and then tokenizes a batch to the same table."""
    from data_pipeline.prepare.parse import PARSED_FIELDS
    from data_pipeline.prepare.tokens import Tokenize
    from data_pipeline.tokenizer import light_tokenizer_file

    tok = load_tokenizer(env["tok"])
    light = light_tokenizer_file(tok, env["tok"])
    assert light.endswith("tokenizer.json")
    convs = [conversation(r) for r in env["good"][:6]]
    cols = {name: [_blank(name, k) for k in range(len(convs))] for name, _ in PARSED_FIELDS}
    cols["ok"], cols["messages"] = [True] * len(convs), [dumps(c) for c in convs]
    table = pa.table({name: pa.array(cols[name], typ) for name, typ in PARSED_FIELDS})
    plain, fast = (Tokenize(env["tok"], 120, "truncate", IM_END, f)(table) for f in ("", light))
    assert fast.equals(plain)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|>\n")
    assert light_tokenizer_file(tok, env["tok"]) == ""


def _blank(name: str, k: int):
    return {"file_idx": 0, "line": k, "sub": 0, "chash": k, "qhash": 0, "example_id": f"e{k}", "judge": None}.get(
        name, ""
    )
