"""DPO throughput and memory: our packed pairs (train.objective=dpo) vs TRL's DPOTrainer (padded pairs), same data.

Both sides train one epoch of DPO (sigmoid loss, beta 0.1, full fine-tuning) on the same template preference pairs
(`synth template --pairs`, what our prepare kept in its train split), from the same random Qwen2-architecture model
folder, under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), fp32, with the same optimizer settings, pairs per optimizer
step and accumulation. The reference log-probabilities are computed once before training on both sides (ours:
train/reference.py; TRL: precompute_ref_log_probs=True), so each holds one model and the timed steps are policy
steps only; a third line runs TRL's default, a reference model kept beside the policy.

Measured: real (non-padding) tokens of both sides of every pair per second, timed from the end of optimizer step 1
to the end of the last step (start-up, the reference pass and step 1 excluded on every side), and the peak RSS of
rank 0 (ru_maxrss, the same number ours logs as mem/peak_gib on CPU). Each side counts its own tokens: TRL's chat
template adds the newline after the answer's end token, so its pairs are ~1 token per side longer.

    .venv/bin/python bench/dpo_bench.py [--pairs 1200 --hidden 128 --layers 2 --seq-len 1024]

Writes runs/bench/dpo_bench.json and bench/results/dpo-h<hidden>-l<layers>.json and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ours import log_windows, pythonpath, tokens_and_seconds  # noqa: E402

BIN = Path(sys.executable).parent
LR = 1e-3


def _train_pairs(data: Path, pairs_glob: str) -> list[dict]:
    """The pairs our prepare kept in its train split, as TRL's conversational prompt/chosen/rejected records, in
    the order of the pairs files."""
    import glob

    import pyarrow.parquet as pq

    m = json.loads((data / "manifest.json").read_text())
    kept = set()
    for sh in m["splits"]["train"]["shards"]:
        for ids in pq.read_table(data / sh["path"], columns=["example_ids"])["example_ids"].to_pylist():
            kept.update(e.rsplit("/", 1)[0] for e in ids)
    out = []
    for f in sorted(glob.glob(pairs_glob)):
        for line in Path(f).read_text(encoding="utf-8").splitlines():
            p = json.loads(line)
            if p["id"] in kept:
                prompt = [{"role": "system", "content": m["system_prompt"]}, *p["messages"]]
                out.append(
                    {
                        "prompt": prompt,
                        "chosen": [{"role": "assistant", "content": p["chosen"]}],
                        "rejected": [{"role": "assistant", "content": p["rejected"]}],
                    }
                )
    assert len(out) == len(kept), (len(out), len(kept))
    return out


def trl_worker(args) -> None:
    """Runs under torchrun: TRL's DPOTrainer, ZeRO-3, padded pairs. Rank 0 writes the measurement."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
        },
    }
    # loaded before DPOConfig exists: with its ZeRO-3 config alive, from_pretrained would enter zero.Init before the
    # process group is up
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    ref = None
    if not args.precompute:
        ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    cfg = DPOConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.trl_batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=LR,
        num_train_epochs=1,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        deepspeed=ds_config,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,  # ours runs without activation checkpointing too
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        adam_beta2=0.95,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=None,  # every pair fits: nothing truncated, as ours
        precompute_ref_log_probs=args.precompute,
        precompute_ref_batch_size=args.trl_batch,
    )

    class Clock(TrainerCallback):
        t1 = t_end = 0.0

        def on_step_end(self, a, state, control, **kw):
            self.t_end = time.perf_counter()
            if state.global_step == 1:
                self.t1 = self.t_end

    seen: list[int] = []  # real tokens per training micro-batch, in order: the first grad_accum belong to step 1
    padded: list[int] = []

    class Counting(DPOTrainer):
        def training_step(self, model, inputs, *a, **kw):  # training micro-batches only (not the reference pass)
            seen.append(int(inputs["attention_mask"].sum()))
            padded.append(int(inputs["attention_mask"].numel()))
            return super().training_step(model, inputs, *a, **kw)

    clock = Clock()
    trainer = Counting(
        model=model,
        ref_model=ref,
        args=cfg,
        train_dataset=load_from_disk(args.pairs_ds),
        processing_class=tok,
        callbacks=[clock],
    )
    trainer.train()
    after = torch.tensor([float(sum(seen[args.grad_accum :])), float(sum(padded[args.grad_accum :]))])
    torch.distributed.all_reduce(after)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.out, "trl.json").write_text(
            json.dumps(
                {
                    "real_tokens": int(after[0].item()),
                    "padded_tokens": int(after[1].item()),
                    "train_s": clock.t_end - clock.t1,
                    "steps": trainer.state.global_step,
                    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                }
            )
        )


def _ours(args, data: Path, model: Path, out: Path, env: dict) -> dict:
    run_dir = out / "ours"
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cbt_llm.cli",
        "train",
        "model.init=pretrained",
        f"model.name_or_path={model}",
        f"train.data_dir={data}",
        f"train.run_dir={run_dir}",
        "train.objective=dpo",
        "train.dpo.loss=sigmoid",
        "train.dpo.beta=0.1",
        "train.epochs=1",
        "train.micro_batch_size=1",
        f"train.grad_accum={args.grad_accum}",
        "train.log_every=1",
        f"train.lr={LR}",
        "train.resume=never",
        "train.eval_every=0",
        "train.eval_max_rows=1",
        "train.save_every=0",
        "train.save_final=false",
    ]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    tokens, seconds = tokens_and_seconds(log_windows(run_dir))  # from the end of step 1, as TRL's side
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {
        "steps": summary["steps"],
        "real_tokens": tokens,
        "train_s": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_gib": summary["peak_mem_gib"],
    }


def _trl(args, pairs_ds: Path, model: Path, out: Path, env: dict, batch: int, precompute: bool) -> dict:
    name = "trl" if precompute else "trl-ref-model"
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        "--trl-worker",
        "--pairs-ds",
        str(pairs_ds),
        "--model",
        str(model),
        "--out",
        str(out / name),
        "--trl-batch",
        str(batch),
        "--grad-accum",
        str(args.grad_accum),
    ] + (["--precompute"] if precompute else [])
    (out / name).mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    r = json.loads((out / name / "trl.json").read_text())
    r["tokens_per_s"] = r["real_tokens"] / r["train_s"]
    r["token_efficiency"] = r["real_tokens"] / r["padded_tokens"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/dpo")
    ap.add_argument("--pairs", type=int, default=1200)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--no-ref-model-line", action="store_true", help="skip TRL with a reference model in memory")
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pairs-ds", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--trl-batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        trl_worker(args)
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("dpo_bench: TRL is not installed; pip install -c constraints.txt -e '.[bench]'")

    from cbt_llm.core.report import print_summary, write_metrics
    from tests.fixtures.tiny import write_chat_tokenizer, write_tiny_qwen2

    out = (ROOT / args.out).resolve()
    env = dict(
        os.environ,
        WANDB_MODE="disabled",
        TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=pythonpath(),
        TQDM_DISABLE="1",
    )
    cli = [str(BIN / "cbt-llm")]
    # the pairs, a byte-level BPE with the ChatML template, prepare's packed preference shards, the model folder
    subprocess.run(
        cli + ["synth", "template", "--pairs", "--num-records", str(args.pairs), "--num-shards", "1", "--seed", "0"]
        + ["--workers", "1", "--out", str(out / "pairs")],
        cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    tok = write_chat_tokenizer(out / "tokenizer", records=2000, vocab_size=8000)
    data = out / "data"
    subprocess.run(
        cli + ["prepare", "data.format=preference", f"data.inputs=[{out / 'pairs'}/*.jsonl]", f"data.out_dir={data}"]
        + [f"data.tokenizer={tok}", f"data.seq_len={args.seq_len}", "data.world_size=2", "data.val_fraction=0.02"],
        cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    manifest = json.loads((data / "manifest.json").read_text())
    model = write_tiny_qwen2(out / "model", tok, hidden=args.hidden, layers=args.layers)
    pairs = _train_pairs(data, str(out / "pairs" / "*.jsonl"))
    # on disk, not Dataset.from_list in each rank: TRL's precompute_ref_log_probs caches the reference log-probs
    # beside the dataset's files, and an in-memory dataset's cache lies in a temporary folder of rank 0's own, which
    # the other ranks then fail to open
    from datasets import Dataset

    pairs_ds = out / "trl_pairs"
    Dataset.from_list(pairs).save_to_disk(str(pairs_ds))
    # same pairs per optimizer step: a TRL micro-batch holds as many pairs as one packed row does on average
    per_row = manifest["counts"]["pairs"]["train"] / manifest["counts"]["rows"]["train"]
    batch = max(1, round(per_row))

    t0 = time.perf_counter()
    ours = _ours(args, data, model, out, env)
    trl = _trl(args, pairs_ds, model, out, env, batch, precompute=True)
    trl_ref = None if args.no_ref_model_line else _trl(args, pairs_ds, model, out, env, batch, precompute=False)
    result = {
        "device": "cpu x2 ranks (gloo), ZeRO-3, fp32",
        "model": f"qwen2 random, hidden {args.hidden}, {args.layers} layers, vocab {manifest.get('vocab_size', 8000)}",
        "loss": "sigmoid (DPO), beta 0.1, full fine-tuning",
        "seq_len": args.seq_len,
        "train_pairs": manifest["counts"]["pairs"]["train"],
        "train_rows": manifest["counts"]["rows"]["train"],
        "pairs_per_row": per_row,
        "packing_efficiency": manifest["packing_efficiency"]["train"],
        "trl_batch_pairs": batch,
        "grad_accum": args.grad_accum,
        "ours": ours,
        "trl_precomputed_ref": trl,
        "trl_ref_model": trl_ref,
        "tokens_per_s_ratio_ours_over_trl": ours["tokens_per_s"] / trl["tokens_per_s"],
        "peak_rss_ratio_ours_over_trl": ours["peak_rss_gib"] / trl["peak_rss_gib"],
        "bench_s": time.perf_counter() - t0,
    }
    if trl_ref:
        result["tokens_per_s_ratio_ours_over_trl_ref_model"] = ours["tokens_per_s"] / trl_ref["tokens_per_s"]
        result["peak_rss_ratio_ours_over_trl_ref_model"] = ours["peak_rss_gib"] / trl_ref["peak_rss_gib"]
    write_metrics(out.parent / f"{out.name}_bench.json", result)  # default: runs/bench/dpo_bench.json
    write_metrics(ROOT / "bench" / "results" / f"dpo-h{args.hidden}-l{args.layers}.json", result)
    flat = {k: v for k, v in result.items() if not isinstance(v, dict)}
    for side in ("ours", "trl_precomputed_ref", "trl_ref_model"):
        for k, v in (result[side] or {}).items():
            flat[f"{side}.{k}"] = v
    print_summary("DPO bench: packed pairs (ours) vs TRL DPOTrainer + padding", flat)


if __name__ == "__main__":
    main()
