"""Scores of one model's answers, each with its n and a 95% bootstrap interval (evaluation.stats): the reference
metrics (evaluation.reference) and BERTScore (evaluation.bertscore) where a question has a reference answer, CBT
structure by the offline scorer, the safety rates (evaluation.safety), and with a judge its rubric scores of the
answers and the CTRS items of the session transcripts (evaluation.judge). `cbt-llm eval` (evaluation/run.py) and
the generation eval during training (evaluation/intrain.py) both score by these."""

from __future__ import annotations

from cbt_llm.core.config import EvalConfig
from cbt_llm.inference.prompt import Generation
from evaluation import bertscore, reference, safety, sessions, stats
from evaluation.judge import Judge, judge_metrics
from evaluation.questions import EvalQuestion


def _scored(result: dict, ec: EvalConfig) -> dict:
    """The result with its 95% bootstrap interval (None with eval.bootstrap_resamples=0)."""
    if not ec.bootstrap_resamples:
        return {**result, "ci95": None}
    return stats.with_ci(result, resamples=ec.bootstrap_resamples, seed=ec.seed)


def _mean_metric(values: list[float], signature: str, ec: EvalConfig, empty: str = "no answers") -> dict:
    """A metric that is the mean of per-answer values (structure coverage, a 0/1 flag), with its interval."""
    res = {
        "score": sum(values) / len(values) if values else None,
        "n": len(values),
        "per_sample": [float(v) for v in values],
        "signature": signature,
    }
    if not values:
        res["note"] = f"not computed: {empty}"
    return _scored(res, ec)


def _reference_scores(preds: list[str], refs: list[str], ec: EvalConfig) -> dict:
    names = ec.metrics or list(reference.METRICS)
    metrics = {k: _scored(v, ec) for k, v in reference.reference_metrics(preds, refs, names).items()}
    bs = ec.bertscore
    if bs.model_path:
        metrics["bertscore-f1"] = _scored(
            bertscore.bertscore_f1(preds, refs, bs.model_path, bs.layer, batch_size=bs.batch_size), ec
        )
    else:
        metrics["bertscore-f1"] = bertscore.not_computed(
            "no encoder configured (eval.bertscore.model_path); set it to a local bert-base-chinese folder, "
            "layer 8, for the paper-comparable score"
        )
    return metrics


def score_answers(questions: list[EvalQuestion], gens: list[Generation], ec: EvalConfig, scorer) -> tuple[dict, list]:
    """(metrics, per-answer rows) of one model's answers. Failed answers (finish "error") are left out and
    counted; reference metrics use the answers whose question has a reference."""
    pairs = [(q, g) for q, g in zip(questions, gens) if g.finish != "error"]
    with_ref = [(q, g) for q, g in pairs if q.reference]
    metrics = _reference_scores([g.text for _, g in with_ref], [q.reference for q, _ in with_ref], ec)
    rows = [
        {
            "id": q.id,
            "structure": scorer.score(g.text),
            "safety": safety.answer_safety(g.text, q.question, q.description, q.crisis),
        }
        for q, g in pairs
    ]
    st = [r["structure"] for r in rows]
    metrics["structure-coverage"] = _mean_metric([s["coverage"] for s in st], f"{scorer.signature}|coverage 0-5", ec)
    metrics["structure-order"] = _mean_metric(
        [s["order"] for s in st if s["order"] is not None],
        f"{scorer.signature}|order 0-1 over answers with 2+ parts",
        ec,
        "no answer has two or more CBT parts",
    )
    sf = [r["safety"] for r in rows]
    crisis = [f for f in sf if f["crisis"]]
    on_crisis = f"{safety.SIGNATURE}|over crisis-flagged questions"
    none = "no crisis-flagged question among those answered"
    metrics["crisis-support"] = _mean_metric([f["crisis_support"] for f in crisis], on_crisis, ec, none)
    metrics["crisis-hotline"] = _mean_metric([f["hotline"] for f in crisis], on_crisis, ec, none)
    metrics["professional-help"] = _mean_metric([f["professional_help"] for f in sf], safety.SIGNATURE, ec)
    return metrics, rows


def judge_answers(judge: Judge, name: str, questions: list[EvalQuestion], gens: list[Generation], ec: EvalConfig):
    """(judge metrics with intervals, judge facts) of one model's answers; failed answers are not judged."""
    items = [(q.id, q.question, g.text) for q, g in zip(questions, gens) if g.finish != "error"]
    judged, _ = judge.judge(name, items)
    metrics = {k: _scored(v, ec) if v["score"] is not None else v for k, v in judge_metrics(judged, ec.judge).items()}
    return metrics, judged["info"]


def judge_sessions(judge: Judge, name: str, held: list, entry: dict, ec: EvalConfig) -> dict:
    """The CTRS scores of one model's completed sessions into entry["sessions"]; returns Judge.judge's scores."""
    judged, _ = judge.judge(name, sessions.judge_items(held), rubrics=["ctrs"])
    metrics = judge_metrics(judged, ec.judge)
    entry["sessions"]["metrics"] = {k: _scored(v, ec) if v["score"] is not None else v for k, v in metrics.items()}
    entry["sessions"]["judge"] = judged["info"]
    return judged
