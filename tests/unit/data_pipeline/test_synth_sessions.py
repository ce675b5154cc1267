"""`cbt-llm synth template --sessions`: well-formed sessions that follow the CBT arc, meet resistance, put safety
first in a crisis, and are byte-for-byte deterministic on any shard count and worker count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import zstandard

from cbt_llm.cli import main
from cbt_llm.core.config import SynthConfig
from cbt_llm.domain.cbt import DISTORTIONS
from cbt_llm.domain.crisis import SHOWN_CRISIS_LINES, detect
from cbt_llm.domain.guard import CrisisGuard
from cbt_llm.domain.prompts import SESSION_SYSTEM_PROMPT
from cbt_llm.domain.reply_check import unsafe_output
from data_pipeline.io import dumps
from data_pipeline.synth import sessions as S
from data_pipeline.synth.banks import sessions as B
from data_pipeline.synth.template import SUMMARY_NAME, shard_name

N = 2000
CRISIS_FRACTION = 0.1
RANK = {s: i for i, s in enumerate(S.STAGES)}
TECHNIQUE_STAGES = ("socratic", "technique")


@pytest.fixture(scope="module")
def sessions() -> list[dict]:
    return list(S.iter_sessions(seed=11, start=0, stop=N, crisis_fraction=CRISIS_FRACTION))


@pytest.fixture(scope="module")
def every_length() -> list[dict]:
    """Ten sessions (half of them crisis sessions) at every turn count from 8 to 40."""
    return [S.session_at(3, i, crisis_fraction=0.5, min_turns=t, max_turns=t) for t in range(8, 41) for i in range(10)]


def _run(tmp: Path, n: int, shards: int, workers: int = 1, compress: str = "none", **kw) -> dict:
    cfg = SynthConfig(
        num_records=n, seed=5, out_dir=str(tmp), num_shards=shards, workers=workers, compress=compress, **kw
    )
    return S.run_synth_sessions(cfg)


def _concat(folder: Path, shards: int, compress: str = "none") -> bytes:
    out = b""
    for k in range(shards):
        data = (folder / shard_name(k, shards, compress)).read_bytes()
        out += zstandard.ZstdDecompressor().decompressobj().decompress(data) if compress == "zstd" else data
    return out


def _stages(arc: list[str]) -> list[str]:
    return [st for entry in arc for st in entry.split("+")]


# ---------------------------------------------------------------------------------------------- shape


def test_roles_alternate_counsellor_first_and_turn_counts_stay_in_bounds(sessions, every_length):
    for r in sessions + every_length:
        msgs, meta = r["messages"], r["meta"]
        assert msgs[0] == {"role": "system", "content": SESSION_SYSTEM_PROMPT}
        roles = [m["role"] for m in msgs[1:]]
        assert roles == [("assistant", "user")[i % 2] for i in range(len(roles))], r["id"]
        assert len(roles) == meta["turns"]
        assert len(meta["arc"]) == roles.count("assistant")
        assert all(m["content"].strip() == m["content"] and m["content"] for m in msgs), r["id"]
    assert {r["meta"]["turns"] for r in sessions} == set(range(8, 25))
    assert {r["meta"]["turns"] for r in every_length} == set(range(8, 41))


def test_all_text_is_chinese_with_every_slot_filled(sessions):
    for r in sessions[:500]:
        for m in r["messages"][1:]:
            text = m["content"]
            assert not re.search(r"[A-Za-z{}]", text), text
            han = len(re.findall(r"[\u4e00-\u9fff]", text))
            assert han / len(text) > 0.6, text


def test_intake_names_a_technique_that_fits_its_distortion_and_the_client_says_the_thought(sessions):
    seen_techniques = set()
    for r in sessions:
        intake = r["meta"]["intake"]
        assert intake["distortion"] in DISTORTIONS
        fits = B.TECHNIQUES_FOR[intake["distortion"]] + ("behavioural_activation",)
        assert intake["technique"] in fits
        seen_techniques.add(intake["technique"])
        users = "".join(m["content"] for m in r["messages"] if m["role"] == "user")
        assert f"“{intake['automatic_thought']}。”" in users
        assert intake["setting"] in {x for group in B.SETTINGS.values() for x in group}
    assert seen_techniques == set(B.TECHNIQUES)


def test_sessions_vary(sessions):
    """Composition, not one template: many distinct turns at each stage and no two sessions alike."""
    assert len({dumps(r["messages"]) for r in sessions}) == N
    by_stage: dict[str, set[str]] = {}
    for r in sessions:
        for entry, m in zip(r["meta"]["arc"], [m for m in r["messages"] if m["role"] == "assistant"]):
            by_stage.setdefault(entry, set()).add(m["content"])
    for stage in S.STAGES:
        assert len(by_stage[stage]) > 150, (stage, len(by_stage[stage]))
    openings = {r["messages"][2]["content"] for r in sessions}
    assert len(openings) > 0.9 * N


# ---------------------------------------------------------------------------------------------- the arc


def test_counsellor_turns_follow_the_arc_in_order(sessions, every_length):
    for r in sessions + every_length:
        stages = [st for st in _stages(r["meta"]["arc"]) if st != S.SAFETY]
        ranks = [RANK[st] for st in stages]
        assert ranks == sorted(ranks), (r["id"], r["meta"]["arc"])  # never goes backwards
        assert set(stages) == set(S.STAGES), r["meta"]["arc"]  # short sessions fold stages, never drop them
        assert stages[0] == "agenda" and stages[-1] == "summary"
        assert stages.index("homework") < stages.index("summary")


def test_short_sessions_fold_stages_and_long_ones_add_follow_ups(every_length):
    eight = [r for r in every_length if r["meta"]["turns"] == 8 and not r["meta"]["crisis"]]
    assert eight and all(len(r["meta"]["arc"]) == 4 and any("+" in a for a in r["meta"]["arc"]) for r in eight)
    long = [r for r in every_length if r["meta"]["turns"] >= 30]
    assert all("+" not in "".join(r["meta"]["arc"]) for r in long)
    assert all(max(r["meta"]["arc"].count(s) for s in ("explore", "socratic", "technique")) > 1 for r in long)


def test_plan_arc_folds_homework_into_summary_first_and_never_folds_safety():
    assert S.plan_arc(7, None, 0) == [[s] for s in S.STAGES]
    assert S.plan_arc(6, None, 0)[-1] == ["homework", "summary"]
    assert S.plan_arc(4, None, 0) == [
        ["agenda", "explore"],
        ["identify", "socratic"],
        ["technique"],
        ["homework", "summary"],
    ]
    crisis = S.plan_arc(4, 0, 1)
    assert crisis[:2] == [["agenda"], [S.SAFETY]] and len(crisis) == 4


def test_resistance_appears_in_some_sessions_and_the_counsellor_meets_it(sessions):
    resisted = [r for r in sessions if r["meta"]["resistance_turns"]]
    assert 0.15 * N < len(resisted) < 0.4 * N
    for r in resisted:
        (i,) = r["meta"]["resistance_turns"]
        msgs, arc = r["messages"], r["meta"]["arc"]
        assert msgs[i]["role"] == "user" and re.search("没用|做不到|没什么作用|没办法", msgs[i]["content"])
        reply = msgs[i + 1]["content"]
        assert msgs[i + 1]["role"] == "assistant" and any(k in reply for k in B.MEET_MARKERS)
        k = i // 2  # the counsellor turn that meets it (message i + 1), as an index into arc
        assert arc[k] == arc[k - 1].split("+")[-1] and arc[k] in ("socratic", "technique", "homework")
        assert "？" in reply  # a smaller step is offered as a question, not imposed
        assert msgs[i + 2]["role"] == "user" and msgs[i + 2]["content"].startswith(B.AFTER_MEET[arc[k]])
    calm = [r for r in sessions if not r["meta"]["resistance_turns"]]
    assert not any(re.search("这没用|我做不到", m["content"]) for r in calm for m in r["messages"])


# ---------------------------------------------------------------------------------------------- crisis


def test_every_crisis_disclosure_is_flagged_by_the_guard():
    assert all(detect(text) for text in B.CRISIS_DISCLOSURES)


def test_crisis_sessions_put_safety_first_and_give_the_hotlines(sessions, every_length):
    crisis = [r for r in sessions + every_length if r["meta"]["crisis"]]
    assert 0.06 * N < sum(r["meta"]["crisis"] for r in sessions) < 0.14 * N
    # the generator's own property (the client discloses at crisis_turn, not before), read by the patterns
    guard = CrisisGuard(user_model=None, reply_model=None)
    numbers = [h.number for h in SHOWN_CRISIS_LINES]
    for r in crisis:
        msgs, arc, i = r["messages"], r["meta"]["arc"], r["meta"]["crisis_turn"]
        verdict = guard.check_user_turn(msgs[: i + 1])
        assert verdict.crisis and verdict.latest_turn, msgs[i]["content"]
        assert not any(guard.check_user_turn(msgs[: j + 1]).latest_turn for j in range(2, i, 2))
        safety_turn = msgs[i + 1]["content"]
        assert all(n in safety_turn for n in numbers), safety_turn  # every shown crisis line, from crisis.py
        assert re.search("安全|伤害自己", safety_turn) and "？" in safety_turn  # asks about safety directly
        k = i // 2
        assert arc[k] == S.SAFETY
        stages = _stages(arc)
        first_technique = min(stages.index(s) for s in TECHNIQUE_STAGES if s in stages)
        assert stages.index(S.SAFETY) < first_technique
        summary = next(k for k, a in enumerate(arc) if "summary" in a.split("+"))
        assert numbers[0] in msgs[2 * summary + 1]["content"]  # the summary repeats the national line


def test_non_crisis_sessions_never_trip_the_guard_and_no_counsellor_turn_is_unsafe(sessions):
    for r in sessions[:1000]:  # detect() costs about 0.15 ms a turn
        if not r["meta"]["crisis"]:
            assert r["meta"]["crisis_turn"] is None and S.SAFETY not in r["meta"]["arc"]
            assert not any(detect(m["content"]) for m in r["messages"] if m["role"] == "user"), r["id"]
        assert not any(unsafe_output(m["content"]) for m in r["messages"] if m["role"] == "assistant")


def test_crisis_fraction_zero_gives_no_crisis_sessions():
    assert not any(r["meta"]["crisis"] for r in S.iter_sessions(2, 0, 300, crisis_fraction=0.0))


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_is_byte_identical_on_any_shard_and_worker_count(tmp_path):
    n = 400
    s1 = _run(tmp_path / "one", n, 1)
    one = _concat(tmp_path / "one", 1)
    _run(tmp_path / "three", n, 3)
    assert _concat(tmp_path / "three", 3) == one
    par = _run(tmp_path / "par", n, 4, workers=2, compress="zstd")
    assert par["workers"] == 2 and _concat(tmp_path / "par", 4, "zstd") == one
    assert par["bytes"] < len(one) / 4
    lines = one.decode().splitlines()
    assert len(lines) == n == s1["sessions"]
    assert lines[321] == dumps(S.session_at(5, 321))  # session i does not depend on its neighbours
    assert json.loads(lines[0])["id"] == "session-5-000000000"
    assert S.session_at(6, 321) != S.session_at(5, 321)


def test_summary_counts_match_the_files(tmp_path):
    s = _run(tmp_path, 300, 2, crisis_fraction=0.2, min_turns=10, max_turns=12)
    recs = [json.loads(x) for x in _concat(tmp_path, 2).decode().splitlines()]
    assert json.loads((tmp_path / SUMMARY_NAME).read_text(encoding="utf-8")) == s
    assert (tmp_path / "_SUCCESS").is_file()
    assert s["sessions"] == len(recs) == 300
    assert s["jsonl_bytes"] == len(_concat(tmp_path, 2)) == s["bytes"]  # uncompressed: the same count
    assert s["crisis"] == sum(r["meta"]["crisis"] for r in recs) > 0
    assert s["resistance"] == sum(bool(r["meta"]["resistance_turns"]) for r in recs)
    assert s["mean_turns"] == round(sum(r["meta"]["turns"] for r in recs) / 300, 2)
    assert all(10 <= r["meta"]["turns"] <= 12 for r in recs)
    assert s["stage_turns"]["safety"] == sum(_stages(r["meta"]["arc"]).count("safety") for r in recs)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_sessions_flag_writes_sessions(tmp_path, capsys):
    out = tmp_path / "corpus"
    argv = ["synth", "template", "--sessions", "--num-records", "40", "--num-shards", "2", "--workers", "1"]
    rc = main([*argv, "--max-turns", "12", "--out", str(out), "--seed", "9"])
    assert rc == 0
    assert "sessions/s" in capsys.readouterr().out
    recs = [json.loads(x) for x in _concat(out, 2).decode().splitlines()]
    assert len(recs) == 40 and recs[0]["id"] == "session-9-000000000"
    assert all(8 <= r["meta"]["turns"] <= 12 for r in recs)


@pytest.mark.parametrize(
    ("overrides", "field", "fix"),
    [
        (["synth.min_turns=20", "synth.max_turns=10"], "synth.min_turns", "lower min_turns or raise max_turns"),
        (["synth.min_turns=4"], "synth.min_turns", "greater than or equal to 8"),
        (["synth.max_turns=100"], "synth.max_turns", "less than or equal to 40"),
    ],
)
def test_cli_rejects_bad_turn_bounds_with_one_clear_line(tmp_path, capsys, overrides, field, fix):
    out = tmp_path / "x"
    assert main(["synth", "template", "--sessions", "--out", str(out), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and fix in err
    assert not out.exists()  # failed before any work
