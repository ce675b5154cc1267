"""`cbt-llm synth template --pairs`: offline preference pairs, deterministic by seed, each rejected answer flawed in
exactly the way its meta says (checked with the structure scorer, the crisis-support check and the guard's output
check), and the flaw mix as configured."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cbt_llm.cli import main
from cbt_llm.core.config import SynthConfig
from cbt_llm.domain.cbt import CBT_PARTS
from cbt_llm.domain.crisis import CRISIS_SUPPORT_SENTENCE, corpus_is_crisis, has_crisis_support
from cbt_llm.domain.guard import CrisisGuard
from cbt_llm.domain.reply_check import unsafe_output
from data_pipeline.prepare.read import synth_expectations
from data_pipeline.sources.formats import PairExample, to_examples
from data_pipeline.synth.flaws import FLAWS, UNSAFE_LINES
from data_pipeline.synth.pairs import iter_pairs, pair_at, run_synth_pairs
from data_pipeline.synth.scorer import load_or_train

ROOT = Path(__file__).resolve().parents[3]
SCORER = ROOT / "runs" / "structure_scorer.npz"  # shared with the eval and screen tests, built once by the first
N = 300


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return list(iter_pairs(seed=3, start=0, stop=N, crisis_fraction=0.05))


def by_flaw(pairs: list[dict], flaw: str) -> list[dict]:
    found = [p for p in pairs if p["meta"]["flaw"] == flaw]
    assert len(found) >= 20, f"too few {flaw} pairs to test"
    return found


def paragraphs(text: str) -> list[str]:
    return text.split("\n\n")


def test_pairs_are_deterministic_and_every_flaw_is_drawn(pairs):
    assert list(iter_pairs(seed=3, start=0, stop=N, crisis_fraction=0.05)) == pairs
    assert pair_at(3, 17, 0.05) == pairs[17]
    assert list(iter_pairs(seed=4, start=0, stop=5)) != pairs[:5]
    counts = Counter(p["meta"]["flaw"] for p in pairs)
    assert set(counts) == set(FLAWS)
    assert len({p["id"] for p in pairs}) == N
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        assert p["messages"][0]["role"] == "user" and len(p["messages"]) == 1
        assert p["meta"]["crisis"] == corpus_is_crisis(p["messages"][0]["content"])
        # the chosen answer is the template generator's five-part answer (pair i draws with its own digest)
        assert len(paragraphs(p["chosen"])) == len(CBT_PARTS)
        ex = to_examples(p, "preference", "系统", "x:1")[0]  # prepare reads every pair as written
        assert isinstance(ex, PairExample) and (ex.chosen, ex.rejected) == (p["chosen"], p["rejected"])


def test_missing_part_loses_exactly_that_part(pairs):
    scorer = load_or_train(SCORER)
    found = by_flaw(pairs, "missing_part")
    one_fewer = absent = 0
    for p in found:
        part = p["meta"]["flaw_detail"]["part"]
        chosen, rejected = paragraphs(p["chosen"]), paragraphs(p["rejected"])
        assert rejected == [c for c, name in zip(chosen, CBT_PARTS) if name != part]
        if p["meta"]["crisis"]:
            assert part != "empathy" and has_crisis_support(p["rejected"])
        c, r = scorer.score(p["chosen"]), scorer.score(p["rejected"])
        absent += part not in r["parts"]
        one_fewer += r["coverage"] == c["coverage"] - 1
    # the scorer is a classifier: it may read a paragraph as a neighbouring part now and then
    assert one_fewer >= 0.95 * len(found) and absent >= 0.95 * len(found)


def test_order_and_no_empathy_rearrange_the_parts(pairs):
    scorer = load_or_train(SCORER)
    for p in by_flaw(pairs, "order"):
        order = p["meta"]["flaw_detail"]["order"]
        assert sorted(order) == sorted(CBT_PARTS) and order != list(CBT_PARTS)
        chosen = dict(zip(CBT_PARTS, paragraphs(p["chosen"])))
        assert paragraphs(p["rejected"]) == [chosen[k] for k in order]
        assert scorer.score(p["rejected"])["order"] < 1.0 <= scorer.score(p["chosen"])["order"]
    for p in by_flaw(pairs, "no_empathy"):
        chosen = dict(zip(CBT_PARTS, paragraphs(p["chosen"])))
        advice_first = ("strategy", "key_thought", "challenge", "encouragement")
        assert paragraphs(p["rejected"]) == [chosen[k] for k in advice_first]
        assert not p["meta"]["crisis"]  # drawn on non-crisis questions: the pair differs in empathy alone
        assert "empathy" not in scorer.score(p["rejected"])["parts"]


def test_crisis_questions_lose_their_support_sentence(pairs):
    for p in by_flaw(pairs, "no_crisis_support"):
        assert p["meta"]["crisis"] and corpus_is_crisis(p["messages"][0]["content"])
        assert CRISIS_SUPPORT_SENTENCE in p["chosen"] and has_crisis_support(p["chosen"])
        assert not has_crisis_support(p["rejected"])
        assert p["rejected"] == p["chosen"].replace(CRISIS_SUPPORT_SENTENCE, "")


def test_unsafe_rejected_answers_are_stopped_by_the_guard_output_check(pairs):
    guard = CrisisGuard(user_model=None, reply_model=None)  # the patterns layer: the shipped model is not needed
    for p in by_flaw(pairs, "unsafe"):
        line = p["meta"]["flaw_detail"]["line"]
        assert line in UNSAFE_LINES and p["rejected"].replace(line, "") == p["chosen"]
        shown, replaced, kind = guard.check_model_output(p["rejected"])
        assert replaced and kind == "secrecy_discourages_help" and shown != p["rejected"]
        assert guard.check_model_output(p["chosen"])[1] is False
    # every line is one the guard stops, and none names a method or a dose
    assert all(unsafe_output(line) == "secrecy_discourages_help" for line in UNSAFE_LINES)
    assert all(unsafe_output(p["chosen"]) is None for p in pairs)


def test_flaw_mix_is_configurable(tmp_path):
    only = list(iter_pairs(0, 0, 40, mix={"unsafe": 1.0}))
    assert {p["meta"]["flaw"] for p in only} == {"unsafe"}
    two = Counter(p["meta"]["flaw"] for p in iter_pairs(0, 0, 400, mix={"order": 3.0, "no_crisis_support": 1.0}))
    assert set(two) == {"order", "no_crisis_support"} and 2.0 < two["order"] / two["no_crisis_support"] < 4.5
    with pytest.raises(ValueError):
        SynthConfig(pair_flaws={"order": 0.0})
    with pytest.raises(ValueError):
        SynthConfig(pair_flaws={"typo": 1.0})


def test_shards_concatenate_to_one_shard_and_the_cli_writes_them(tmp_path, capsys):
    one = run_synth_pairs(SynthConfig(num_records=50, num_shards=1, workers=1, out_dir=str(tmp_path / "one"), seed=5))
    four = run_synth_pairs(SynthConfig(num_records=50, num_shards=4, workers=1, out_dir=str(tmp_path / "four"), seed=5))
    whole = (tmp_path / "one" / "part-00000-of-00001.jsonl").read_bytes()
    parts = b"".join((tmp_path / "four" / f"part-{k:05d}-of-00004.jsonl").read_bytes() for k in range(4))
    assert whole == parts and one["flaws"] == four["flaws"] and sum(one["flaws"].values()) == 50
    lines = [json.loads(x) for x in whole.decode().splitlines()]
    assert lines == list(iter_pairs(5, 0, 50))
    out = tmp_path / "cli"
    argv = ["synth", "template", "--pairs", "--num-records", "12", "--num-shards", "2", "--workers", "1"]
    assert main([*argv, "--seed", "5", "--out", str(out), "synth.pair_flaws={unsafe: 1}"]) == 0
    files = sorted(str(p) for p in out.glob("part-*.jsonl"))
    expect = synth_expectations(files)  # prepare checks pair shards against synth_summary.json as it does records
    assert len(files) == 2 and sum(e["records"] for e in expect.values()) == 12
    summary = json.loads((out / "synth_summary.json").read_text())
    assert summary["flaws"]["unsafe"] == 12 and (out / "_SUCCESS").exists()
    assert "synth template --pairs" in capsys.readouterr().out
    assert main(["synth", "template", "--pairs", "--sessions", "--out", str(tmp_path / "both")]) == 2
