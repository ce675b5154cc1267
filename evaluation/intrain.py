"""Generation eval during training (train.gen_eval_every): the model being trained answers the held-out questions
and its answers are scored exactly as `cbt-llm eval` scores an exported checkpoint.

The `eval:` section of the training config says which questions (eval.questions, eval.limit, the train-overlap
check), how long the answers may be (eval.max_new_tokens), the batch plan (eval.batch_tokens), which reference
metrics, BERTScore's encoder and the judge. Generation goes through the same pieces as `cbt-llm eval`
(cbt_llm.inference.generate: prompts, batch plan, greedy decoding config, stop tokens), on the training model itself:
under ZeRO-3 every rank holds a slice of each weight, so every rank generates (its share of the batch plan, in
lockstep) and rank 0 scores. Same weights, same prompts, same batches: the logged gen/<metric> values equal
`cbt-llm eval` on the checkpoint saved at that step (tests/integration/test_train_e2e.py, run A). A LoRA model
generates with its adapter unmerged here, where `cbt-llm eval` merges it: the same function, rounding aside.

Each call also writes the answers with their structure labels to <run_dir>/gen_eval/step_<N>.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError
from cbt_llm.inference.generate import generate_all
from cbt_llm.inference.hf import HFGenerator
from cbt_llm.inference.models import ModelSource, load_chat_tokenizer
from cbt_llm.inference.prompt import Prompt, prompt_messages
from data_pipeline.shards import load_manifest
from data_pipeline.synth.scorer import load_or_train
from evaluation import bertscore
from evaluation.judge import Judge, check_judge_config
from evaluation.run import check_metrics, load_questions
from evaluation.scoring import judge_answers, score_answers


class TrainingGenEval:
    """run_train's gen_eval hook. Built on every rank before training (bad settings fail before any step)."""

    def __init__(self, cfg: Config, rank: int):
        # the intervals of `cbt-llm eval` are for reports; a training curve logs the point values only
        self.ec = cfg.eval.model_copy(update={"bootstrap_resamples": 0})
        check_metrics(self.ec.metrics)
        if self.ec.bertscore.model_path:
            bertscore.check_encoder(self.ec.bertscore.model_path, self.ec.bertscore.layer)
        if self.ec.judge.base_url:
            check_judge_config(self.ec.judge)
        self.questions, _, self.source = load_questions(cfg)
        manifest = load_manifest(cfg.train.data_dir)
        tok_path = manifest["tokenizer"]["name_or_path"]
        self.tokenizer = load_chat_tokenizer(ModelSource(base=tok_path, tokenizer=tok_path), "train.gen_eval_every")
        if not self.tokenizer.chat_template:
            raise ConfigError(
                f"train.gen_eval_every: the tokenizer '{tok_path}' has no chat template to prompt the model with; "
                "prepare with a chat tokenizer or set train.gen_eval_every=0"
            )
        system = manifest.get("system_prompt", cfg.data.system_prompt)
        self.prompts = [Prompt(q.id, prompt_messages(q.question, q.description, system)) for q in self.questions]
        self.out_dir = Path(cfg.train.run_dir) / "gen_eval"
        # rank 0 scores; the scorer artifact is built here once if missing (~10 s), not at the first eval step
        self.scorer = load_or_train(self.ec.structure_scorer) if rank == 0 else None
        self.judge = Judge(self.ec.judge, str(self.out_dir)) if self.ec.judge.base_url and rank == 0 else None

    def __call__(self, model, *, step: int, rank: int, world: int, device: str, synced_gpus: bool) -> dict:
        gen = HFGenerator.around(model, self.tokenizer, device=device, name=f"step{step}", synced_gpus=synced_gpus)
        gens, stats = generate_all(
            gen,
            self.prompts,
            max_new_tokens=self.ec.max_new_tokens,
            batch_tokens=self.ec.batch_tokens,
            rank=rank,
            world_size=world,
            progress=False,
        )
        if rank != 0:
            return {}
        metrics, rows = score_answers(self.questions, gens, self.ec, self.scorer)
        if self.judge is not None:
            metrics.update(judge_answers(self.judge, gen.name, self.questions, gens, self.ec)[0])
        self._write_answers(step, gens, rows)
        logged = {f"gen/{name}": m["score"] for name, m in metrics.items() if m.get("score") is not None}
        coverage = {r["id"]: r["structure"]["coverage"] for r in rows}
        samples = [
            {"id": q.id, "question": q.question, "answer": g.text, "coverage": coverage.get(q.id)}
            for q, g in zip(self.questions[: self.ec.examples], gens)
        ]
        return {
            **logged,
            "gen/new_tokens": stats["new_tokens"],
            "gen/tokens_per_s": stats["tokens_per_s"],
            "gen/samples": samples,  # a W&B table (train.metrics), and the same rows in metrics.jsonl
        }

    def _write_answers(self, step: int, gens, rows: list[dict]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        labels = {r["id"]: r["structure"] for r in rows}
        with (self.out_dir / f"step_{step:07d}.jsonl").open("w", encoding="utf-8") as fh:
            for q, g in zip(self.questions, gens):
                row = {"id": q.id, "question": q.question, "output": g.text, "structure": labels.get(q.id)}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
