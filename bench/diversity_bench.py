"""Diversity of the offline template corpus (`cbt-llm synth template`), issue 13 item 7.

Over the answers of the first N records of one seed it measures:
- distinct-2 and distinct-4: unique / total character n-grams over all answers, x100, computed by
  evaluation/reference.py's distinct-n (the eval's own definition, so the numbers compare with its reports);
- the near-duplicate rate: the fraction of answers that have an earlier answer with estimated Jaccard >= 0.8
  over character 5-gram shingles (datasketch MinHash, 128 permutations, seed 1, MinHashLSH at 0.8; an LSH
  candidate counts only when its estimated Jaccard reaches the threshold, so LSH false positives do not);
- how predictable the corpus is to a tiny model: validation loss per answer token (and per answer character,
  which does not depend on the tokenizer the run trains) of configs/demo-cpu.yaml's 1.1M-parameter model after
  its 300 steps, the demo's 4 rows (of 512 tokens) per step, lr, warm-up, cosine and clipping, on a corpus,
  tokenizer and shards built by the demo's own synth -> tokenizer train -> prepare.

The demo trains under DeepSpeed ZeRO-3 on 2 CPU ranks (2 x 1 row x 2 accumulation); train/ has no plain path, so
this script runs the same arithmetic in one process without DeepSpeed: 4 rows per step, the loss summed over
label tokens and divided by their count (train.step.loss_sum), torch AdamW with the config's betas, eps and
weight decay, train.optim.lr_lambda, grad-norm clip. Validation: the first eval_max_rows (64) validation rows, as
the demo's eval. The row order differs from the demo's (one rank instead of two), so expect the demo's number
within noise, not exactly.

    PYTHONPATH=. .venv/bin/python bench/diversity_bench.py --label template-v3 \
        --results bench/results/diversity-template-v3.json [--num-records 20000] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.synth.template import PROMPT_VERSION, iter_records  # noqa: E402
from evaluation.reference import _distinct  # noqa: E402

SHINGLE = 5
THRESHOLD = 0.8
NUM_PERM = 128


def distinct(answers: list[str]) -> dict:
    """distinct-2 and distinct-4 over all answers, as the eval reports them."""
    out = {}
    for n in (2, 4):
        r = _distinct(n)(answers, answers)
        out[f"distinct-{n}"] = round(r["score"], 3)
        out[f"distinct-{n} signature"] = r["signature"]
    return out


def near_duplicates(answers: list[str]) -> dict:
    """Fraction of answers with an earlier near-duplicate (MinHash estimate of Jaccard >= THRESHOLD)."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    hashes: list = []
    dup = 0
    for i, text in enumerate(answers):
        s = "".join(text.split())
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s[k : k + SHINGLE].encode() for k in range(max(1, len(s) - SHINGLE + 1))])
        if any(m.jaccard(hashes[j]) >= THRESHOLD for j in lsh.query(m)):
            dup += 1
        lsh.insert(i, m)
        hashes.append(m)
    return {
        "near_dup_rate": round(dup / len(answers), 4),
        "near_dups": dup,
        "near_dup signature": f"minhash|char{SHINGLE}-shingles,no-space|perm{NUM_PERM} seed1|lsh>={THRESHOLD}"
        "|estimate>=threshold|answers with an earlier near-dup / answers",
    }


class _Plain:
    """What train.step.loss_sum reads from a DeepSpeed engine (device, module, a forward call), for a plain model."""

    def __init__(self, model):
        self.module, self.device = model, next(model.parameters()).device

    def __call__(self, **kw):
        return self.module(**kw)


def _build_corpus(cfg) -> None:
    from data_pipeline.prepare import run_prepare
    from data_pipeline.synth.template import run_synth_template
    from data_pipeline.tokenizer import train_tokenizer

    run_synth_template(cfg.synth)
    train_tokenizer(cfg.tokenizer)
    run_prepare(cfg)


def _val_loss(engine, rows, pad_id: int, n: int, tok) -> dict:
    """Loss over the first n validation rows: per label token and per character of the label text."""
    import torch

    from train.data import IGNORE, collate
    from train.model import label_count
    from train.step import loss_sum

    total, count, chars = 0.0, 0, 0
    engine.module.eval()
    with torch.no_grad():
        for i in range(min(n, len(rows))):
            b = collate(rows, [i], pad_id)
            total += float(loss_sum(engine, b))
            count += label_count(b["labels"], b["position_ids"])
            target = b["labels"][0, 1:][(b["labels"][0, 1:] != IGNORE) & (b["position_ids"][0, 1:] != 0)]
            chars += len(tok.decode(target.tolist(), skip_special_tokens=True))
    engine.module.train()
    return {"nats_per_token": total / count, "nats_per_char": total / chars, "tokens": count, "chars": chars}


def train_and_validate(work: Path, num_records: int) -> dict:
    """synth -> tokenizer -> prepare as the demo, then the demo's 300 steps in one process; the val losses."""
    import torch

    from cbt_llm.core.config import load_config
    from cbt_llm.inference.tokenizer import load_tokenizer
    from train.data import RankLoader, load_manifest, read_rows
    from train.model import label_count, load_model, select_attn, write_random_base
    from train.optim import lr_lambda
    from train.step import loss_sum

    cfg = load_config(
        ROOT / "configs/demo-cpu.yaml",
        [f"run_name={work.name}", f"synth.num_records={num_records}", "synth.workers=1", "data.world_size=1"],
    )
    os.chdir(work.parent.parent)  # run_name paths are runs/<run_name>/...
    t0 = time.perf_counter()
    _build_corpus(cfg)
    build_s = time.perf_counter() - t0
    tc, mc = cfg.train, cfg.model
    data_dir = Path(cfg.data.out_dir or f"runs/{work.name}/data")
    man = load_manifest(data_dir)
    pad = man["pad_token_id"]
    rows = read_rows(data_dir, man["splits"]["train"]["shards"], pad)
    val = read_rows(data_dir, man["splits"]["validation"]["shards"], pad)
    tok_dir = cfg.tokenizer.out_dir or f"runs/{work.name}/tokenizer"
    tok = load_tokenizer(tok_dir)
    torch.set_num_threads(1)  # the demo's ranks run one thread each; the machine is shared
    base = write_random_base(
        mc,
        work / "base_model",
        vocab_size=len(tok),
        seq_len=man["seq_len"],
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id or pad,
        seed=tc.seed,
    )
    model = load_model(str(base), mc, torch.float32, select_attn(mc, "cpu"))
    model.config.use_cache = False
    engine = _Plain(model)
    per_step = 2 * tc.micro_batch_size * tc.grad_accum  # the demo's 2 ranks x micro x accumulation
    loader = RankLoader(
        rows,
        micro_batch_size=1,
        grad_accum=per_step,
        seed=tc.seed,
        rank=0,
        steps_per_epoch=len(rows) // per_step,
        pad_token_id=pad,
    )
    opt = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas), eps=tc.adam_eps, weight_decay=tc.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.max_steps, tc.warmup_steps, tc.min_lr_ratio))
    curve, t1 = {}, time.perf_counter()
    for step in range(1, tc.max_steps + 1):
        micro, _ = loader.next_step()
        count = sum(label_count(m["labels"], m["position_ids"]) for m in micro)
        for m in micro:
            (loss_sum(engine, m) / count).backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % tc.eval_every == 0:
            curve[step] = _val_loss(engine, val, pad, tc.eval_max_rows, tok)
            print(f"step {step}: val {curve[step]['nats_per_token']:.4f} nats/token", file=sys.stderr)
    last = curve[tc.max_steps]
    return {
        "val_nats_per_token": round(last["nats_per_token"], 4),
        "val_nats_per_char": round(last["nats_per_char"], 4),
        "val_curve": {k: round(v["nats_per_token"], 4) for k, v in curve.items()},
        "val_tokens": last["tokens"],
        "val_chars": last["chars"],
        "train_rows": len(rows),
        "epochs": round(tc.max_steps * per_step / len(rows), 3),
        "vocab": len(tok),
        "params": sum(p.numel() for p in model.parameters()),
        "build_s": round(build_s, 1),
        "train_s": round(time.perf_counter() - t1, 1),
        "train signature": f"configs/demo-cpu.yaml model/train, 1 process no DeepSpeed, {per_step} rows/step, "
        f"val first {tc.eval_max_rows} validation rows",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-records", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default=PROMPT_VERSION)
    ap.add_argument("--work", default="runs/bench-diversity", help="run folder (runs/<name>) for the training part")
    ap.add_argument("--skip-train", action="store_true", help="corpus statistics only")
    ap.add_argument("--results", default="")
    args = ap.parse_args()

    t0 = time.perf_counter()
    answers = [r["answer"] for r in iter_records(args.seed, 0, args.num_records)]
    out = {
        "label": args.label,
        "prompt_version": PROMPT_VERSION,
        "records": len(answers),
        "seed": args.seed,
        "mean_answer_chars": round(sum(map(len, answers)) / len(answers), 1),
    }
    out.update(distinct(answers))
    out.update(near_duplicates(answers))
    out["stats_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, ensure_ascii=False), file=sys.stderr)
    if not args.skip_train:
        work = (ROOT / args.work).resolve()
        out.update(train_and_validate(work, args.num_records))
    out["machine"] = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    text = json.dumps(out, ensure_ascii=False, indent=1)
    print(text)
    if args.results:
        Path(ROOT / args.results).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
