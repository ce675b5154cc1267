"""`cbt-llm guard eval`: how the guard reads a labelled set, so a platform can measure it on its own logs.

For user messages: recall overall, on the acute constructs and per construct; false positives overall, on hard
negatives (every labelled kind but everyday_distress), on ordinary messages (everyday_distress) and per kind
of negative. For model replies: the share of unsafe replies stopped, per harm kind, and of safe replies kept, per
kind. Every rate has its n and a Wilson 95% interval; every miss and every false flag is listed with the layer that
decided it (which patterns, the learned layer or a model tier); a PNG draws the rates with their intervals.

The input is the labelled format of cbt_llm/domain/guard_data/README.md; a bad line is counted and listed with its
reason, never scored.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from cbt_llm.core.fileio import write_text_atomic
from cbt_llm.domain.crisis import ACUTE, CONSTRUCTS, HARM_KINDS
from cbt_llm.domain.guard import CrisisGuard
from cbt_llm.domain.guard_classifier import REPLY_LABELS, USER_LABELS
from evaluation.stats import wilson

UNLABELLED = "unlabelled"  # the kind of a negative or safe line that names none
ORDINARY = "everyday_distress"  # the negative kind of ordinary messages; every other named kind is a hard negative


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci95": [lo, hi] if n else None}


def read_rows(paths: list[str | Path]) -> tuple[list[dict], list[dict]]:
    """(labelled rows, bad lines with their reason) from JSONL files."""
    rows, bad = [], []
    for path in paths:
        for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                ok = isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip()
                label = obj.get("label") if ok else None
                if label not in USER_LABELS and label not in REPLY_LABELS:
                    raise ValueError(f"label '{label}' is not crisis, not_crisis, unsafe or safe" if ok else "no text")
                if label == "crisis" and obj.get("construct") not in CONSTRUCTS:
                    raise ValueError(f"construct '{obj.get('construct')}' unknown")
                if label == "unsafe" and obj.get("harm_kind") not in HARM_KINDS:
                    raise ValueError(f"harm_kind '{obj.get('harm_kind')}' unknown")
            except ValueError as exc:
                bad.append({"file": str(path), "line": i, "reason": str(exc).splitlines()[0]})
                continue
            rows.append({**obj, "_where": f"{path}:{i}"})
    return rows, bad


def evaluate_guard(guard: CrisisGuard, rows: list[dict]) -> dict:
    """The guard's figures on labelled rows, and every miss and false flag (with text: the rows are the caller's)."""
    kinds: dict[str, Counter] = defaultdict(Counter)  # (group) -> Counter of (kind, outcome)
    by_layer: Counter = Counter()
    errors: list[dict] = []
    for r in rows:
        if r["label"] in USER_LABELS:
            v = guard.read_user_text(r["text"])
            flagged, layer, named = v.crisis, v.source, v.construct
            kind = r.get("construct") if r["label"] == "crisis" else r.get("negative_kind") or UNLABELLED
            group = "crisis" if r["label"] == "crisis" else "not_crisis"
        else:
            named, layer = guard.read_reply_text(r["text"])
            flagged = named is not None
            kind = r.get("harm_kind") if r["label"] == "unsafe" else r.get("safe_kind") or UNLABELLED
            group = "unsafe" if r["label"] == "unsafe" else "safe"
        kinds[group][(kind, flagged)] += 1
        if flagged:
            by_layer[f"{group}:{layer}"] += 1
        wrong = flagged != (group in ("crisis", "unsafe"))
        if wrong:
            errors.append({"where": r["_where"], "group": group, "kind": kind, "flagged_by": layer, "named": named,
                           "text": r["text"]})  # fmt: skip
    return {
        "user": _user_figures(kinds),
        "reply": _reply_figures(kinds),
        "flags_by_layer": dict(sorted(by_layer.items())),
        "errors": errors,
    }


def _per_kind(counter: Counter, positive: bool) -> dict:
    """kind -> rate of rows flagged (positive groups) or rows let through (safe replies) or flagged (negatives)."""
    names = sorted({k for k, _ in counter})
    return {k: _rate(counter[(k, positive)], counter[(k, True)] + counter[(k, False)]) for k in names}


def _total(counter: Counter, outcome: bool, only: set[str] | None = None) -> dict:
    rows = [(k, f, n) for (k, f), n in counter.items() if only is None or k in only]
    return _rate(sum(n for _, f, n in rows if f == outcome), sum(n for _, _, n in rows))


def _user_figures(kinds: dict[str, Counter]) -> dict:
    crisis, negatives = kinds.get("crisis", Counter()), kinds.get("not_crisis", Counter())
    hard = {k for k, _ in negatives} - {ORDINARY, UNLABELLED}
    return {
        "recall": _total(crisis, True),
        "recall_acute": _total(crisis, True, set(ACUTE)),
        "recall_by_construct": _per_kind(crisis, True),
        "false_positive_rate": _total(negatives, True),
        "false_positive_rate_hard": _total(negatives, True, hard),
        "false_positive_rate_ordinary": _total(negatives, True, {ORDINARY}),
        "false_positives_by_kind": _per_kind(negatives, True),
    }


def _reply_figures(kinds: dict[str, Counter]) -> dict:
    unsafe, safe = kinds.get("unsafe", Counter()), kinds.get("safe", Counter())
    return {
        "unsafe_stopped": _total(unsafe, True),
        "unsafe_stopped_by_kind": _per_kind(unsafe, True),
        "safe_kept": _total(safe, False),
        "safe_kept_by_kind": _per_kind(safe, False),
    }


def summary_rows(report: dict) -> dict:
    """The headline figures as one table's rows."""

    def fmt(r: dict) -> str:
        if not r["n"]:
            return "-"
        return f"{r['rate']:.3f} ({r['k']}/{r['n']}, 95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f})"

    u, p = report["user"], report["reply"]
    return {
        "crisis recall": fmt(u["recall"]),
        "crisis recall, acute constructs": fmt(u["recall_acute"]),
        "false positives on negatives": fmt(u["false_positive_rate"]),
        "  on hard negatives": fmt(u["false_positive_rate_hard"]),
        "  on ordinary messages": fmt(u["false_positive_rate_ordinary"]),
        "unsafe replies stopped": fmt(p["unsafe_stopped"]),
        "safe replies kept": fmt(p["safe_kept"]),
    }


def plot(report: dict, path: Path) -> Path:
    """One panel per figure family: per construct / negative kind / harm kind / safe kind, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("crisis recall by construct", report["user"]["recall_by_construct"]),
        ("false positives by negative kind", report["user"]["false_positives_by_kind"]),
        ("unsafe replies stopped by kind", report["reply"]["unsafe_stopped_by_kind"]),
        ("safe replies kept by kind", report["reply"]["safe_kept_by_kind"]),
    ]
    panels = [(t, d) for t, d in panels if d]
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(8, 2.2 + 2.4 * len(panels)), squeeze=False)
    for ax, (title, data) in zip(axes[:, 0], panels):
        names = list(data)
        rates = [data[n]["rate"] for n in names]
        lo = [r - data[n]["ci95"][0] for n, r in zip(names, rates)]
        hi = [data[n]["ci95"][1] - r for n, r in zip(names, rates)]
        # the rate and n go in the row's label: written beside the bar they run into the bar and its interval
        labels = [f"{n}  {r:.2f} (n={data[n]['n']})" for n, r in zip(names, rates)]
        ax.barh(labels, rates, xerr=[lo, hi], color="#4c72b0", capsize=3)
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, bad: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """guard_eval.json (figures and bad lines), errors.jsonl (every miss and false flag), guard_eval.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {k: v for k, v in report.items() if k != "errors"}
    paths = {
        "report": write_text_atomic(
            out / "guard_eval.json", json.dumps({**figures, "bad_lines": bad}, ensure_ascii=False, indent=2) + "\n"
        ),
        "errors": write_text_atomic(
            out / "errors.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in report["errors"])
        ),
    }
    paths["plot"] = plot(report, out / "guard_eval.png")
    return paths
