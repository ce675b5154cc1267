"""Does the demo's model answer in the corpus's CBT structure? Greedy answers to held-out questions, scored offline.

    python bench/demo_check.py                                   # runs/demo/export vs runs/demo/train/base_model
    python bench/demo_check.py --model runs/x/export --base runs/x/train/base_model --data runs/x/data --n 16

For the first `--n` records of <data>/heldout.jsonl (questions prepare kept out of training), each model answers
greedily (chat template with the generation prompt, the system prompt of <data>/manifest.json, the user turn of
data_pipeline.tokenizer.build_user_message), and the structure scorer (cbt_llm/domain/structure.py; built at
--scorer the first time) gives each answer its coverage (0-5 of the CBT parts) and order agreement. Prints one
row per question and the mean per model, and the first fine-tuned answer in full. The base model (the random
init the run started from) has no tokenizer of its own: both models use the one in --model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbt_llm.domain.chat_format import build_user_message  # noqa: E402
from data_pipeline.shards import load_manifest  # noqa: E402
from data_pipeline.synth.scorer import load_or_train  # noqa: E402
from evaluation.questions import load_heldout  # noqa: E402


def generate(model_dir: str, tok, prompts: list[str], max_new_tokens: int, batch: int) -> list[str]:
    """Greedy answers, `batch` prompts at a time (left-padded)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/demo/export", help="exported (fine-tuned) model folder, with tokenizer")
    ap.add_argument("--base", default="runs/demo/train/base_model", help="the model before training ('' to skip)")
    ap.add_argument("--data", default="runs/demo/data", help="prepared data folder (heldout.jsonl, manifest.json)")
    ap.add_argument("--scorer", default="runs/structure_scorer.npz")
    ap.add_argument("--n", type=int, default=16, help="held-out questions")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    system = load_manifest(args.data)["system_prompt"]
    records = load_heldout(args.data)[: args.n]
    prompts = [
        tok.apply_chat_template(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": build_user_message(r["question"], r.get("description", ""))},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        for r in records
    ]
    scorer = load_or_train(args.scorer)
    models = {"fine-tuned": args.model, **({"base": args.base} if args.base else {})}
    answers, scores = {}, {}
    for name, path in models.items():
        t0 = time.perf_counter()
        answers[name] = generate(path, tok, prompts, args.max_new_tokens, args.batch)
        scores[name] = [scorer.score(a) for a in answers[name]]
        print(f"{name}: {path}, {len(prompts)} answers in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    print("| # | question | " + " | ".join(f"{m} coverage | {m} chars" for m in models) + " |")
    print("|---|---|" + "---:|---:|" * len(models))
    for i, r in enumerate(records):
        cells = " | ".join(f"{scores[m][i]['coverage']} | {len(answers[m][i])}" for m in models)
        print(f"| {i} | {r['question'][:24]} | {cells} |")
    for m in models:
        cov = [s["coverage"] for s in scores[m]]
        orders = [s["order"] for s in scores[m] if s["order"] is not None]
        order = f"{statistics.fmean(orders):.2f}" if orders else "-"
        full = sum(c == 5 for c in cov)
        print(f"{m}: mean coverage {statistics.fmean(cov):.2f} / 5, all five parts {full}/{len(cov)}, order {order}")
    print(f"\nQ: {records[0]['question']}\nfine-tuned A:\n{answers['fine-tuned'][0]}")
    if args.base:
        print(f"\nbase A (first 200 chars):\n{answers['base'][0][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
