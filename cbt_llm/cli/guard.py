"""`cbt-llm guard train|check|eval`: the crisis guard's tools for a platform. train fits the learned layer on the
shipped labelled set and the platform's own (`--input`); check reads one text as a user turn and as a model reply;
eval measures the guard on a labelled file (recall per construct, false positives per kind, every miss, a PNG)."""

from __future__ import annotations

import json
import sys

from cbt_llm.cli.args import Flag, add_common, add_flags
from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError

TRAIN_FLAGS: list[Flag] = [
    ("--out", "guard.train.out_dir", str, "folder for user.npz and reply.npz"),
    ("--target-recall", "guard.train.target_recall", float, "crisis recall on held-out authors for user turns"),
    ("--reply-target-recall", "guard.train.reply_target_recall", float, "unsafe replies stopped on held-out authors"),
]
USE_FLAGS: list[Flag] = [
    ("--model-dir", "guard.model_dir", str, "a folder from `cbt-llm guard train` (default: shipped)")
]


def run_train(cfg: Config, args) -> int:
    from cbt_llm.core.report import print_summary, write_metrics
    from cbt_llm.domain.crisis import CONSTRUCTS, HARM_KINDS
    from cbt_llm.domain.guard_classifier import model_path, read_labelled, shipped_data_files, train_classifier

    tc = cfg.guard.train
    inputs = list(tc.inputs) + list(args.input or [])
    files = (shipped_data_files() if tc.shipped_data else []) + inputs
    if not files:
        raise ConfigError("guard train: no labelled data; pass --input FILE or keep guard.train.shipped_data=true")
    data, bad = read_labelled(files, list(CONSTRUCTS), list(HARM_KINDS))
    rows: dict = {"files": len(files), "bad_lines": len(bad)}
    tasks = (  # task, its kinds, the recall its threshold is set for, what else its fit takes
        ("user", CONSTRUCTS, tc.target_recall, {"acute_weight": tc.acute_weight}),
        ("reply", HARM_KINDS, tc.reply_target_recall, {}),
    )
    for task, kinds, target, fit_kw in tasks:
        keep = tc.pattern_keep if task == "user" else None
        model = train_classifier(data[task], task, list(kinds), target, pattern_keep=keep, **fit_kw)
        model.save(model_path(task, tc.out_dir))
        held = model.meta["held_out_authors"]
        rows.update({
            f"{task}.examples": len(data[task]),
            f"{task}.threshold": round(model.threshold, 4),
            f"{task}.held_out_recall": held["recall"],
            f"{task}.held_out_false_positive_rate": held["false_positive_rate"],
        })  # fmt: skip
        if model.corroborate is not None:
            both = model.meta["patterns_corroborated"]
            rows.update({
                f"{task}.pattern_floor": round(model.corroborate, 4),
                f"{task}.held_out_with_patterns_recall": both["corroborated"]["recall"],
                f"{task}.held_out_with_patterns_false_positive_rate": both["corroborated"]["false_positive_rate"],
            })  # fmt: skip
    write_metrics(f"{tc.out_dir}/guard_train.json", {**rows, "bad": bad})
    print_summary(f"cbt-llm guard train -> {tc.out_dir}", rows)
    for b in bad[:20]:
        print(f"bad line {b['file']}:{b['line']}: {b['reason']}", file=sys.stderr)
    return 0


def run_check(cfg: Config, args) -> int:
    from cbt_llm.inference.safety_model import build_guard

    guard = build_guard(cfg.guard)
    for text in args.text:
        user = guard.read_user_text(text)
        harm, layer = guard.read_reply_text(text)
        print(json.dumps({
            "text": text,
            "as_user_turn": {"crisis": user.crisis, "construct": user.construct, "layer": user.source,
                             "score": None if user.score is None else round(user.score, 4)},
            "as_model_reply": {"unsafe": harm is not None, "harm_kind": harm, "layer": layer},
        }, ensure_ascii=False))  # fmt: skip
    return 0


def run_eval(cfg: Config, args) -> int:
    from cbt_llm.core.report import print_summary
    from cbt_llm.inference.safety_model import build_guard
    from evaluation.guard_eval import evaluate_guard, read_rows, summary_rows, write_report

    rows, bad = read_rows(args.input)
    if not rows:
        raise ConfigError(f"--input: no labelled lines in {', '.join(args.input)} ({len(bad)} bad)")
    report = evaluate_guard(build_guard(cfg.guard), rows)
    paths = write_report(report, bad, args.out)
    print_summary(f"cbt-llm guard eval ({len(rows)} lines, {len(bad)} bad)", summary_rows(report))
    print(f"guard eval: {paths['report']}, {paths['errors']} ({len(report['errors'])} misses and false flags), "
          f"{paths['plot']}")  # fmt: skip
    return 0


def add_parser(sub) -> None:
    guard = sub.add_parser("guard", help="the crisis guard's tools: train, check, eval").add_subparsers(
        dest="action", required=True
    )
    p = guard.add_parser("train", help="train the learned layer on the shipped labelled set and --input files")
    add_common(p, TRAIN_FLAGS)
    p.add_argument("--input", action="append", default=[], help="more labelled JSONL (repeat for several files)")
    p.set_defaults(func=run_train)
    p = guard.add_parser("check", help="read texts as a user turn and as a model reply; one JSON line each")
    p.add_argument("text", nargs="+", help="the texts to read")
    p.add_argument("--config", help="YAML config (see configs/)")
    add_flags(p, USE_FLAGS)
    p.set_defaults(func=run_check, overrides=[], dry_run=False)
    p = guard.add_parser("eval", help="measure the guard on a labelled JSONL file (recall, false positives, misses)")
    add_common(p, USE_FLAGS)
    p.add_argument("--input", action="append", required=True, help="labelled JSONL (repeat for several files)")
    p.add_argument("--out", default="runs/guard-eval", help="folder for guard_eval.json, errors.jsonl, the PNG")
    p.set_defaults(func=run_eval)
