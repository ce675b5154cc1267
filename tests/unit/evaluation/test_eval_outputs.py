"""The eval's report files (evaluation/outputs.py) from a hand-built results dict of two models."""

from __future__ import annotations

import copy
import json
import struct
import time
from pathlib import Path

import pytest

from cbt_llm.core.config import WandbConfig
from cbt_llm.core.report import summary_table
from evaluation import outputs as O
from evaluation.bertscore import NO_ENCODER, not_computed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metric(score, n, ci=None, per_sample=None, sig="sig", **extra) -> dict:
    return {"score": score, "n": n, "per_sample": per_sample, "ci95": ci, "signature": sig, **extra}


def make_results() -> dict:
    base = {
        "bleu-4": _metric(12.345, 3, [10.0, 14.5], [10.0, 12.0, 15.035], "bleu4-char|nltk", ci_method="boot|s:0"),
        "bleu-corpus": _metric(9.5, 3, sig="bleu-corpus|sacrebleu"),
        "bertscore-f1": {**not_computed(NO_ENCODER), "ci95": None},
        "length": _metric(250.0, 3, [200.0, 300.0], [200.0, 250.0, 300.0], "length|chars"),
        "structure-coverage": _metric(3.0, 3, [2.0, 4.0], [2, 3, 4], "structure:v1"),
        "structure-order": _metric(0.8, 3, [0.6, 1.0], [0.6, 0.8, 1.0], "structure:v1"),
        "crisis-support": _metric(None, 0, note="no crisis-flagged questions", sig="safety:v1"),
        "professional-help": _metric(2 / 3, 3, [0.0, 1.0], [1, 1, 0], "safety:v1"),
    }
    tuned = copy.deepcopy(base)
    tuned["bleu-4"] = _metric(20.0, 3, [18.0, 22.0], [18.0, 20.0, 22.0], "bleu4-char|nltk", ci_method="boot|s:0")
    tuned["bertscore-f1"] = _metric(71.25, 3, [70.0, 72.5], [70.0, 71.25, 72.5], "bertscore-f1|bert_score-0.3.13")
    tuned["length"]["note"] = "1 of 3 predictions empty: scored 0"
    return {
        "questions": {"source": "runs/demo/heldout.jsonl", "n": 3, "rejects": 1},
        "models": {
            "base": {"kind": "folder", "backend": "transformers", "metrics": base, "generation": None},
            "cbt-lora": {
                "kind": "base+adapter",
                "backend": "vllm",
                "generation": {"questions": 3, "new_tokens": 1500, "seconds": 2.5, "tokens_per_s": 600.0},
                "metrics": tuned,
            },
        },
        "examples": [
            {
                "id": "q-001",
                "question": "我最近总是失眠，怎么办？",
                "answers": {
                    "base": {"text": "多运动。", "labels": [["多运动。", "strategy"]]},
                    "cbt-lora": {
                        "text": "我理解你的困扰。\n试着写下睡前的想法。",
                        "labels": [["我理解你的困扰。", "empathy"], ["试着写下睡前的想法。", "strategy"]],
                    },
                },
            }
        ],
    }


def test_results_json_round_trips_without_per_sample(tmp_path):
    results = make_results()
    path = tmp_path / "results.json"
    O.write_results_json(path, results)
    text = path.read_text(encoding="utf-8")
    assert "per_sample" not in text and "我最近总是失眠" in text  # Chinese written as is, not \u escapes
    back = json.loads(text)
    expected = copy.deepcopy(results)
    for entry in expected["models"].values():
        for r in entry["metrics"].values():
            r.pop("per_sample", None)
    assert back == expected
    assert list(back["models"]) == ["base", "cbt-lora"]  # column order kept
    assert results["models"]["base"]["metrics"]["bleu-4"]["per_sample"] == [10.0, 12.0, 15.035]  # input untouched


def test_report_md_table_signatures_and_examples():
    md = O.render_report_md(make_results())
    lines = md.splitlines()
    assert "| metric | base | cbt-lora |" in lines
    row = next(ln for ln in lines if ln.startswith("| bleu-4 |"))
    assert row == "| bleu-4 | 12.35 [10.00, 14.50] (n=3) | 20.00 [18.00, 22.00] (n=3) |"
    assert "| bleu-corpus | 9.50 (n=3) | 9.50 (n=3) |" in lines  # corpus level: no interval
    bert = next(ln for ln in lines if ln.startswith("| bertscore-f1 |"))
    assert bert.startswith("| bertscore-f1 | not computed (no encoder configured (eval.bertscore.model_path);")
    assert bert.endswith("| 71.25 [70.00, 72.50] (n=3) |")
    assert "| crisis-support | not computed (no crisis-flagged questions) |" in md
    assert "| professional-help | 0.667 [0.000, 1.000] (n=3) |" in md
    assert "| structure-coverage | 3.00 [2.00, 4.00] (n=3) |" in md
    # rows in the canonical order: reference metrics, bertscore, length, structure, safety
    start = lines.index("| metric | base | cbt-lora |") + 2
    order = [ln.split(" | ")[0][2:] for ln in lines[start : lines.index("", start)]]
    assert order == [
        "bleu-4", "bleu-corpus", "bertscore-f1", "length", "structure-coverage", "structure-order", "crisis-support",
        "professional-help",
    ]  # fmt: skip
    # generation throughput, notes, signatures (one line when the models agree, per model when not)
    assert "| cbt-lora | base+adapter | vllm | 3 | 1,500 | 2.5 | 600.0 |" in lines
    assert "| base | folder | transformers | - | - | - | - |" in lines
    assert "- cbt-lora / length: 1 of 3 predictions empty: scored 0" in lines
    assert "- base / crisis-support" not in md  # its reason is in its cell already
    assert "- bleu-4: `bleu4-char|nltk`" in lines
    assert "- bertscore-f1: base `bertscore-f1`; cbt-lora `bertscore-f1|bert_score-0.3.13`" in lines
    assert "- intervals: `boot|s:0`" in lines
    # the example: question, each answer, its segments' labels
    assert "### 1. q-001" in lines and "> 我最近总是失眠，怎么办？" in lines
    i = lines.index("> 我理解你的困扰。")
    assert lines[i : i + 3] == ["> 我理解你的困扰。", ">", "> 试着写下睡前的想法。"]
    assert "| 我理解你的困扰。 | empathy |" in lines and "| 试着写下睡前的想法。 | strategy |" in lines
    assert "| 多运动。 | strategy |" in lines


def test_summary_rows_line_up_side_by_side():
    rows = O.summary_rows(make_results())
    assert list(rows)[:3] == ["model", "bleu-4", "bleu-corpus"]
    assert rows["model"] == " base | cbt-lora"
    assert rows["bleu-4"] == "12.35 |    20.00"
    assert rows["bertscore-f1"] == "  n/c |    71.25"
    assert rows["crisis-support"] == "  n/c |      n/c"
    assert len({len(v) for v in rows.values()}) == 1  # one width: columns align once right-justified
    table = summary_table("eval", rows)
    assert "| bertscore-f1       |   n/c |    71.25 |" in table


def test_plot_is_a_png(tmp_path):
    path = tmp_path / "scores.png"
    O.plot_scores(make_results(), path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    # nothing computed still gives a picture, saying so
    empty = make_results()
    for entry in empty["models"].values():
        for r in entry["metrics"].values():
            r["score"] = None
    O.plot_scores(empty, tmp_path / "none.png")
    assert (tmp_path / "none.png").read_bytes()[:8] == PNG_MAGIC


def _records(wandb_file: Path):
    """The protobuf Records of an offline .wandb file (W&B's log of 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = wandb_file.read_bytes(), 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            rec = pb.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            buf = b""
            yield rec
        elif kind in (2, 3):
            buf = chunk if kind == 2 else buf + chunk


GENERATIONS = {
    "base": [
        {
            "id": "q-001",
            "question": "我最近总是失眠，怎么办？",
            "answer": "多运动。",
            "structure": {"coverage": 1},
            "safety": {"crisis": False, "crisis_support": False, "hotline": False, "professional_help": False},
        }
    ],
    "cbt-lora": [
        {
            "id": "q-001",
            "question": "我最近总是失眠，怎么办？",
            "answer": "我理解你的困扰。",
            "structure": None,
            "safety": None,
        }
    ],
}


def test_log_wandb_offline_writes_summary_and_samples(tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    O.plot_scores(make_results(), tmp_path / "scores.png")
    t0 = time.perf_counter()
    O.log_wandb(make_results(), GENERATIONS, WandbConfig(mode="offline", tags=["eval"]), "eval-demo", tmp_path)
    # run.finish() can return before wandb-core has written the whole .wandb file (about 1 run in 6 here, on a
    # loaded machine); teardown, which wandb also runs at process exit, waits for it
    wandb.teardown()
    assert time.perf_counter() - t0 < 30  # ~1-2 s here; W&B offline init is not slow
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (wandb_file,) = run.glob("*.wandb")
    summary = {}
    for rec in _records(wandb_file):
        if rec.WhichOneof("record_type") == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in rec.summary.update if i.key})
    assert summary["base/bleu-4"] == pytest.approx(12.345)
    assert summary["cbt-lora/bertscore-f1"] == pytest.approx(71.25)
    assert summary["cbt-lora/bleu-4/ci95_lo"] == 18.0 and summary["cbt-lora/bleu-4/ci95_hi"] == 22.0
    assert "base/bertscore-f1" not in summary and "base/crisis-support" not in summary  # None is not logged
    (table_file,) = run.glob("files/media/table/samples_*.table.json")
    table = json.loads(table_file.read_text(encoding="utf-8"))
    assert table["columns"] == O.SAMPLE_COLUMNS
    assert table["data"] == [
        ["q-001", "我最近总是失眠，怎么办？", "base", "多运动。", 1, False, False, False, False],
        ["q-001", "我最近总是失眠，怎么办？", "cbt-lora", "我理解你的困扰。", None, None, None, None, None],
    ]
    assert list(run.glob("files/media/images/scores_*.png"))


def test_log_wandb_disabled_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    O.log_wandb(make_results(), GENERATIONS, WandbConfig(mode="disabled"), "eval-demo", tmp_path)
    assert not (tmp_path / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins over the config, as in training
    O.log_wandb(make_results(), GENERATIONS, WandbConfig(mode="offline"), "eval-demo", tmp_path)
    assert not (tmp_path / "wandb").exists()
