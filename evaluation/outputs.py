"""The eval's report files from its results dict: results.json, report.md, scores.png, the terminal table and the W&B
run.

The results dict, as `cbt-llm eval` (evaluation/run.py) builds it:

    results = {
        "questions": {"source": str, "n": int, "rejects": int},
        "models": {                             # insertion order is column order
            "<model name>": {
                "kind": "folder" | "base+adapter" | "endpoint" | "predictions",
                "backend": "transformers" | "vllm" | "endpoint" | "none",
                "generation": {"questions", "new_tokens", "seconds", "tokens_per_s"} | None,
                "metrics": {                    # name -> result
                    "<metric>": {"score": float | None, "n": int, "ci95": [lo, hi] | None, "signature": str,
                                 ["per_sample": [...]], ["note": str], ["ci_method": str], ...},
                },
            },
        },
        "examples": [                           # up to 3
            {"id": str, "question": str,
             "answers": {"<model name>": {"text": str, "labels": [[segment_text, part_label], ...]}}},
        ],
    }

With eval.safety_probes (evaluation/probes.py) the results also have "probes": {"source", "sha256", "n", "labels",
"kinds", "guard_in_generation"}, and each model a "probes" entry: {"n", "of", "failed", "generation", "by_kind":
{kind: {"label", "n", "crisis_support", "unsafe"}}, "unsafe_by_harm"}, besides its three probe metrics; report.md
shows the rates by kind in a table of their own.

With held-out preference pairs the results also have "pairs": {"source", "sha256", "n", "rejects"}.

With --sessions (evaluation/sessions.py) the results also have "sessions": {"source", "n", "rejects", "turns",
"client", "max_new_tokens", "system_prompt_from", "decoding"}, and each model a "sessions" entry: {"n", "completed",
"failed": {"client", "model"}, "turns", "new_tokens", "guard": {"model_turns", "crisis_turns", "disclosures",
"crisis_sessions", "replaced", "replaced_by_reason"}, "metrics": {"judge-ctrs-total" (0-36) and
"judge-ctrs-<item>" (0-6), results as above}, ["judge": as a model's "judge"]}. report.md shows them in a table of
their own beside the single-turn scores.

Metric names: the reference metrics under evaluation.reference.METRICS ("bleu-4", "bleu-corpus", "rouge-1",
"rouge-2", "rouge-l", "meteor", "distinct-1", "distinct-2", "length"), "bertscore-f1" (evaluation/bertscore.py),
"structure-coverage" (0-5 parts) and "structure-order" (0-1), the safety rates "crisis-support",
"crisis-hotline" and "professional-help" (0-1), the crisis probes' "probe-crisis-support", "probe-unsafe-reply" and
"probe-needless-crisis" (0-1, Wilson intervals: their "ci_method" says so), with held-out preference pairs
(evaluation/preference.py) "pref-accuracy" (0-1, Wilson interval; not computed for endpoints and predictions), and
with an LLM judge
(evaluation/judge.py) "judge-cbt-total" (0-18) with "judge-cbt-<criterion>", and "judge-counselling-mean" (1-10)
with "judge-counselling-<quality>"; a judged model also has "judge": {"model", "rubrics", "repeats", "usage",
"failures", "http_errors", "agreement"}. A score of None means not computed; its note says why (a bertscore
not_computed note starts "not computed: "). Other metric names are shown after these, on the 0-100 panel of the
plot unless listed in SCALES.

The per-generation rows that log_wandb puts in its samples table, one list per model:

    {"id": str, "question": str, "answer": str,
     "structure": StructureScorer.score(answer) | None,   # its "coverage" is used
     "safety": evaluation.safety.answer_safety(...) | None}  # crisis, crisis_support, hotline, professional_help

Only these fields reach W&B; results hold no endpoint URLs or keys, so none can be logged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cbt_llm.core.fileio import write_text_atomic
from cbt_llm.domain.rubrics import RUBRICS as JUDGE_RUBRICS
from evaluation.reference import METRICS as REFERENCE_METRICS

RATES = ("crisis-support", "crisis-hotline", "professional-help")
PROBE_RATES = ("probe-crisis-support", "probe-unsafe-reply", "probe-needless-crisis")
JUDGE_CBT = tuple(f"judge-cbt-{k}" for k in JUDGE_RUBRICS["cbt"].keys)
JUDGE_COUNSELLING = tuple(f"judge-counselling-{k}" for k in JUDGE_RUBRICS["counselling"].keys)
SESSION_METRICS = ("judge-ctrs-total", *(f"judge-ctrs-{k}" for k in JUDGE_RUBRICS["ctrs"].keys))
ORDER: tuple[str, ...] = (
    *REFERENCE_METRICS[:6],  # bleu-4 ... meteor
    "bertscore-f1",
    *REFERENCE_METRICS[6:],  # distinct-1, distinct-2, length
    "structure-coverage",
    "structure-order",
    *RATES,
    *PROBE_RATES,
    "pref-accuracy",
    "judge-cbt-total",
    *JUDGE_CBT,
    "judge-counselling-mean",
    *JUDGE_COUNSELLING,
)
# The plot's panels, one per scale, so no bar is read against another scale's axis; unlisted metrics are x100.
SCALES: dict[str, str] = {
    "length": "characters",
    "structure-coverage": "parts (0-5)",
    "structure-order": "fraction (0-1)",
    **{rate: "fraction (0-1)" for rate in (*RATES, *PROBE_RATES, "pref-accuracy")},
    "judge-cbt-total": "CBT judge total (0-18)",
    **{m: "CBT judge criteria (0-4)" for m in JUDGE_CBT},
    **{m: "counselling judge (1-10)" for m in ("judge-counselling-mean", *JUDGE_COUNSELLING)},
}
PERCENT = "score (0-100)"
JUDGE_PANELS = ("CBT judge total (0-18)", "CBT judge criteria (0-4)", "counselling judge (1-10)")
PANELS = (PERCENT, "characters", "parts (0-5)", "fraction (0-1)", *JUDGE_PANELS)
_LIMITS = {PERCENT: 100.0, "parts (0-5)": 5.0, "fraction (0-1)": 1.0, **dict(zip(JUDGE_PANELS, (18.0, 4.0, 10.0)))}
_DIGITS = {PERCENT: 2, "characters": 1, "parts (0-5)": 2, "fraction (0-1)": 3, **dict.fromkeys(JUDGE_PANELS, 2)}
NOT_COMPUTED = "not computed: "


# ---- results.json -----------------------------------------------------------------------------------------------


def _without_per_sample(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_per_sample(v) for k, v in obj.items() if k != "per_sample"}
    if isinstance(obj, list):
        return [_without_per_sample(v) for v in obj]
    return obj


def write_results_json(path: str | Path, results: dict) -> None:
    """results.json: the results dict without the per-answer score lists (they are the bulk and nobody reads them
    there; the intervals drawn from them stay), UTF-8 with Chinese as is, written atomically."""
    text = json.dumps(_without_per_sample(results), ensure_ascii=False, indent=2)
    write_text_atomic(path, text + "\n")


# ---- shared formatting ------------------------------------------------------------------------------------------


def metric_names(results: dict) -> list[str]:
    """Every metric any model has, in ORDER first, then the others in the order they first appear."""
    seen: dict[str, None] = {}
    for entry in results["models"].values():
        seen.update(dict.fromkeys(entry.get("metrics", {})))
    return [m for m in ORDER if m in seen] + [m for m in seen if m not in ORDER]


def _result(results: dict, model: str, metric: str) -> dict | None:
    return results["models"][model].get("metrics", {}).get(metric)


def _scale(metric: str) -> str:
    return SCALES.get(metric, PERCENT)


def _num(metric: str, value: float) -> str:
    return f"{value:.{_DIGITS[_scale(metric)]}f}"


def _reason(result: dict) -> str:
    note = result.get("note") or "no score"
    return note[len(NOT_COMPUTED) :] if note.startswith(NOT_COMPUTED) else note


def _md(text: str) -> str:
    """Text that stays inside one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _cell(metric: str, result: dict | None) -> str:
    if result is None:
        return "-"
    if result.get("score") is None:
        return f"not computed ({_md(_reason(result))})"
    text = _num(metric, result["score"])
    if result.get("ci95"):
        lo, hi = result["ci95"]
        text += f" [{_num(metric, lo)}, {_num(metric, hi)}]"
    return f"{text} (n={result.get('n', '?')})"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


# ---- report.md --------------------------------------------------------------------------------------------------


def _scores_section(results: dict, models: list[str]) -> list[str]:
    rows = [[m, *(_cell(m, _result(results, name, m)) for name in models)] for m in metric_names(results)]
    lines = ["## Scores", ""] + _table(["metric", *map(_md, models)], rows)
    return lines + [
        "",
        "Cells: score [95% interval] (n). Reference metrics and BERTScore are x100, length is characters, "
        "structure-coverage counts CBT parts (0-5), structure-order, the safety rates and pref-accuracy (the share "
        "of held-out pairs whose chosen answer has the higher mean log-probability per token) are fractions (0-1); "
        "judge-cbt-total is the LLM judge's 0-18 CBT total (its criteria 0-1 to 0-4 as in their signatures), "
        "judge-counselling-* are 1-10 ratings. Corpus-level metrics (bleu-corpus, distinct-n) have no interval.",
    ]


def _probes_section(results: dict, models: list[str]) -> list[str]:
    """The crisis probes by kind: per model, how many of each kind's answers gave crisis support and how many the
    guard's output check flags (the rates over all of them are in the score table)."""
    facts = results.get("probes")
    held = {name: results["models"][name].get("probes") or {} for name in models}
    if not facts or not any(h.get("by_kind") for h in held.values()):
        return []
    kinds = {k: v["label"] for h in held.values() for k, v in (h.get("by_kind") or {}).items()}
    order = sorted(kinds, key=lambda k: (kinds[k] != "crisis", k))

    def cell(name: str, kind: str) -> str:
        k = (held[name].get("by_kind") or {}).get(kind)
        return "-" if k is None else f"{k['crisis_support']}/{k['n']} support, {k['unsafe']} unsafe"

    rows = [[_md(k), kinds[k], *(cell(name, k) for name in models)] for k in order]
    head = (
        f"{facts.get('n', '?')} probes from `{_md(facts.get('source', '?'))}` "
        f"({', '.join(f'{v} {k}' for k, v in (facts.get('labels') or {}).items())}), answered with no guard in the "
        "way: the models' own behaviour. Support: the answer gives crisis support (wanted for crisis, needless for "
        "not_crisis); unsafe: the guard's output check flags the answer."
    )
    return ["## Crisis probes", "", head, ""] + _table(["kind", "label", *map(_md, models)], rows)


def _models_section(results: dict, models: list[str]) -> list[str]:
    rows = []
    for name in models:
        entry = results["models"][name]
        gen = entry.get("generation") or {}
        rows.append(
            [
                _md(name),
                entry.get("kind", "-"),
                entry.get("backend", "-"),
                *(f"{gen[k]:,}" if isinstance(gen.get(k), int) else "-" for k in ("questions", "new_tokens")),
                *(f"{gen[k]:,.1f}" if gen.get(k) is not None else "-" for k in ("seconds", "tokens_per_s")),
            ]
        )
    header = ["model", "kind", "backend", "questions", "new tokens", "seconds", "tokens/s"]
    return ["## Models", ""] + _table(header, rows)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _judge_section(results: dict, models: list[str]) -> list[str]:
    """The judge model, its rubric versions, tokens, failures and (with repeats) its agreement with itself."""
    judged = {name: j for name in models if (j := results["models"][name].get("judge"))}
    if not judged:
        return []
    lines = ["## LLM judge", ""]
    for name, j in judged.items():
        rubrics = ", ".join(f"`{v}`" for v in j.get("rubrics", {}).values())
        u = j.get("usage", {})
        lines.append(
            f"- {_md(name)}: judge `{_md(j.get('model', '?'))}`, rubrics {rubrics}, repeats {j.get('repeats', 1)}; "
            f"{u.get('requests', 0)} requests ({u.get('prompt_tokens', 0):,} prompt + "
            f"{u.get('completion_tokens', 0):,} completion tokens), {u.get('cached', 0)} from the cache; "
            f"{j.get('failures', 0)} unusable replies, {j.get('http_errors', 0)} failed requests (not scored)"
        )
        for rubric, a in (j.get("agreement") or {}).items():
            exact = ", ".join(f"{k} {_fmt(v, 2)}" for k, v in a.get("exact", {}).items())
            lines.append(
                f"  - agreement {rubric} (repeat 1 vs 2, n={a.get('n')}): Pearson r {_fmt(a.get('pearson'))}, "
                f"mean |difference| {_fmt(a.get('mean_abs_diff'), 2)}; exact per criterion: {exact}"
            )
    return lines


def _sessions_section(results: dict, models: list[str]) -> list[str]:
    """The session evaluation beside the single-turn scores: CTRS per item and total, then what happened in the
    sessions (completed, failed, the guard's work), one column per model."""
    facts = results.get("sessions")
    held = {name: results["models"][name].get("sessions") or {} for name in models}
    if not facts or not any(held.values()):
        return []
    head = (
        f"{facts.get('n', '?')} sessions per model from `{_md(facts.get('source', '?'))}`, {facts.get('turns', '?')} "
        f"model turns each (the client speaks first), client simulator `{_md(facts.get('client', '?'))}`, greedy; "
        "the crisis guard around every model turn, as on the server. The judge reads the transcript as shown. CTRS "
        "items 0-6, total 0-36."
    )
    rows = [[m, *(_cell(m, held[n].get("metrics", {}).get(m)) for n in models)] for m in SESSION_METRICS]
    counts = (
        ("completed", lambda h: f"{h.get('completed', 0)} of {h.get('n', 0)}"),
        (
            "failed: client / model",
            lambda h: f"{h.get('failed', {}).get('client', 0)} / {h.get('failed', {}).get('model', 0)}",
        ),
        ("guard: model turns in crisis mode", lambda h: str(h.get("guard", {}).get("crisis_turns", 0))),
        ("guard: sessions in crisis mode", lambda h: str(h.get("guard", {}).get("crisis_sessions", 0))),
        ("guard: model outputs replaced", lambda h: str(h.get("guard", {}).get("replaced", 0))),
        ("new tokens", lambda h: f"{h.get('new_tokens', 0):,}"),
    )
    rows += [[label, *(fmt(held[n]) if held[n] else "-" for n in models)] for label, fmt in counts]
    totals = {n: r for n in models if (r := held[n].get("metrics", {}).get("judge-ctrs-total"))}
    sigs = dict.fromkeys(f"`{r.get('signature')}`" for r in totals.values())
    notes = [f"- {_md(n)}: {_md(r['note'])}" for n, r in totals.items() if r.get("note") and r.get("score") is not None]
    tail = ["", f"Signature: {', '.join(sigs)}", *notes] if sigs else []
    return ["## Sessions", "", head, ""] + _table(["metric", *map(_md, models)], rows) + tail


def _notes_section(results: dict, models: list[str]) -> list[str]:
    """Notes on computed scores (a score of None has its reason in its table cell already)."""
    notes = [
        f"- {name} / {m}: {r['note']}"
        for m in metric_names(results)
        for name in models
        if (r := _result(results, name, m)) and r.get("note") and r.get("score") is not None
    ]
    return ["## Notes", "", *notes] if notes else []


def _signatures_section(results: dict, models: list[str]) -> list[str]:
    lines, methods = ["## Signatures", ""], {}
    for m in metric_names(results):
        found = {name: r for name in models if (r := _result(results, name, m))}
        sigs = {name: r.get("signature") for name, r in found.items()}
        methods.update(dict.fromkeys(r["ci_method"] for r in found.values() if r.get("ci_method")))
        if len(set(sigs.values())) == 1:
            lines.append(f"- {m}: `{next(iter(sigs.values()))}`")
        else:
            lines.append(f"- {m}: " + "; ".join(f"{name} `{sig}`" for name, sig in sigs.items()))
    return lines + [f"- intervals: `{method}`" for method in methods]


def _quote(text: str) -> list[str]:
    """A blockquote keeping the text's lines apart (markdown would run consecutive quoted lines together)."""
    lines = [f"> {line}" for line in (text or "").splitlines() if line.strip()] or ["> (empty)"]
    return [x for line in lines for x in (line, ">")][:-1]


def _examples_section(results: dict, models: list[str]) -> list[str]:
    lines = []
    for k, ex in enumerate(results.get("examples") or [], 1):
        lines += ["", f"### {k}. {ex.get('id', '')}", "", "**Question**", "", *_quote(ex.get("question", ""))]
        for name in models:
            answer = ex.get("answers", {}).get(name)
            if answer is None:
                continue
            lines += ["", f"**{name}**", "", *_quote(answer.get("text", ""))]
            labels = answer.get("labels") or []
            if labels:
                lines += [""] + _table(["segment", "CBT part"], ([_md(s), _md(p)] for s, p in labels))
    return ["## Examples", *lines] if lines else []


def render_report_md(results: dict) -> str:
    """report.md: the side-by-side score table (one row per metric, one column per model), the models' generation
    throughput, every metric's notes and signature, then the examples with each model's answer and its segments'
    CBT-part labels."""
    models = list(results["models"])
    q = results.get("questions", {})
    head = [
        "# CBT-LLM evaluation",
        "",
        f"Questions: `{q.get('source', '?')}`, n = {q.get('n', '?')} ({q.get('rejects', 0)} rejected).",
    ]
    pairs = results.get("pairs")
    if pairs:
        head += [
            "",
            f"Preference pairs (pref-accuracy): `{pairs.get('source', '?')}`, n = {pairs.get('n', '?')} "
            f"({pairs.get('rejects', 0)} rejected).",
        ]
    sections = [
        head,
        _scores_section(results, models),
        _probes_section(results, models),
        _sessions_section(results, models),
        _models_section(results, models),
        _judge_section(results, models),
        _notes_section(results, models),
        _signatures_section(results, models),
        _examples_section(results, models),
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


# ---- terminal ---------------------------------------------------------------------------------------------------


def summary_rows(results: dict) -> dict[str, str]:
    """Rows for cbt_llm.core.report.print_summary: "model" -> the model names, then each metric -> its scores, then the
    generation's new tokens and tokens/s ("-" for predictions), columns padded to one width so the right-aligned
    strings line up as a side-by-side table ("n/c": not computed)."""
    models = list(results["models"])
    cells: dict[str, list[str]] = {"model": models}
    for m in metric_names(results):
        row = []
        for name in models:
            r = _result(results, name, m)
            row.append("-" if r is None else "n/c" if r.get("score") is None else _num(m, r["score"]))
        cells[m] = row
    held = [results["models"][name].get("sessions") for name in models]
    if any(held):
        total = [((h or {}).get("metrics") or {}).get("judge-ctrs-total") for h in held]
        cells["sessions: ctrs-total"] = [
            "-" if r is None else "n/c" if r["score"] is None else f"{r['score']:.2f}" for r in total
        ]
        cells["sessions: crisis turns"] = ["-" if h is None else str(h["guard"]["crisis_turns"]) for h in held]
    for key, label, fmt in (("new_tokens", "new tokens", "{:,.0f}"), ("tokens_per_s", "new tokens/s", "{:,.1f}")):
        gens = [results["models"][name].get("generation") or {} for name in models]
        cells[label] = [fmt.format(g[key]) if g.get(key) is not None else "-" for g in gens]
    widths = [max(len(row[i]) for row in cells.values()) for i in range(len(models))]
    return {k: " | ".join(c.rjust(w) for c, w in zip(row, widths)) for k, row in cells.items()}


# ---- scores.png -------------------------------------------------------------------------------------------------


def _panel_bars(ax, results: dict, models: list[str], metrics: list[str], panel: str) -> None:
    width = 0.8 / len(models)
    for i, name in enumerate(models):
        xs, ys, err = [], [], [[], []]
        for j, m in enumerate(metrics):
            r = _result(results, name, m)
            if not r or r.get("score") is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(r["score"])
            ci = r.get("ci95")
            # no interval (corpus-level metrics): NaN, for which matplotlib draws no error bar
            err[0].append(max(r["score"] - ci[0], 0.0) if ci else math.nan)
            err[1].append(max(ci[1] - r["score"], 0.0) if ci else math.nan)
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=name, color=f"C{i}")
    ax.set_xticks(range(len(metrics)), metrics, rotation=45, ha="right")
    ax.set_title(panel, fontsize=9)
    ax.set_ylim(0, _LIMITS[panel] * 1.05 if panel in _LIMITS else None)
    ax.grid(axis="y", alpha=0.3)


def plot_scores(results: dict, path: str | Path) -> None:
    """scores.png: grouped bars, one bar per model, 95% intervals as error bars, one panel per scale (x100 scores,
    characters, CBT parts 0-5, fractions 0-1) with its full range as the y axis; None scores are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    computed = [
        m for m in metric_names(results) if any((_result(results, n, m) or {}).get("score") is not None for n in models)
    ]
    panels = [(p, [m for m in computed if _scale(m) == p]) for p in PANELS]
    panels = [(p, ms) for p, ms in panels if ms]
    if not panels:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no scores computed", ha="center", va="center")
        ax.axis("off")
    else:
        ratios = [max(len(ms), 1.5) for _, ms in panels]
        fig, axes = plt.subplots(
            1, len(panels), figsize=(2 + 0.7 * sum(ratios), 4.5), gridspec_kw={"width_ratios": ratios}, squeeze=False
        )
        for ax, (panel, ms) in zip(axes[0], panels):
            _panel_bars(ax, results, models, ms, panel)
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- W&B --------------------------------------------------------------------------------------------------------

SAMPLE_COLUMNS = ["id", "question", "model", "answer", "coverage", "crisis", "crisis_support", "hotline",
                  "professional_help"]  # fmt: skip


def _sample_rows(generations: dict[str, list[dict]]) -> list[list]:
    rows = []
    for model, gens in generations.items():
        for g in gens:
            structure, safety = g.get("structure") or {}, g.get("safety") or {}
            flags = [safety.get(k) for k in ("crisis", "crisis_support", "hotline", "professional_help")]
            rows.append([g.get("id"), g.get("question"), model, g.get("answer"), structure.get("coverage"), *flags])
    return rows


def log_wandb(results: dict, generations: dict[str, list[dict]], cfg_wandb, run_name: str, out_dir) -> None:
    """One W&B run for the eval, started as train/metrics.py starts its runs (WANDB_MODE wins over
    cfg_wandb.mode; nothing when disabled; its files under <out_dir>/wandb): the config is the questions and each
    model's kind, backend and generation numbers; the summary has "<model>/<metric>" for every computed score
    (and "<model>/<metric>/ci95_lo" and "/ci95_hi"); a "samples" table has one row per model and question; and
    scores.png, when out_dir has it, is logged as an image."""
    mode = os.environ.get("WANDB_MODE") or cfg_wandb.mode
    if mode == "disabled":
        return
    import wandb

    config = {
        "questions": results.get("questions"),
        "models": {
            name: {k: entry.get(k) for k in ("kind", "backend", "generation")}
            for name, entry in results["models"].items()
        },
    }
    run = wandb.init(
        project=cfg_wandb.project,
        entity=cfg_wandb.entity or None,
        name=run_name or None,
        tags=cfg_wandb.tags or None,
        dir=str(out_dir),
        mode=mode,
        job_type="eval",
        config=config,
    )
    try:
        for name, entry in results["models"].items():
            session_metrics = (entry.get("sessions") or {}).get("metrics", {})
            scored = [*entry.get("metrics", {}).items(), *((f"sessions/{m}", r) for m, r in session_metrics.items())]
            for metric, r in scored:
                if r.get("score") is None:
                    continue
                run.summary[f"{name}/{metric}"] = r["score"]
                if r.get("ci95"):
                    run.summary[f"{name}/{metric}/ci95_lo"], run.summary[f"{name}/{metric}/ci95_hi"] = r["ci95"]
        logged = {"samples": wandb.Table(columns=SAMPLE_COLUMNS, data=_sample_rows(generations))}
        png = Path(out_dir) / "scores.png"
        if png.exists():
            logged["scores"] = wandb.Image(str(png))
        run.log(logged)
    finally:
        run.finish()
