"""`cbt-llm prepare` with data.format: preference (data_pipeline/shards.py's preference layout),
on template pairs and hand-written pairs in our shape, OpenAI's preference fine-tuning shape and TRL's, in one Ray
session for the module.

What must hold: each input shape converts to the same pair; a bad pair is quarantined with its reason and counted,
every good one survives; in a row a pair's two sequences are adjacent (chosen first) and a pair is never split
across rows; each sequence decodes to the rendered prompt + its answer and its labels are exactly that answer and
its end token; heldout_pairs.jsonl holds the validation pairs; packing=false gives one padded pair per row; and
tests/fixtures/tiny.py's make_preference_shards writes the same layout as prepare.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.chat_format import IM_END
from cbt_llm.domain.record import REASONS, RecordError
from cbt_llm.inference.tokenizer import load_tokenizer
from data_pipeline.packing import split_by_position_ids
from data_pipeline.prepare import run_prepare
from data_pipeline.prepare.ray_session import init_ray
from data_pipeline.shards import IGNORE, load_manifest, objective_of, sha256_file, verify_shards
from data_pipeline.sources.formats import PairExample, split_of, to_examples
from data_pipeline.synth.pairs import iter_pairs
from data_pipeline.tokenizer import train_tokenizer_from_texts
from tests.fixtures.tiny import make_preference_shards

SYSTEM = "你是一名心理咨询师,请用认知行为疗法回答。"
SEQ_LEN = 4096
TOPICS = ["失眠", "考试焦虑", "同事关系", "父母争吵", "工作压力", "分手以后", "社交恐惧", "拖延", "自卑", "孤独"]


def short_pair(i: int) -> tuple[str, str, str]:
    """(question, chosen, rejected) of hand-written pair i: short, distinct."""
    t = TOPICS[i % len(TOPICS)]
    q = f"第{i}个问题:最近因为{t}很难受,我该怎么办?"
    chosen = (
        f"听起来{t}让你很辛苦,这种感受可以理解。可以试着每天记录一次想法,第{i}步慢慢来。如果持续存在,请寻求专业帮助。"
    )
    rejected = f"别想太多,{t}谁都有,第{i}次忍一忍就过去了。"
    return q, chosen, rejected


def ours(i: int, **kw) -> dict:
    q, c, r = short_pair(i)
    return {"id": f"ours-{i}", "messages": [{"role": "user", "content": q}], "chosen": c, "rejected": r, **kw}


def openai(i: int) -> dict:
    q, c, r = short_pair(i)
    return {
        "input": {"messages": [{"role": "user", "content": q}]},
        "preferred_output": [{"role": "assistant", "content": c}],
        "non_preferred_output": [{"role": "assistant", "content": r}],
    }


def trl(i: int, kind: str) -> dict:
    q, c, r = short_pair(i)
    if kind == "text":
        return {"prompt": q, "chosen": c, "rejected": r}
    if kind == "messages":
        user = [{"role": "user", "content": q}]
        return {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
    user = {"role": "user", "content": q}  # implicit prompt: both conversations share it
    return {
        "chosen": [user, {"role": "assistant", "content": c}],
        "rejected": [user, {"role": "assistant", "content": r}],
    }


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Pair files of every shape, bad pairs with their reasons, a tokenizer and one Ray session."""
    d = tmp_path_factory.mktemp("pref")
    template = list(iter_pairs(1, 0, 40, crisis_fraction=0.1))
    multi = ours(
        900,
        messages=[
            {"role": "system", "content": "你是一名温和的咨询师。"},
            {"role": "user", "content": "我最近总是失眠。"},
            {"role": "assistant", "content": "失眠多久了?"},
            {"role": "user", "content": "大概两个月,我担心自己会一直这样。"},
        ],
    )
    good_ours = template + [ours(i) for i in range(20)] + [multi]
    good_openai = [openai(i) for i in range(100, 112)]
    good_trl = [trl(i, k) for i, k in zip(range(200, 216), ["text", "messages", "implicit", "text"] * 4)]
    (d / "a_ours.jsonl").write_text("".join(dumps(p) + "\n" for p in good_ours), encoding="utf-8")
    (d / "b_openai.jsonl").write_text("".join(dumps(p) + "\n" for p in good_openai), encoding="utf-8")
    (d / "c_trl.jsonl").write_text("".join(dumps(p) + "\n" for p in good_trl), encoding="utf-8")

    base = ours(300)
    long_answer = "\n\n".join(p["chosen"] for p in template[:24])
    bad = [
        (dumps(dict(base, id="same", rejected=" " + base["chosen"] + " ")), "same_answers"),
        (dumps(dict(base, id="empty-chosen", chosen="   ")), "empty_side"),
        (dumps(dict(openai(301), preferred_output=[])), "empty_side"),
        (dumps({k: v for k, v in ours(302, id="no-rejected").items() if k != "rejected"}), "missing_field"),
        (
            dumps(
                dict(
                    ours(303), id="ends-on-answer", messages=[*base["messages"], {"role": "assistant", "content": "嗯"}]
                )
            ),
            "turn_order",
        ),
        (dumps(dict(ours(304), id="two-users", messages=base["messages"] * 2)), "turn_order"),
        (dumps({"prompt": 12, "chosen": "好", "rejected": "坏"}), "wrong_type"),
        (dumps({"question": "没有成对的回答"}), "missing_field"),
        (dumps(dict(ours(305), id="too-long", chosen=long_answer)), "pair_overlong"),
        ('{"id": "broken", "messages": [', "malformed_json"),
        (dumps([1, 2]), "not_object"),
        (dumps(good_ours[3]), "duplicate"),  # an exact copy of a kept pair in an earlier file
    ]
    (d / "d_bad.jsonl").write_text("".join(line + "\n" for line, _ in bad), encoding="utf-8")

    texts = [t for p in template for t in (p["messages"][0]["content"], p["chosen"], p["rejected"])]
    texts += [t for i in range(20) for t in short_pair(i)] + [SYSTEM]
    tok_dir = train_tokenizer_from_texts(texts, 2000, d / "tok")
    started, _ = init_ray(None, Path("/tmp") / f"cbtp-{d.name[-12:]}")
    n_good = len(good_ours) + len(good_openai) + len(good_trl)
    yield {"dir": d, "tok": str(tok_dir), "bad": bad, "n_good": n_good, "template": template}
    if started:
        import ray

        ray.shutdown()


def make_cfg(env, out: str, **data) -> Config:
    base = {
        "inputs": [str(env["dir"] / "*.jsonl")],
        "out_dir": str(env["dir"] / out),
        "tokenizer": env["tok"],
        "format": "preference",
        "system_prompt": SYSTEM,
        "seq_len": SEQ_LEN,
        "pack_window": 16,
        "val_fraction": 0.25,
        "world_size": 2,
    }
    base.update(data)
    return Config.model_validate({"data": base})


@pytest.fixture(scope="module")
def prepared(env):
    cfg = make_cfg(env, "out")
    return Path(cfg.data.out_dir), run_prepare(cfg)


def read_rows(out: Path, man: dict, split: str) -> list[dict]:
    return [r for sh in man["splits"][split]["shards"] for r in pq.read_table(out / sh["path"]).to_pylist()]


def pairs_in_rows(rows: list[dict], padded: bool = False) -> dict[str, tuple[tuple, tuple]]:
    """{pair id: ((chosen ids, labels), (rejected ids, labels))}, checking the layout of every row on the way: its
    sequences start where position_ids restart, come in (x/chosen, x/rejected) pairs, and no pair id repeats."""
    found: dict[str, tuple[tuple, tuple]] = {}
    for r in rows:
        spans = split_by_position_ids(r["position_ids"])
        eids = r["example_ids"]
        assert len(spans) == len(eids) == r["num_examples"] and r["num_examples"] % 2 == 0
        if padded:
            assert r["num_examples"] == 2  # one pair per row
        seqs = []
        for eid, (s, e) in zip(eids, spans):
            ids, labels = r["input_ids"][s:e], r["labels"][s:e]
            if padded and eid.endswith("/rejected"):  # the padding runs on after the rejected sequence
                n = next((k for k in range(len(labels) - 1, -1, -1) if labels[k] != IGNORE), 0) + 1
                assert all(x == IGNORE for x in labels[n:]) and r["position_ids"][s:e] == list(range(e - s))
                ids, labels = ids[:n], labels[:n]
            seqs.append((eid, tuple(ids), tuple(labels)))
        for (ce, cids, clab), (re_, rids, rlab) in zip(seqs[0::2], seqs[1::2]):
            pid, side = ce.rsplit("/", 1)
            assert side == "chosen" and re_ == f"{pid}/rejected"  # adjacent, chosen first
            assert pid not in found  # never split across rows, never twice
            found[pid] = ((cids, clab), (rids, rlab))
    return found


def test_each_input_shape_converts_to_the_same_pair():
    q, c, r = short_pair(7)
    want = ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], c, r)
    shapes = [ours(7), openai(7), trl(7, "text"), trl(7, "messages"), trl(7, "implicit")]
    for rec in shapes:
        (ex,) = to_examples(rec, "preference", SYSTEM, "f:1")
        assert isinstance(ex, PairExample)
        assert (ex.messages, ex.chosen, ex.rejected) == want and ex.question == q
    assert to_examples(ours(7), "preference", SYSTEM, "f:1")[0].example_id == "ours-7"
    assert to_examples(openai(7), "preference", SYSTEM, "f:9")[0].example_id == "f:9"
    # a system turn of the record's own is kept; a multi-turn prompt splits on its last user turn
    turns = [
        {"role": "system", "content": "别的系统提示"},
        {"role": "user", "content": "第一句"},
        {"role": "assistant", "content": "嗯"},
        {"role": "user", "content": "最后一句"},
    ]
    (ex,) = to_examples(ours(7, messages=turns, meta={"source": "s", "crisis": True}), "preference", SYSTEM, "f:1")
    assert ex.messages == turns and ex.question == "最后一句" and ex.crisis and ex.meta["source"] == "s"
    assert ex.heldout_pair()["messages"] == turns and ex.heldout_record()["reference"] == c
    with pytest.raises(RecordError) as err:
        to_examples(dict(ours(7), rejected=c), "preference", SYSTEM, "f:1")
    assert err.value.reason == "same_answers"
    assert {"same_answers", "empty_side", "pair_overlong"} <= set(REASONS)


def test_bad_pairs_are_quarantined_with_their_reason_and_counted(env, prepared):
    out, man = prepared
    rejects = [json.loads(x) for x in (out / "rejects" / "rejects-00000.jsonl").read_text().splitlines()]
    bad_file = [r for r in rejects if r["source_file"].endswith("d_bad.jsonl")]
    assert [(r["line"], r["reason"]) for r in bad_file] == [(k + 1, reason) for k, (_, reason) in enumerate(env["bad"])]
    assert len(rejects) == len(env["bad"])  # no good pair rejected
    want: dict[str, int] = {}
    for _, reason in env["bad"]:
        want[reason] = want.get(reason, 0) + 1
    c = man["counts"]
    assert c["rejected"] == dict(sorted(want.items())) and c["rejected_total"] == len(env["bad"])
    assert c["kept"] == env["n_good"] == c["pairs"]["train"] + c["pairs"]["validation"]
    too_long = next(r for r in bad_file if r["reason"] == "pair_overlong")
    assert too_long["detail"].startswith("too-long: chosen ") and f"> data.seq_len {SEQ_LEN}" in too_long["detail"]


def test_pairs_are_adjacent_in_rows_and_labels_are_the_answers(env, prepared):
    out, man = prepared
    tok = load_tokenizer(env["tok"])
    im_end = tok.convert_tokens_to_ids(IM_END)
    texts = {}
    for f in sorted(env["dir"].glob("*.jsonl")):
        for line_no, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            try:
                results = to_examples(json.loads(line), "preference", SYSTEM, f"{f.name}:{line_no}")
            except (RecordError, ValueError):
                continue
            texts.setdefault(results[0].example_id, results[0])
    seen = 0
    for split in ("train", "validation"):
        rows = read_rows(out, man, split)
        assert all(len(r["input_ids"]) <= SEQ_LEN for r in rows)
        assert sum(r["num_examples"] for r in rows) == 2 * man["counts"]["pairs"][split]
        assert any(r["num_examples"] >= 4 for r in rows)  # short pairs share rows
        for pid, sides in pairs_in_rows(rows).items():
            ex = texts[pid]
            assert split_of(ex.question, 0.25, 0) == split
            prompt_len = None
            for (ids, labels), answer in zip(sides, (ex.chosen, ex.rejected)):
                conv = ex.messages + [{"role": "assistant", "content": answer}]
                assert tok.decode(list(ids)) == tok.apply_chat_template(conv, tokenize=False)
                learned = [i for i, t in enumerate(labels) if t != IGNORE]
                assert learned == list(range(learned[0], learned[-1] + 1))  # one run: the answer + its end token
                assert tok.decode([ids[i] for i in learned]) == answer + IM_END and ids[learned[-1]] == im_end
                assert tok.decode(list(ids[: learned[0]])).endswith("<|im_start|>assistant\n")
                if prompt_len is None:
                    prompt_len, prompt = learned[0], ids[: learned[0]]
                else:  # both sides share the prompt, token for token
                    assert ids[:prompt_len] == prompt
            seen += 1
    assert seen == env["n_good"]


def test_manifest_and_heldout_pairs(env, prepared):
    out, man = prepared
    assert man["format"] == "preference" and objective_of(man) == "preference"
    assert man["split_rule"]["key"] == "normalised last user turn"
    c = man["counts"]
    assert c["examples"] == c["pairs"] and c["truncated"] == 0
    for split in ("train", "validation"):
        assert sum(sh["examples"] for sh in man["splits"][split]["shards"]) == c["pairs"][split]
    assert len(man["splits"]["train"]["shards"]) % 2 == 0
    assert load_manifest(out, tokenizer=env["tok"], verify_checksums=True) == man
    assert verify_shards(out, man, "full") == len(man["splits"]["train"]["shards"]) + 1
    held = [json.loads(x) for x in (out / "heldout_pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert man["heldout_pairs"] == {
        "path": "heldout_pairs.jsonl",
        "records": len(held),
        "sha256": sha256_file(out / "heldout_pairs.jsonl"),
    }
    val_ids = set(pairs_in_rows(read_rows(out, man, "validation")))
    assert [h["id"] for h in held if h["id"] in val_ids] == [h["id"] for h in held] and len(held) == len(val_ids) > 0
    for h in held:
        assert set(h) == {"id", "messages", "chosen", "rejected", "crisis", "meta"}
        assert h["messages"][0]["role"] == "system" and h["messages"][-1]["role"] == "user"
        assert h["chosen"] != h["rejected"]
    template = {p["id"]: p for p in env["template"]}
    for h in held:
        if h["id"] in template:
            p = template[h["id"]]
            assert (h["chosen"], h["rejected"], h["crisis"]) == (p["chosen"], p["rejected"], p["meta"]["crisis"])
            assert h["meta"]["flaw"] == p["meta"]["flaw"]
    heldout = [json.loads(x) for x in (out / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [h["id"] for h in heldout] == [h["id"] for h in held]  # heldout.jsonl: the same pairs, chosen as reference
    assert [h["reference"] for h in heldout] == [h["chosen"] for h in held]


def test_padded_pairs_one_per_row(env):
    cfg = make_cfg(env, "padded", packing=False, inputs=[str(env["dir"] / "[bc]_*.jsonl")])
    man = run_prepare(cfg)
    out = Path(cfg.data.out_dir)
    for split in ("train", "validation"):
        rows = read_rows(out, man, split)
        assert all(len(r["input_ids"]) == SEQ_LEN and r["num_examples"] == 2 for r in rows)
        assert len(pairs_in_rows(rows, padded=True)) == len(rows) == man["counts"]["pairs"][split]
        for r in rows:  # padding: pad ids with IGNORE labels, never counted as tokens
            assert r["input_ids"][-1] == man["pad_token_id"] and r["labels"][-1] == IGNORE
    c = man["counts"]
    assert c["rows"]["train"] == c["pairs"]["train"] and c["pairs"]["train"] + c["pairs"]["validation"] == 28
    assert c["tokens"]["train"] < c["rows"]["train"] * SEQ_LEN


def test_settings_that_do_not_fit_pairs_fail_before_work(env):
    with pytest.raises(ConfigError, match="never truncated or split"):
        run_prepare(make_cfg(env, "x1", overlong="truncate"))
    with pytest.raises(ConfigError, match="not preference pairs"):
        run_prepare(make_cfg(env, "x2", near_dup={"enabled": True}))
    assert not (env["dir"] / "x1").exists() and not (env["dir"] / "x2").exists()


@pytest.mark.parametrize("packing", [True, False])
def test_fixture_preference_shards_follow_the_same_contract(tmp_path, packing):
    out = make_preference_shards(tmp_path / "data", packing=packing, rows_per_shard=3, train_shards=2, val_rows=2)
    man = load_manifest(out)
    assert objective_of(man) == "preference" and man["format"] == "preference"
    assert verify_shards(out, man, "full") == 3
    for split in ("train", "validation"):
        rows = read_rows(out, man, split)
        pairs = pairs_in_rows(rows, padded=not packing)
        assert len(pairs) == man["counts"]["pairs"][split] == man["counts"]["examples"][split]
        for sides in pairs.values():
            # labels: the answer + end token (id 2) of each side; the prompt (IGNORE) is the same on both
            starts = []
            for ids, labels in sides:
                learned = [i for i, t in enumerate(labels) if t != IGNORE]
                assert learned == list(range(learned[0], len(ids))) and ids[-1] == 2
                starts.append(learned[0])
            (cids, _), (rids, _) = sides
            assert starts[0] == starts[1] and cids[: starts[0]] == rids[: starts[1]]
            assert all(3 <= t < 15 for t in cids[starts[0] : -1]) and all(50 <= t < 90 for t in rids[starts[1] : -1])
    held = [json.loads(x) for x in (out / "heldout_pairs.jsonl").read_text().splitlines()]
    assert len(held) == man["heldout_pairs"]["records"] == man["counts"]["pairs"]["validation"]
