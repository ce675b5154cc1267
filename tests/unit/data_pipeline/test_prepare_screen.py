"""prepare's quality gate and near-duplicate pass (data.quality, data.near_dup) on a small corpus with planted cases.

What must hold: a copy with a few characters changed, inserted or its punctuation swapped is removed as a
near_duplicate naming the kept first copy, while distinct examples (another answer to the same question
included) stay; the decisions equal datasketch's own MinHashLSH run over the corpus in order on one process; a
run with other batch sizes writes the same bytes; the gate rejects exactly the examples under its thresholds,
with their scores. One prepare run checks most of it (Ray start-up dominates a run's time).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash, MinHashLSH

from cbt_llm.core.config import Config
from cbt_llm.domain.cbt import join_answer
from cbt_llm.domain.chat_format import build_user_message
from data_pipeline.prepare import run_prepare
from data_pipeline.prepare.neardup import (
    conversation_text,
    crisis_group,
    estimate_jaccard,
    lsh_params,
    shingle_hashes,
    shingles,
    sketch,
)
from data_pipeline.prepare.ray_session import init_ray
from data_pipeline.synth.scorer import load_or_train
from data_pipeline.synth.template import iter_records
from data_pipeline.tokenizer import train_tokenizer_from_texts
from tests.fixtures.paths import ROOT

SCORER = ROOT / "runs" / "structure_scorer.npz"  # shared with the eval tests, built once by whichever runs first
SYSTEM = "你是一名心理咨询师,请用认知行为疗法回答。"
MIN_JUDGE = 15.0
MIN_COVERAGE = 4
HOTLINE = "如果你有伤害自己的想法，请拨打心理援助热线。"


def _edit(rec: dict, new_id: str, answer: str) -> dict:
    return dict(rec, id=new_id, answer=answer)


def _corpus() -> tuple[list[dict], list[dict], dict[str, str]]:
    """(a.jsonl records, b.jsonl records, {planted near-copy id: id of its original})."""
    a = list(iter_records(7, 0, 40))
    for k, total in zip(range(20, 26), (10, 15, 14.5, 18, 0, 16)):  # judged records around MIN_JUDGE
        a[k] = dict(a[k], meta=dict(a[k]["meta"], judge={"total": total, "rounds": 1}))
    a[26] = dict(a[26], meta=dict(a[26]["meta"], judge={"total": "high"}))  # not a number: rejected, never passed
    thin = dict(a[0]["cbt"], key_thought=a[0]["cbt"]["empathy"], challenge=a[0]["cbt"]["empathy"])
    thin = {p: "我能理解你的难过。" for p in thin}
    a[30] = dict(a[30], cbt=thin, answer=join_answer(thin))  # one part said five times: low coverage
    ans = [r["answer"] for r in a]
    near = {
        "copy-changed": _edit(a[3], "copy-changed", ans[3].replace("你", "您", 2).replace("的", "地", 1)),
        "copy-inserted": _edit(a[5], "copy-inserted", ans[5][:60] + "其实" + ans[5][60:]),
        "copy-punct": _edit(a[8], "copy-punct", ans[8].replace("，", ",").replace("。", ".").replace("\n\n", "\n")),
        "copy-qtypo": dict(a[11], id="copy-qtypo", question=a[11]["question"] + "呢"),
    }
    b = [
        dict(a[1], id="exact-copy"),  # an exact duplicate (ids aside the conversation is the same): `duplicate`
        near["copy-changed"],
        dict(a[12], id="same-question-other-answer", answer=ans[13], cbt=a[13]["cbt"]),  # distinct: kept
        near["copy-inserted"],
        near["copy-punct"],
        near["copy-qtypo"],
        # a near-copy that adds crisis support: compared only with crisis-support answers, so it stays
        dict(a[14], id="copy-with-hotline", answer=ans[14] + HOTLINE),
    ]
    return (
        a,
        b,
        {"copy-changed": a[3]["id"], "copy-inserted": a[5]["id"], "copy-punct": a[8]["id"], "copy-qtypo": a[11]["id"]},
    )


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("screen")
    a, b, planted = _corpus()
    _write(d / "a.jsonl", a)
    _write(d / "b.jsonl", b)
    texts = [t for r in a + b for t in (r["question"], r["description"], r["answer"])] + [SYSTEM]
    tok = train_tokenizer_from_texts(texts, 700, d / "tok")
    started, _ = init_ray(None, Path("/tmp") / f"cbts-{d.name[-12:]}")
    yield {"dir": d, "a": a, "b": b, "planted": planted, "tok": str(tok)}
    if started:
        import ray

        ray.shutdown()


def _cfg(env, out: str, **data) -> Config:
    base = {
        "inputs": [str(env["dir"] / "*.jsonl")],
        "out_dir": str(env["dir"] / out),
        "tokenizer": env["tok"],
        "system_prompt": SYSTEM,
        "seq_len": 1024,
        "val_fraction": 0.2,
        "world_size": 1,
        "near_dup": {"enabled": True},
        "quality": {"min_structure_coverage": MIN_COVERAGE, "min_judge_total": MIN_JUDGE, "scorer": str(SCORER)},
    }
    return Config.model_validate({"data": base | data})


def _kept_ids(out: Path, man: dict) -> set[str]:
    ids = set()
    for split in ("train", "validation"):
        for sh in man["splits"][split]["shards"]:
            ids.update(i for row in pq.read_table(out / sh["path"]).column("example_ids").to_pylist() for i in row)
    return ids


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects" / "rejects-00000.jsonl").read_text("utf-8").splitlines()]


def _lsh_oracle(records: list[dict], skip: set[str]) -> set[str]:
    """The ids datasketch's own MinHashLSH finds as near-duplicates, inserting the kept ones in order on one
    process: what the Ray pass must reproduce."""
    b, r = lsh_params(0.8, 128)
    lsh = {g: MinHashLSH(num_perm=128, params=(b, r)) for g in range(4)}  # one per crisis group
    dups, kept = set(), {}
    for rec in records:
        if rec["id"] in skip:
            continue
        msgs = [{"role": "user", "content": build_user_message(rec["question"], rec["description"])}]
        msgs.append({"role": "assistant", "content": rec["answer"]})
        m = MinHash(num_perm=128, seed=1, hashfunc=int)
        m.update_batch(shingle_hashes(conversation_text(msgs), 5).tolist())
        group = lsh[crisis_group(msgs)]
        mine = np.frombuffer(sketch(m.hashvalues), np.uint8)
        # a candidate counts when its sketch estimates J >= 0.8, as the driver checks
        if any(estimate_jaccard(mine, kept[key]) >= 0.8 for key in group.query(m)):
            dups.add(rec["id"])
        else:
            group.insert(rec["id"], m)
            kept[rec["id"]] = mine
    return dups


@pytest.fixture(scope="module")
def screened(env):
    cfg = _cfg(env, "out")
    man = run_prepare(cfg)
    return Path(cfg.data.out_dir), man


def test_planted_near_duplicates_removed_first_copy_kept(env, screened):
    out, man = screened
    rejects = _rejects(out)
    near = {r["detail"].split(":")[0]: r for r in rejects if r["reason"] == "near_duplicate"}
    assert set(near) == set(env["planted"])
    a_lines = {rec["id"]: i + 1 for i, rec in enumerate(env["a"])}
    for copy_id, first_id in env["planted"].items():
        # the detail names both ids and where the kept copy is
        assert near[copy_id]["detail"].endswith(
            f"near-duplicate of {first_id} ({env['dir'] / 'a.jsonl'}:{a_lines[first_id]})"
        )
    kept = _kept_ids(out, man)
    assert set(env["planted"].values()) <= kept and not set(env["planted"]) & kept
    assert "same-question-other-answer" in kept  # precision: another answer to the same question stays
    assert "copy-with-hotline" in kept  # crisis support is never deduplicated away
    assert [r["detail"].split(":")[0] for r in rejects if r["reason"] == "duplicate"] == ["exact-copy"]
    low = {r["detail"].split(":")[0] for r in rejects if r["reason"] == "low_quality"}
    # every example is either kept or rejected once, and the one-process datasketch run agrees
    everything = {r["id"] for r in env["a"] + env["b"]}
    assert kept | set(near) | low | {"exact-copy"} == everything and len(rejects) == len(everything) - len(kept)
    assert _lsh_oracle(env["a"] + env["b"], low | {"exact-copy"}) == set(near)
    counts = man["counts"]["rejected"]
    assert counts["near_duplicate"] == 4 and counts["duplicate"] == 1 and counts["low_quality"] == len(low)
    assert man["screen"]["near_dup"]["bands"] * man["screen"]["near_dup"]["rows_per_band"] <= 128
    metrics = json.loads((out / "prepare_metrics.json").read_text())
    assert metrics["rejected.near_duplicate"] == 4


def test_gate_rejects_exactly_the_records_under_its_thresholds(env, screened):
    out, man = screened
    scorer = load_or_train(SCORER)
    expected = {}
    for rec in env["a"] + env["b"]:
        judge = rec["meta"].get("judge", {}).get("total")
        coverage = scorer.score(rec["answer"])["coverage"]
        if isinstance(judge, str):
            expected[rec["id"]] = "meta.judge.total is not a number"
        elif judge is not None and judge < MIN_JUDGE:
            expected[rec["id"]] = f"judge total {judge:g} < data.quality.min_judge_total {MIN_JUDGE:g}"
        elif coverage < MIN_COVERAGE:
            expected[rec["id"]] = f"structure coverage {coverage} < data.quality.min_structure_coverage {MIN_COVERAGE}"
    low = {r["detail"].split(":")[0]: r["detail"] for r in _rejects(out) if r["reason"] == "low_quality"}
    assert set(low) == set(expected)
    assert {"synth-7-000000020", "synth-7-000000022", "synth-7-000000024", "synth-7-000000026"} <= set(low)
    assert "synth-7-000000030" in low  # the one-part answer
    for rid, why in expected.items():
        assert low[rid].startswith(f"{rid}: {why}")
    assert man["screen"]["quality"]["scorer_signature"] == scorer.signature


def test_other_batch_sizes_give_the_same_bytes(env, screened):
    out, man = screened
    cfg = _cfg(env, "out2", ray_tokenize_batch=3, ray_read_lines=5)
    other = run_prepare(cfg)
    out2 = Path(cfg.data.out_dir)
    assert other["splits"] == man["splits"]
    assert (out2 / "rejects" / "rejects-00000.jsonl").read_bytes() == (
        out / "rejects" / "rejects-00000.jsonl"
    ).read_bytes()


def test_near_copies_are_close_and_settings_validate():
    a, b, planted = _corpus()
    by_id = {r["id"]: r for r in a + b}
    for copy_id, first_id in planted.items():
        s1, s2 = (shingles(by_id[i]["question"] + by_id[i]["answer"], 5) for i in (copy_id, first_id))
        assert len(s1 & s2) / len(s1 | s2) >= 0.8
    # close enough to be removed, were it not for its crisis support
    s1, s2 = (shingles(by_id[i]["question"] + by_id[i]["answer"], 5) for i in ("copy-with-hotline", a[14]["id"]))
    assert len(s1 & s2) / len(s1 | s2) >= 0.8
    with pytest.raises(Exception, match="threshold"):
        Config.model_validate({"data": {"near_dup": {"threshold": 1.5}}})
    with pytest.raises(Exception, match="min_structure_coverage"):
        Config.model_validate({"data": {"quality": {"min_structure_coverage": 6}}})
