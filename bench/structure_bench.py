"""Build the CBT-structure scorer (cbt_llm/domain/structure.py) and measure it on text it never trained on.

    python bench/structure_bench.py                        # build runs/structure_scorer.npz, measure, report
    python bench/structure_bench.py --out my_scorer.npz    # save the scorer elsewhere

What it measures:

- hand-written answers (tests/data/structure_handwritten.jsonl: 8 `dev` answers used in design, 32 `test` answers, 12
  `fresh` answers written after the first scorer was frozen, 45 `heldout2` answers written before the second round of
  changes and measured once after it, then design data for the third; `heldout3`, written after scorer v3 was frozen,
  measured once, then design data for v4; and `heldout4`, written after scorer v4 was frozen, the held-out set of the
  shipped scorer): per-label segment accuracy (recall) and precision, each answer decoded on its own; the same on the
  shuffled variants (what the order prior costs when the order breaks) and with every answer written as one paragraph
  and labelled sentence by sentence; per part, whether "present" is called right over every variant of every answer
  (as written, each part removed, shuffled, two removed and shuffled); coverage exact-match and error; order agreement
  error. For the scorer we ship (corpus + seed bank + order prior) and, to show what each adds, one that labels every
  segment on its own (no order prior) and one trained on the template corpus alone. Per split, the longest substring
  any seed-bank exemplar shares with its segments.
- PsyQA's human answers (../shared/data/psyqa_example.json, when present): they were not written to the CBT
  structure, so this reports what the scorer says, not an accuracy: coverage, parts present, order, and how
  the scorer's labels line up with PsyQA's own strategy labels (labels_sequence spans).

Writes bench/results/structure.json and prints markdown tables for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbt_llm.domain.cbt import CBT_PARTS  # noqa: E402
from cbt_llm.domain.structure import LABELS, ORDER_PRIOR, StructureScorer  # noqa: E402
from data_pipeline.synth.scorer import seed_bank, train_scorer  # noqa: E402
from evaluation.scorer_eval import evaluate_scorer, longest_shared  # noqa: E402

ANSWERS = ROOT / "tests" / "data" / "structure_handwritten.jsonl"
PSYQA = ROOT.parent / "shared" / "data" / "psyqa_example.json"
OUT = ROOT / "bench" / "results" / "structure.json"
SPLITS = ("heldout4", "heldout3", "heldout2", "test", "fresh", "dev")  # those the answers file holds are measured


def _rel(path: Path) -> str:
    """A path as the results file gives it: relative to the repository (../ for shared/), never a home path."""
    path = Path(path).resolve()
    if path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    return f"../{path.relative_to(ROOT.parent)}" if path.is_relative_to(ROOT.parent) else str(path)


def _mean_se(xs: list[float]) -> dict:
    n = len(xs)
    return {
        "n": n,
        "mean": statistics.fmean(xs) if n else None,
        "se": statistics.stdev(xs) / n**0.5 if n > 1 else None,
    }


def psyqa_report(scorer: StructureScorer, path: Path) -> dict:
    """What the scorer says about PsyQA's human answers, and its labels against PsyQA's strategy labels."""
    data = json.loads(path.read_text(encoding="utf-8"))
    scores = [scorer.score(a["answer_text"]) for q in data for a in q["answers"] if a.get("answer_text", "").strip()]
    cross: dict[str, Counter] = {}
    for q in data:
        for a in q["answers"]:
            text = a.get("answer_text") or ""
            spans = [s for s in a.get("labels_sequence") or [] if s and s.get("type")]
            labels = scorer.label([text[s["start"] : s["end"]] for s in spans])
            for s, lab in zip(spans, labels):
                cross.setdefault(s["type"], Counter())[lab] += 1
    orders = [s["order"] for s in scores if s["order"] is not None]
    return {
        "file": _rel(path),
        "answers": len(scores),
        "segments_per_answer": _mean_se([len(s["segments"]) for s in scores]),
        "coverage": _mean_se([s["coverage"] for s in scores]),
        "coverage_histogram": {k: sum(s["coverage"] == k for s in scores) for k in range(6)},
        "part_present": {p: sum(p in s["parts"] for s in scores) / len(scores) for p in CBT_PARTS},
        "order": _mean_se(orders),
        "segment_labels": dict(Counter(seg["label"] for s in scores for seg in s["segments"])),
        "psyqa_strategy_vs_ours": {t: dict(c) for t, c in sorted(cross.items())},
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _split_table(split: str, t: dict) -> None:
    print(
        f"\n{split}: {t['answers']} answers, {t['segments']['n']} segments, segment accuracy "
        f"{_pct(t['segments']['accuracy'])}%; coverage exact {_pct(t['coverage']['exact'])}% "
        f"(MAE {t['coverage']['mae']:.3f}, n={t['coverage']['n']} variants); order MAE "
        f"{t['order']['mae']:.3f} (n={t['order']['n']})\n"
    )
    print(
        "| label | segments n | accuracy (recall) % | precision % | shuffled: accuracy % | as sentences: n | "
        "accuracy % | presence n | presence accuracy % |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for lab in LABELS:
        s = t["segments"]["per_label"].get(lab)
        if not s or not s["n"]:
            continue
        sh, se = t["shuffled"]["per_label"][lab], t["sentences"]["per_label"][lab]
        pres = t["presence"].get(lab, {"n": "", "accuracy": None})
        print(
            f"| {lab} | {s['n']} | {_pct(s['accuracy'])} | {_pct(s['precision'])} | {_pct(sh['accuracy'])} | "
            f"{se['n']} | {_pct(se['accuracy'])} | {pres['n']} | {_pct(pres['accuracy']) if lab != 'other' else ''} |"
        )
    print(
        f"\nall labels: segments {_pct(t['segments']['accuracy'])}%, shuffled {_pct(t['shuffled']['accuracy'])}% "
        f"(n={t['shuffled']['n']}), as sentences {_pct(t['sentences']['accuracy'])}% (n={t['sentences']['n']})"
    )


def print_tables(res: dict) -> None:
    for name, r in res["handwritten"].items():
        print(f"\n### {name}: {r['signature']} (trained in {r['train_s']} s)")
        for split in res["splits"]:
            _split_table(split, r[split])
    print("\nlongest substring a seed-bank exemplar shares with a split's segments:")
    for split, b in res["bank_shared"].items():
        print(f"- {split}: {b['chars']} characters ('{b['substring']}')")
    if res.get("psyqa"):
        p = res["psyqa"]
        print(f"\n### PsyQA human answers ({p['answers']})\n")
        print(
            f"coverage mean {p['coverage']['mean']:.2f} (se {p['coverage']['se']:.2f}), histogram "
            f"{p['coverage_histogram']}; order mean {p['order']['mean']:.2f} (n={p['order']['n']}); parts present "
            + ", ".join(f"{k} {_pct(v)}%" for k, v in p["part_present"].items())
        )
        print("\n| PsyQA strategy | " + " | ".join(LABELS) + " |")
        print("|---|" + "---|" * len(LABELS))
        for t, c in p["psyqa_strategy_vs_ours"].items():
            print(f"| {t} | " + " | ".join(str(c.get(lab, 0)) for lab in LABELS) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "structure_scorer.npz"), help="where to save the scorer")
    ap.add_argument(
        "--records",
        type=int,
        default=None,
        help="train on this many records the generator writes today (default: the frozen corpus, as shipped)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--answers", default=str(ANSWERS))
    ap.add_argument("--psyqa", default=str(PSYQA))
    ap.add_argument("--results", default=str(OUT))
    args = ap.parse_args()

    answers = [json.loads(line) for line in Path(args.answers).read_text(encoding="utf-8").splitlines() if line]
    splits = [s for s in SPLITS if any(a["split"] == s for a in answers)]
    res: dict = {"host": platform.node(), "python": platform.python_version(), "splits": splits, "handwritten": {}}
    scorers = {}
    for name, bank, priors in (
        ("corpus + seed bank + order prior (shipped)", True, ORDER_PRIOR),
        ("corpus + seed bank, no order prior", True, None),
        ("template corpus only + order prior", False, ORDER_PRIOR),
    ):
        t0 = time.perf_counter()
        scorer = train_scorer(records=args.records, seed=args.seed, bank=bank, priors=priors)
        train_s = time.perf_counter() - t0
        scorers[name] = scorer
        res["handwritten"][name] = {
            "signature": scorer.signature,
            "train_s": round(train_s, 2),
            "examples": scorer.meta["examples"],
            "features": scorer.meta["features"],
            **{split: evaluate_scorer(scorer, [a for a in answers if a["split"] == split]) for split in splits},
        }
    bank = [t for texts in seed_bank().values() for t in texts]
    res["bank_shared"] = {}
    for split in splits:
        n, sub, text = longest_shared(bank, [s["text"] for a in answers if a["split"] == split for s in a["segments"]])
        res["bank_shared"][split] = {"chars": n, "substring": sub, "exemplar": text}
    shipped = scorers["corpus + seed bank + order prior (shipped)"]
    path = shipped.save(args.out)
    res["artifact"] = {"path": _rel(path), "bytes": path.stat().st_size}
    psyqa = Path(args.psyqa)
    res["psyqa"] = psyqa_report(shipped, psyqa) if psyqa.is_file() else None
    if res["psyqa"] is None:
        print(f"note: no PsyQA sample at {psyqa}; its section is skipped")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(res, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"scorer: {path} ({res['artifact']['bytes']} bytes); results: {args.results}")
    print_tables(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
