"""One GPU: our training loop against Hugging Face Trainer + padding, on models built from a config (no download).

Cases (each in one run, the same examples on every side, seq 4096, bf16):
  full-1.2b  ~1.2B random Qwen2 (hidden 2048, 20 layers, vocab 32000), full fine-tuning, ZeRO-2:
             ours (train.optimizer auto = torch fused AdamW), ours with DeepSpeed's FusedAdam (JIT-built by
             bench/gpu_checks.sh in the background), HF Trainer + DataCollatorForSeq2Seq.
  lora-7b    Qwen2.5-7B's shapes (hidden 3584, 28 heads / 4 KV heads, MLP 18944, vocab 152064) with the layers
             cut to --lora-layers (said in the table), LoRA r=16 on every linear layer, ZeRO-3: ours vs HF + peft.
Ours runs with its defaults for a GPU: sdpa_varlen (or flash-attn when installed), chunked loss,
train.tokens_per_micro_batch 16384 (4 packed rows). HF gets as many examples per micro-batch as those 4 rows hold
on average. Real tokens/s from the second log window (ours) or the end of step 1 (HF) to the end; MFU with the
honest count of train/metrics.py (HF: the same FLOPs per real token, as both train the same examples).

    python3 bench/gpu_train_bench.py --out /tmp/bench-gpu [--cases full-1.2b,lora-7b] [--timeout 240]

Writes bench/results/train-gpu-<device>.json and prints one table per case. With --smoke it runs tiny shapes
on CPU (fp32, gloo), to check the plumbing where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: bench/, cbt_llm/ and train/ import from the repo

from bench.ours import log_windows, pythonpath, tokens_and_seconds  # noqa: E402

BIN = Path(sys.executable).parent

CASES = {
    "full-1.2b": {
        "model": [
            "model.hidden_size=2048",
            "model.num_layers=20",
            "model.num_heads=16",
            "model.num_kv_heads=16",
            "model.intermediate_size=5632",
            "model.vocab_size=32000",
        ],
        "train": ["train.zero_stage=2", "train.lr=1e-4"],
        "sides": {"ours": [], "ours-ds-fusedadam": ["train.optimizer=deepspeed"]},
        "hf": {"zero_stage": 2, "lora_r": 0},
        "what": "random Qwen2, hidden 2048, 20 layers, 16 heads, vocab 32000 (~1.2B), full fine-tuning, ZeRO-2",
    },
    "lora-7b": {
        "model": [
            "model.hidden_size=3584",
            "model.num_heads=28",
            "model.num_kv_heads=4",
            "model.intermediate_size=18944",
            "model.vocab_size=152064",
        ],
        "train": [
            "train.zero_stage=3",
            "train.lr=1e-4",
            "model.lora.enabled=true",
            "model.lora.r=16",
            "model.lora.alpha=32",
            "model.lora.dropout=0.0",
        ],
        "sides": {"ours": []},
        "hf": {"zero_stage": 3, "lora_r": 16},
        "what": "Qwen2.5-7B shapes (hidden 3584, 28/4 heads, MLP 18944, vocab 152064), {layers} of 28 layers, "
        "LoRA r=16 all-linear, ZeRO-3",
    },
}
# optional extra sides (--extra-sides): Liger's RoPE/RMSNorm/SwiGLU kernels, and a short profiled run whose
# operator table (profile.txt) shows where a step's time goes (its own tokens/s include the profiler's cost)
EXTRA_SIDES = {
    "liger": ("ours-liger", ["model.liger=true"]),
    "profile": ("ours-profile", ["train.max_steps=9", "train.profile_steps=3"]),
}
SMOKE_MODEL = [
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "model.vocab_size=512",
]


def run_ours(run_dir: Path, data: Path, overrides: list[str], timeout: int) -> dict:
    """One `cbt-llm train` through torchrun on one device; tokens/s, MFU over the log windows after the first."""
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=pythonpath())
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "cbt_llm.cli",
        "train",
        f"train.data_dir={data}",
        f"train.run_dir={run_dir}",
        "train.epochs=1",
        "train.log_every=4",
        "train.eval_every=0",
        "train.save_every=0",
        "train.resume=never",
        "train.warmup_steps=2",
        "train.save_final=false",
        "data.world_size=1",
        *overrides,
    ]
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    steps = log_windows(run_dir)
    s = json.loads((run_dir / "train_summary.json").read_text())
    tokens, secs = tokens_and_seconds(steps)
    mfus = [r["perf/mfu"] for r in steps if r["perf/mfu"] is not None]
    return {
        "tokens_per_s": tokens / secs,
        "mfu": sum(mfus) / len(mfus) if mfus else None,
        "real_tokens_timed": tokens,
        "train_s": secs,
        "steps": s["steps"],
        "attn": s["attn"],
        "attn_kernel": s["attn_kernel"],
        "optimizer": s["optimizer"],
        "master_weights": s["master_weights_dtype"],
        "micro_batch_size": s["micro_batch_size"],
        "loss_chunk_tokens": s["loss_chunk_tokens"],
        "packing_efficiency": sum(r["perf/packing_efficiency"] for r in steps) / len(steps),
        "peak_mem_gib": s["peak_mem_gib"],
        "first_loss": s["first_train_loss"],
        "last_loss": s["last_train_loss"],
    }


def run_hf(out: Path, data: Path, base: Path, hf_batch: int, hf: dict, gpu: bool, timeout: int) -> dict:
    """HF Trainer + padding collator (bench/train_bench.py's worker) on the same base model and examples."""
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "1",
        str(ROOT / "bench" / "train_bench.py"),
        "--hf-worker",
        "--data",
        str(data),
        "--model",
        str(base),
        "--out",
        str(out),
        "--hf-batch",
        str(hf_batch),
        "--grad-accum",
        "1",
        "--zero-stage",
        str(hf["zero_stage"]),
        "--lora-r",
        str(hf["lora_r"]),
    ]
    cmd += ["--gpu"] if gpu else []
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(
            cmd,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=pythonpath()),
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    r = json.loads((out / "hf.json").read_text())
    r.update(
        batch_examples=hf_batch,
        tokens_per_s=r["real_tokens"] / r["train_s"],
        token_efficiency=r["real_tokens"] / r["padded_tokens"],
    )
    return r


def _guarded(fn, *a, **kw) -> dict:
    """A side that fails is recorded with its error; the other sides still measure."""
    try:
        return fn(*a, **kw)
    except Exception as exc:  # noqa: BLE001 - a benchmark keeps going and reports what broke
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def run_case(name: str, out: Path, args, make_shards) -> dict:
    case, gpu = CASES[name], not args.smoke
    data = make_shards(
        out / f"data-{name}",
        rows_per_shard=args.rows,
        train_shards=1,
        val_rows=2,
        seq_len=args.seq_len,
        lengths=(64, 400, 200, 1500) if gpu else (8, 40, 20, 150),
    )
    manifest = json.loads((data / "manifest.json").read_text())
    layers = args.lora_layers if name == "lora-7b" else 20
    model = (case["model"] if gpu else SMOKE_MODEL) + [f"model.num_layers={layers if gpu else 2}"]
    common = [
        *case["train"],
        f"train.tokens_per_micro_batch={4 * args.seq_len}",
        *(["model.precision=bf16"] if gpu else ["model.precision=fp32"]),
    ]
    result = {
        "case": name,
        "what": case["what"].format(layers=layers),
        "seq_len": args.seq_len,
        "train_rows": manifest["counts"]["rows"]["train"],
        "train_examples": manifest["counts"]["examples"]["train"],
    }
    base = out / f"{name}-ours" / "base_model"
    sides = dict(case["sides"])
    sides.update(EXTRA_SIDES[x] for x in args.extra_sides.split(",") if x)
    sides = {k: v for k, v in sides.items() if k == "ours" or k not in args.skip_sides.split(",")}
    for i, (side, extra) in enumerate(sides.items()):
        init = ["model.init=random", *model] if i == 0 else ["model.init=pretrained", f"model.name_or_path={base}"]
        result[side] = _guarded(run_ours, out / f"{name}-{side}", data, init + common + extra, args.timeout)
    per_row = manifest["counts"]["examples"]["train"] / manifest["counts"]["rows"]["train"]
    hf_batch = max(1, round(4 * per_row))  # as many examples as ours' 4-row micro-batch holds on average
    if args.no_hf:
        return result
    result["hf"] = _guarded(run_hf, out / f"{name}-hf", data, base, hf_batch, case["hf"], gpu, args.timeout)
    ours, hf = result["ours"], result["hf"]
    if "tokens_per_s" in ours and "tokens_per_s" in hf:
        result["ours_over_hf"] = ours["tokens_per_s"] / hf["tokens_per_s"]
        if ours.get("mfu") is not None:
            hf["mfu"] = ours["mfu"] * hf["tokens_per_s"] / ours["tokens_per_s"]  # same FLOPs per real token
    ds = result.get("ours-ds-fusedadam", {})
    if "tokens_per_s" in ours and "tokens_per_s" in ds:
        result["torch_fused_over_ds_fusedadam"] = ours["tokens_per_s"] / ds["tokens_per_s"]
    return result


def _table(r: dict) -> dict:
    row = {"case": r["what"]}
    for side in ("ours", "ours-ds-fusedadam", *(v[0] for v in EXTRA_SIDES.values()), "hf"):
        v = r.get(side)
        if not v:
            continue
        if "error" in v:
            row[side] = v["error"]
            continue
        mfu = f", MFU {v['mfu']:.3f}" if v.get("mfu") is not None else ""
        row[side] = f"{v['tokens_per_s']:,.0f} tok/s{mfu}, peak {v.get('peak_mem_gib') or 0:.1f} GiB"
    for k in ("ours_over_hf", "torch_fused_over_ds_fusedadam"):
        if k in r:
            row[k] = f"{r[k]:.3f}x"
    o = r.get("ours", {})
    if "optimizer" in o:
        row["ours optimizer / kernel / rows per micro-batch"] = (
            f"{o['optimizer']} / {o['attn_kernel']} / {o['micro_batch_size']}"
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/gpu")
    ap.add_argument("--cases", default="full-1.2b,lora-7b")
    ap.add_argument("--rows", type=int, default=64, help="packed train rows per case")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--lora-layers", type=int, default=4, help="lora-7b: decoder layers kept of 28")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per training run")
    ap.add_argument("--extra-sides", default="", help="comma list of: " + ", ".join(EXTRA_SIDES))
    ap.add_argument("--skip-sides", default="", help="comma list of sides not to run (ours always runs)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF Trainer side")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (plumbing check, no numbers)")
    args = ap.parse_args()
    import torch

    from cbt_llm.core.report import print_summary, write_metrics
    from tests.fixtures.tiny import make_shards

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (use --smoke for a CPU plumbing check)")
    device = torch.cuda.get_device_name() if not args.smoke else "cpu (smoke)"
    out = Path(args.out).resolve()
    results = {"device": device, "torch": torch.__version__, "cases": {}}
    for name in args.cases.split(","):
        results["cases"][name] = r = run_case(name, out, args, make_shards)
        print_summary(f"{name} on {device}", {k: ("-" if v is None else v) for k, v in _table(r).items()})
        dest = (
            out / "results.json"
            if args.smoke
            else ROOT / "bench" / "results" / f"train-gpu-{device.replace(' ', '-').lower()}.json"
        )
        write_metrics(dest, results)


if __name__ == "__main__":
    main()
