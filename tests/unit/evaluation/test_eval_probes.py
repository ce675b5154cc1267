"""The crisis probes of `cbt-llm eval` (evaluation/probes.py): every model answers them after the held-out questions,
the same way and with no guard in the way, and the report gains three rates with Wilson intervals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbt_llm.cli import main
from cbt_llm.core.config import GuardConfig
from cbt_llm.domain.crisis import CONSTRUCTS, CRISIS_SUPPORT_SENTENCE
from cbt_llm.domain.guard import CrisisGuard
from cbt_llm.inference.prompt import Generation
from cbt_llm.inference.safety_model import build_guard
from evaluation import probes, run
from evaluation.stats import wilson
from tests.fixtures.eval import tiny_chat_model
from tests.fixtures.fake_openai_server import FakeOpenAIServer, good_parts
from tests.fixtures.paths import ROOT
from tests.unit.evaluation.test_eval_run import QUESTIONS, write_questions

# what the guard's output check stops: its patterns (secrecy), and what only a later layer reads as unsafe (a dose)
UNSAFE_PATTERN = "你不需要去看心理医生，也别告诉任何人。"
UNSAFE_LEARNED = "吃三十片就够了，不会有什么痛苦。"


def tier_guard() -> CrisisGuard:
    """Patterns and a model tier that flags UNSAFE_LEARNED: a guard whose every verdict a test can predict."""
    return CrisisGuard(
        user_model=None, reply_model=None, model_tier=lambda role, text: (text == UNSAFE_LEARNED, "method_lethality")
    )


PROBES = probes.load_probes()
CRISIS = [p for p in PROBES.probes if p.label == "crisis"]
CALM = [p for p in PROBES.probes if p.label == "not_crisis"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(ROOT)  # the structure scorer artifact (runs/structure_scorer.npz) is shared by the tests


def _answer(question: str) -> str:
    return "\n".join(good_parts(question).values())


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_the_shipped_probe_set():
    assert len(PROBES.probes) == 240 and len(CRISIS) == 120 and len(CALM) == 120
    assert {p.kind for p in CRISIS} == set(CONSTRUCTS)  # the ten risk constructs
    assert len({p.kind for p in CALM}) == 12
    assert len(PROBES.ids) == 240
    assert PROBES.signature.startswith("probes:evaluation/probes/crisis_probe.jsonl sha256:")
    assert PROBES.facts()["guard_in_generation"] is False


def test_score_probes_counts_rates_and_wilson_intervals():
    """Scripted answers: crisis support on 3 crisis probes and 1 hard negative, one unsafe answer of each layer,
    a failed answer left out of every n."""
    gens = [Generation(p.id, CRISIS_SUPPORT_SENTENCE if i < 3 else _answer(p.question), 0, 0, "stop")
            for i, p in enumerate(CRISIS[:10])]  # fmt: skip
    gens += [Generation(p.id, _answer(p.question), 0, 0, "stop") for p in CALM[:8]]
    gens += [
        Generation(CALM[8].id, "别担心。" + CRISIS_SUPPORT_SENTENCE, 0, 0, "stop"),
        Generation(CALM[9].id, UNSAFE_PATTERN, 0, 0, "stop"),
        Generation(CALM[10].id, UNSAFE_LEARNED, 0, 0, "stop"),
        Generation(CALM[11].id, "", 0, 0, "error", error="HTTP 500"),
    ]
    metrics, rows, info = probes.score_probes(PROBES, gens, tier_guard(), "guard-sig")
    support, unsafe, needless = (metrics[m] for m in probes.METRICS)
    assert (support["k"], support["n"], support["score"]) == (3, 10, 0.3)
    assert support["ci95"] == list(wilson(3, 10)) and support["ci_method"] == "wilson|z:1.96"
    assert (unsafe["k"], unsafe["n"]) == (2, 21)  # every answered probe, of both labels
    assert (needless["k"], needless["n"]) == (1, 11)
    assert "guard-sig" in unsafe["signature"] and "safety:v4" in support["signature"]
    assert all("no guard in generation" in m["signature"] for m in metrics.values())
    by_id = {r["id"]: r for r in rows}
    assert (by_id[CALM[9].id]["unsafe"], by_id[CALM[9].id]["unsafe_layer"]) == ("secrecy_discourages_help", "patterns")
    assert by_id[CALM[10].id]["unsafe_layer"] == "model"  # every layer is asked
    assert by_id[CALM[11].id]["finish"] == "error" and "crisis_support" not in by_id[CALM[11].id]
    assert info["n"] == 22 and info["failed"] == 1 and sum(info["unsafe_by_harm"].values()) == 2
    assert info["by_kind"][CRISIS[0].kind]["label"] == "crisis"
    # nothing answered: no rate, never 0 or 1
    empty, _, _ = probes.score_probes(PROBES, [], tier_guard(), "g")
    assert all(m["score"] is None and m["n"] == 0 and "not computed" in m["note"] for m in empty.values())


def test_a_local_model_answers_the_probes_after_the_questions_the_same_way(tmp_path, capsys, monkeypatch):
    """A tiny random model: the probes go through the same generate_all call as the questions, with the same
    system prompt, token limit and batch budget, right after them; probes.jsonl, the three metrics with Wilson
    intervals and the report's table follow. The held-out answers are the same with the probes off."""
    model = tiny_chat_model(tmp_path / "tiny")
    qfile = write_questions(tmp_path / "q.jsonl")
    calls = []
    original = run.generate_all

    def recording(gen, prompts, **kw):
        calls.append(([p.id for p in prompts], [p.messages[0]["content"] for p in prompts], kw))
        return original(gen, prompts, **kw)

    monkeypatch.setattr(run, "generate_all", recording)
    common = ["--model", str(model), "--questions", str(qfile), "eval.check_overlap=false"]
    common += ["eval.max_new_tokens=6", "eval.batch_tokens=12000", "eval.bootstrap_resamples=0"]
    assert main(["eval", *common, "--out", str(tmp_path / "on")]) == 0, capsys.readouterr().err
    assert [c[0] for c in calls] == [[q[0] for q in QUESTIONS], [p.id for p in PROBES.probes]]
    (q_ids, q_system, q_kw), (p_ids, p_system, p_kw) = calls
    assert q_kw == p_kw and q_kw["max_new_tokens"] == 6 and q_kw["batch_tokens"] == 12000
    assert set(q_system) == set(p_system) and len(set(p_system)) == 1  # the model's one system prompt

    res = _results(tmp_path / "on")
    assert res["probes"]["n"] == 240 and res["probes"]["labels"] == {"not_crisis": 120, "crisis": 120}
    (m,) = res["models"].values()
    assert m["probes"]["n"] == 240 and m["probes"]["generation"]["questions"] == 240
    assert m["generation"]["questions"] == len(QUESTIONS)  # the held-out questions' own stats
    for name, n in zip(probes.METRICS, (120, 240, 120)):
        r = m["metrics"][name]
        assert r["n"] == n and 0.0 <= r["score"] <= 1.0 and r["ci95"] == list(wilson(r["k"], n)), name
    rows = _rows(tmp_path / "on" / "probes.jsonl")
    assert [r["id"] for r in rows] == [p.id for p in PROBES.probes]
    assert all(r["model"] == "model" and r["finish"] in ("stop", "length") for r in rows)
    report = (tmp_path / "on" / "report.md").read_text()
    assert "## Crisis probes" in report and "probe-unsafe-reply" in report and "`wilson|z:1.96`" in report

    calls.clear()
    off = ["eval.safety_probes=false", "--out", str(tmp_path / "off")]
    assert main(["eval", *common, *off]) == 0, capsys.readouterr().err
    assert [c[0] for c in calls] == [[q[0] for q in QUESTIONS]]
    res_off = _results(tmp_path / "off")
    (m_off,) = res_off["models"].values()
    assert "probes" not in res_off and "probes" not in m_off
    assert not set(probes.METRICS) & set(m_off["metrics"])
    assert not (tmp_path / "off" / "probes.jsonl").exists()
    assert "Crisis probes" not in (tmp_path / "off" / "report.md").read_text()
    outputs = {r["id"]: r["output"] for r in _rows(tmp_path / "on" / "generations.jsonl")}
    assert outputs == {r["id"]: r["output"] for r in _rows(tmp_path / "off" / "generations.jsonl")}


@pytest.mark.parametrize("learned", [True, False])
def test_predictions_answer_probes_by_id(tmp_path, capsys, learned):
    """--predictions: answers to probe ids are scored as probe answers (not rejected as unknown questions), with
    the guard the config's guard section builds: with the learned layer off, only the patterns' catch counts."""
    qfile = write_questions(tmp_path / "questions.jsonl")
    preds = [{"id": i, "output": _answer(q)} for i, q, _ in QUESTIONS]
    preds += [{"id": p.id, "output": _answer(p.question) + CRISIS_SUPPORT_SENTENCE} for p in CRISIS[:4]]
    preds += [{"id": p.id, "output": _answer(p.question)} for p in CRISIS[4:6]]
    preds += [{"id": CALM[0].id, "output": _answer(CALM[0].question) + CRISIS_SUPPORT_SENTENCE}]
    preds += [{"id": CALM[1].id, "output": UNSAFE_PATTERN}, {"id": CALM[2].id, "output": UNSAFE_LEARNED}]
    pfile = tmp_path / "sys.jsonl"
    pfile.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds), encoding="utf-8")
    out = tmp_path / "eval"
    args = ["--predictions", str(pfile), "--questions", str(qfile), "--out", str(out), "eval.check_overlap=false"]
    assert main(["eval", *args, f"guard.learned={str(learned).lower()}"]) == 0, capsys.readouterr().err
    res = _results(out)
    m = res["models"]["sys"]
    assert res["questions"]["n"] == len(QUESTIONS) and res["questions"]["rejects"] == 0
    assert m["metrics"]["structure-coverage"]["n"] == len(QUESTIONS)  # probes are not held-out answers
    support, unsafe, needless = (m["metrics"][k] for k in probes.METRICS)
    assert (support["k"], support["n"]) == (4, 6)
    assert (needless["k"], needless["n"]) == (1, 3)
    guard = build_guard(GuardConfig(learned=learned))
    flagged = sum(guard.read_reply_text(p["output"])[0] is not None for p in preds if p["id"] in PROBES.ids)
    assert (unsafe["k"], unsafe["n"]) == (flagged, 9) and unsafe["k"] >= 1
    if not learned:
        assert unsafe["k"] == 1  # UNSAFE_PATTERN
    assert ("learned:shipped" if learned else "learned:off") in unsafe["signature"]
    assert m["probes"]["n"] == 9 and m["probes"]["of"] == 240 and m["probes"]["generation"] is None
    assert len(_rows(out / "probes.jsonl")) == 9


def test_predictions_without_probe_ids_leave_the_probe_rates_not_computed(tmp_path, capsys):
    qfile = write_questions(tmp_path / "questions.jsonl")
    pfile = tmp_path / "sys.jsonl"
    pfile.write_text("".join(json.dumps({"id": i, "output": _answer(q)}) + "\n" for i, q, _ in QUESTIONS))
    out = tmp_path / "eval"
    args = ["--predictions", str(pfile), "--questions", str(qfile), "--out", str(out), "eval.check_overlap=false"]
    assert main(["eval", *args]) == 0, capsys.readouterr().err
    m = _results(out)["models"]["sys"]
    for name in probes.METRICS:
        assert m["metrics"][name]["score"] is None and "answers no probe" in m["metrics"][name]["note"]
    assert "answers no probe" in (out / "report.md").read_text()


def test_an_endpoint_model_answers_the_probes_unguarded(tmp_path, capsys):
    """An endpoint whose answer to one probe is unsafe: the answer is kept verbatim (no guard in the way) and
    counted by the output check; the probes are asked after the questions."""
    qfile = write_questions(tmp_path / "questions.jsonl")
    target = CALM[0]
    with FakeOpenAIServer(plan={target.question: f"always:say:{UNSAFE_PATTERN}"}, default="good_text") as srv:
        out = tmp_path / "eval"
        args = ["--questions", str(qfile), "--out", str(out), "eval.check_overlap=false"]
        assert main(["eval", *args, f'eval.models=[{{"name": "api", "endpoint": "{srv.base_url}"}}]']) == 0
        users = [r["user"] for r in srv.requests]
    assert len(users) == len(QUESTIONS) + 240
    assert all(any(q[1] in u for u in users[: len(QUESTIONS)]) for q in QUESTIONS)  # the questions first
    rows = {r["id"]: r for r in _rows(out / "probes.jsonl")}
    assert rows[target.id]["output"] == UNSAFE_PATTERN and rows[target.id]["unsafe"] == "secrecy_discourages_help"
    unsafe = _results(out)["models"]["api"]["metrics"]["probe-unsafe-reply"]
    assert unsafe["n"] == 240 and unsafe["k"] >= 1
    capsys.readouterr()


def test_wilson_ends_are_exactly_0_and_1_at_none_and_all():
    """At k = n the upper end is 1.0, not 1 - 1e-16 (a plot's error bar below its own rate fails to draw)."""
    for n in range(1, 400):
        assert wilson(n, n)[1] == 1.0 and wilson(0, n)[0] == 0.0
        lo, hi = wilson(n // 2, n)
        assert lo <= (n // 2) / n <= hi
