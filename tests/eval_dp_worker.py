"""One rank of a data-parallel generation run, for tests/test_eval_generate.py (started by torchrun on CPU, gloo).

    torchrun --standalone --nproc_per_node N tests/eval_dp_worker.py MODEL_DIR QUESTIONS_JSON OUT_JSON

QUESTIONS_JSON holds [[question, description], ...]; rank 0 writes {"generations": [...], "stats": {...}} to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import torch.distributed as dist

from evaluation.generate import Prompt, generate_all, load_generator, prompt_messages


def main(model_dir: str, questions: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    qs = json.loads(open(questions, encoding="utf-8").read())
    prompts = [Prompt(f"q{k}", prompt_messages(q, d, "你是咨询师")) for k, (q, d) in enumerate(qs)]
    gen = load_generator(model_dir, backend="transformers", device="cpu")
    # a small budget, so the plan has several batches to share out
    gens, stats = generate_all(gen, prompts, max_new_tokens=12, batch_tokens=300, rank=rank, world_size=world)
    if rank == 0:
        stats["world_size"] = world
        with open(out, "w", encoding="utf-8") as fh:
            json.dump({"generations": [asdict(g) for g in gens], "stats": stats}, fh, ensure_ascii=False)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(*sys.argv[1:4])
