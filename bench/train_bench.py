"""Training throughput: our packed loop vs Hugging Face Trainer + DataCollatorForSeq2Seq (padding), same data.

Both run one epoch over the same examples with the same random Qwen2-architecture model, DeepSpeed ZeRO-3 and 2
CPU ranks (gloo), and report real (non-padding) tokens per second, timed from the end of optimizer step 1 to the
end of the last step (start-up and the first step's warm-up excluded on both sides). The HF batch holds as many
examples as one packed row does on average, so both take the same examples per optimizer step. The data is
synthetic, with example lengths spread like chat turns (short prompts, longer answers), which is where padding
wastes the most.

    .venv/bin/python bench/train_bench.py [--rows-per-shard 48 --seq-len 1024 --hidden 128 --layers 2]

Writes runs/bench/train_bench.json and prints a summary table.

The GPU comparison (one GPU, ~1.2B full and a 7B-shaped LoRA) is bench/gpu_train_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ours import log_windows, pythonpath, tokens_and_seconds  # noqa: E402

BIN = Path(sys.executable).parent


def _examples(data_dir: Path) -> list[dict]:
    """Unpack the packed train rows back into examples (position_ids restart at each example)."""
    from train.data import load_manifest, read_rows

    m = load_manifest(data_dir)
    rows = read_rows(data_dir, m["splits"]["train"]["shards"], m["pad_token_id"])
    out = []
    for i in range(len(rows)):
        ids, lab, pos = rows.row(i)
        starts = [j for j in range(len(pos)) if pos[j] == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            out.append({"input_ids": ids[a:b].tolist(), "labels": lab[a:b].tolist()})
    return out


def hf_worker(args) -> None:
    """Runs under torchrun: HF Trainer, ZeRO-3, padding collator. Rank 0 writes the measurement."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    examples = _examples(Path(args.data))
    tok = AutoTokenizer.from_pretrained(Path(args.data) / "tokenizer")
    gpu = args.gpu
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": args.zero_stage or (2 if gpu else 3)},
        "bf16": {"enabled": gpu},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
        },
    }
    # loaded before TrainingArguments exists: with its ZeRO-3 config alive, from_pretrained would enter zero.Init
    # before the process group is up and see a world of one
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if gpu else torch.float32, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    if args.lora_r:  # the same adapters as ours: every linear layer, alpha = 2 r, no dropout
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_r,
                lora_alpha=2 * args.lora_r,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
                bias="none",
            ),
        )
    targs = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.hf_batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=1e-4 if gpu else 3e-3,
        num_train_epochs=1,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        deepspeed=ds_config,
        use_cpu=not gpu,  # use_cpu: otherwise Trainer does not split data across CPU ranks
        bf16=gpu,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        adam_beta2=0.95,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
    )
    pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    seen: list[int] = []  # real tokens per micro-batch, in order: the first grad_accum belong to step 1
    padded: list[int] = []  # tokens the model computes on (padding included), same order

    def collate(features):
        seen.append(sum(len(f["input_ids"]) for f in features))
        padded.append(len(features) * max(len(f["input_ids"]) for f in features))
        return pad(features)

    class Clock(TrainerCallback):
        t1 = t_end = 0.0

        def on_step_end(self, a, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()  # the clock must see the step's kernels finish
            self.t_end = time.perf_counter()
            if state.global_step == 1:
                self.t1 = self.t_end

    clock = Clock()

    class Examples(torch.utils.data.Dataset):  # a plain list: no `datasets` needed (the GPU image has none)
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    trainer = Trainer(model=model, args=targs, train_dataset=Examples(), data_collator=collate, callbacks=[clock])
    trainer.train()
    after_step1 = torch.tensor([float(sum(seen[args.grad_accum :])), float(sum(padded[args.grad_accum :]))])
    after_step1 = after_step1.to("cuda" if gpu else "cpu")  # nccl reduces GPU tensors only
    torch.distributed.all_reduce(after_step1)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.out, "hf.json").write_text(
            json.dumps(
                {
                    "real_tokens": int(after_step1[0].item()),
                    "padded_tokens": int(after_step1[1].item()),
                    "train_s": clock.t_end - clock.t1,
                    "steps": trainer.state.global_step,
                    "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30 if gpu else None),
                }
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/train")
    ap.add_argument("--rows-per-shard", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument(
        "--gpu", action="store_true", help=argparse.SUPPRESS
    )  # HF worker on CUDA (bench/gpu_train_bench.py)
    ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--hf-batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--zero-stage", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--lora-r", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_worker:
        hf_worker(args)
        return

    from cbt_llm.core.report import print_summary, write_metrics
    from tests.fixtures.tiny import make_shards

    out = (ROOT / args.out).resolve()
    data = make_shards(
        out / "data",
        rows_per_shard=args.rows_per_shard,
        train_shards=4,
        val_rows=4,
        seq_len=args.seq_len,
        lengths=(20, 120, 30, 400),
    )
    manifest = json.loads((data / "manifest.json").read_text())
    env = dict(
        os.environ,
        WANDB_MODE="disabled",
        TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=pythonpath(),
    )
    run_dir = out / "ours"
    ours_cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cbt_llm.cli",
        "train",
        "model.init=random",
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        f"model.intermediate_size={args.hidden * 2}",
        f"train.data_dir={data}",
        f"train.run_dir={run_dir}",
        "train.epochs=1",
        f"train.grad_accum={args.grad_accum}",
        "train.log_every=1",
        "train.lr=3e-3",
        "train.resume=never",
        "train.eval_max_rows=1",
        "train.eval_every=0",
        "train.save_every=0",
    ]
    subprocess.run(ours_cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    # from the end of step 1 to the end of the last step, like the HF side (one-step log windows)
    ours_tokens, ours_s = tokens_and_seconds(log_windows(run_dir))

    # same examples per optimizer step: one packed row holds this many examples on average
    per_row = manifest["counts"]["examples"]["train"] / manifest["counts"]["rows"]["train"]
    hf_batch = max(1, round(per_row))
    hf_cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        "--hf-worker",
        "--data",
        str(data),
        "--model",
        str(run_dir / "base_model"),
        "--out",
        str(out / "hf"),
        "--hf-batch",
        str(hf_batch),
        "--grad-accum",
        str(args.grad_accum),
    ]
    subprocess.run(hf_cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    hf = json.loads((out / "hf" / "hf.json").read_text())

    ours_tps, hf_tps = ours_tokens / ours_s, hf["real_tokens"] / hf["train_s"]
    result = {
        "device": "cpu x2 ranks (gloo), ZeRO-3, fp32",
        "model": f"qwen2 random, hidden {args.hidden}, {args.layers} layers",
        "seq_len": args.seq_len,
        "train_examples": manifest["counts"]["examples"]["train"],
        "packing_efficiency": manifest["packing_efficiency"]["train"],
        "ours_steps": json.loads((run_dir / "train_summary.json").read_text())["steps"],
        "ours_real_tokens_after_step1": ours_tokens,
        "ours_train_s": ours_s,
        "ours_tokens_per_s": ours_tps,
        "hf_batch_examples": hf_batch,
        "hf_steps": hf["steps"],
        "hf_real_tokens_after_step1": hf["real_tokens"],
        "hf_train_s": hf["train_s"],
        "hf_tokens_per_s": hf_tps,
        "hf_token_efficiency": hf["real_tokens"] / hf["padded_tokens"],
        "speedup": ours_tps / hf_tps,
    }
    # the speed-up token efficiency alone would give (same FLOPs per computed token); ours/bound < 1 is loop overhead
    # (or, on CPU, the cost of attention over whole packed rows)
    result["efficiency_bound"] = result["packing_efficiency"] / result["hf_token_efficiency"]
    result["speedup_over_bound"] = result["speedup"] / result["efficiency_bound"]
    write_metrics(out.parent / f"{out.name}_bench.json", result)  # default: runs/bench/train_bench.json
    write_metrics(ROOT / "bench" / "results" / f"train-h{args.hidden}-l{args.layers}-seq{args.seq_len}.json", result)
    print_summary("train bench: packed (ours) vs HF Trainer + padding", result)


if __name__ == "__main__":
    main()
