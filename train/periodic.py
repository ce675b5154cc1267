"""The periodic work of the training loop, one object per piece, each owning its schedule (in the manner of
OLMo-core's callbacks): the metrics window and the step's metrics line (train.log_every), the validation loss
(train.eval_every), the generation eval (train.gen_eval_every) and checkpoint saving (train.save_every,
train.save_final, and the save before a requeue exit).

The loop asks each one every step, in a fixed order that is part of the behaviour: the window's metrics, the
validation loss, the generation eval, one metrics line holding all three, then the save. The window, validation,
generation and saving all run collectives (under ZeRO-3 even the forward passes), so every rank asks every piece
at every step, and each decides from the step and what it did before, never from anything only one rank knows.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from cbt_llm.core.report import write_metrics
from train import checkpoint as ckpt
from train import runtime
from train.data import PackedRows, RankLoader
from train.dpo import DpoWindow
from train.metrics import LogWindow
from train.run import Run
from train.step import StepResult, validation_loss


class TrainLog:
    """This rank's metrics window over the steps since the last log line, and that line: train/* and perf/*
    every train.log_every steps and at the last step, with whatever the evaluations added at the same step."""

    def __init__(self, run: Run, engine, bar):
        self.run, self.engine, self.bar = run, engine, bar
        self.every = run.cfg.train.log_every
        self.window = DpoWindow(engine.device) if run.pref else LogWindow(engine.device)
        self.t0 = self.lr = self.step_s = 0.0
        self.epoch = 0

    def begin_step(self) -> None:
        """An optimizer step starts: its wall time (perf/step_s) counts from here, batch loading included."""
        self.t0 = time.perf_counter()

    def end_step(self, result: StepResult, *, lr: float, epoch: int) -> None:
        """The step is done: what it did, the learning rate it used and the loader's epoch after it."""
        self.window.add(result)
        self.step_s = time.perf_counter() - self.t0
        self.lr, self.epoch = lr, epoch

    def maybe_collect(self, step: int) -> dict:
        """The window's metrics at a log step (a collective: every rank calls it), else {}."""
        if step % self.every == 0 or step == self.run.total_steps:
            return self._collect()
        return {}

    def _collect(self) -> dict:
        gn = self.engine.get_global_grad_norm()
        f = self.run.facts
        m = self.window.metrics(world=self.run.world, seq_len=self.run.manifest["seq_len"], flops=f.flops, peak=f.peak)
        return {
            "train/loss": m.pop("train/loss"),
            "train/lr": self.lr,
            "train/grad_norm": float(gn) if gn is not None else None,
            "train/epoch": self.epoch,
            **m,
            "perf/step_s": self.step_s,
            "mem/peak_gib": runtime.peak_mem_gib(self.run.device_type),
        }

    def log(self, step: int, metrics: dict) -> None:
        """The step's metrics line (rank 0 writes it), if it has any. A line with train/loss closes the window, after
        the evaluations: their time is in neither window."""
        if not metrics:
            return
        self.run.logger.log(step, metrics)
        if "train/loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            self.window.restart()


class Validation:
    """The validation loss every train.eval_every steps and at the last step (unless it just ran there); never
    without a validation split. `loss` is the latest, for the summary."""

    def __init__(self, run: Run, engine, rows: PackedRows):
        self.run, self.engine, self.rows = run, engine, rows
        self.every = run.cfg.train.eval_every
        self.loss: float | None = None
        self.metrics: dict = {}  # the latest validation's metrics (dpo: eval/rewards/... too)
        self.last_step: int | None = None

    def maybe_run(self, step: int) -> dict:
        """{"eval/loss": ...} at an eval step (and eval/rewards/... for train.objective=dpo), else {}."""
        if self.every and len(self.rows) and step % self.every == 0:
            metrics = self.run_now()
            self.last_step = step
            return metrics
        return {}

    def maybe_run_final(self, step: int) -> dict:
        """{"eval/loss": ...} at the last step, unless it ran there already or this process trained no step (a run
        resumed from its last checkpoint); else {}."""
        if len(self.rows) and self.last_step != step and step > self.run.start_step:
            return self.run_now()
        return {}

    def run_now(self) -> dict:
        tc = self.run.cfg.train
        evaluate = self.run.pref.validation if self.run.pref else validation_loss
        out = evaluate(
            self.engine,
            self.rows,
            rank=self.run.rank,
            world=self.run.world,
            micro_batch_size=tc.micro_batch_size,
            pad_token_id=self.run.pad_id,
            max_rows=tc.eval_max_rows,
            **self.run.loss_chunking(),
        )
        metrics = out if isinstance(out, dict) else {"eval/loss": out}
        self.loss = metrics["eval/loss"]
        self.metrics = metrics
        return metrics


class GenerationEval:
    """The run's gen_eval hook every train.gen_eval_every steps and at the last step; never without the hook."""

    def __init__(self, run: Run, engine):
        self.run, self.engine = run, engine
        self.every = run.cfg.train.gen_eval_every if run.gen_eval else 0

    def maybe_run(self, step: int) -> dict:
        """The hook's metrics at a generation-eval step (rank 0's; {} on the others), else {}."""
        if self.every and (step % self.every == 0 or step == self.run.total_steps):
            return self.run_now(step)
        return {}

    def run_now(self, step: int) -> dict:
        """The hook on the model as it is now (all ranks: under ZeRO-3 its forwards are collective)."""
        model = self.engine.module
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a LoRA PeftModel
        attn = hf.config._attn_implementation
        # generation needs padding masks and a KV cache, which the packed-row kernels do not take; `cbt-llm eval`
        # loads the exported model with transformers' sdpa, so that is what answers here too
        hf.set_attn_implementation("sdpa")
        model.eval()  # no dropout, and no activation checkpointing, so generate may use its KV cache
        try:
            return self.run.gen_eval(
                model,
                step=step,
                rank=self.run.rank,
                world=self.run.world,
                device=str(self.engine.device),
                synced_gpus=self.run.cfg.train.zero_stage == 3 and self.run.world > 1,
            )
        finally:
            hf.set_attn_implementation(attn)
            model.train()


class Checkpointer:
    """Checkpoint saving: every train.save_every steps except the last, the final save (train.save_final) unless
    that step is saved already, and the save before a requeue exit. `last_saved`: the newest step this process
    saved, for the summary."""

    def __init__(self, run: Run, engine, loader: RankLoader):
        self.run, self.engine, self.loader = run, engine, loader
        self.every = run.cfg.train.save_every
        self.last_saved: int | None = None

    def maybe_save(self, step: int) -> None:
        if self.every and step % self.every == 0 and step != self.run.total_steps:
            self.save(step)

    def save_final(self, step: int) -> None:
        if self.last_saved != step and self.run.cfg.train.save_final:
            self.save(step)

    def save_and_requeue(self, step: int, sig: str) -> int:
        """After a stop signal: save `step`, and on rank 0 write requeue.json; returns train.requeue_exit_code."""
        run = self.run
        code = run.cfg.train.requeue_exit_code
        run.say(f"{sig}: saving step {step} and exiting {code} so the job can be requeued")
        self.save(step, sig)
        if run.is_main:
            write_metrics(run.run_dir / "requeue.json", {"step": step, "exit_code": code, "signal": sig})
        return code

    def save(self, step: int, stopped: str | None = None) -> str:
        """The one save path: every rank writes its part, rank 0 marks the folder complete; then the launcher hook."""
        run = self.run
        state = {
            "step": step,
            "epoch": self.loader.epoch,
            "loader": self.loader.state_dict(),
            "world_size": run.world,
            "total_steps": run.total_steps,
            "config_hash": run.cfg.hash("model"),
            "objective": run.cfg.train.objective,
            "train_hash": run.cfg.hash("train"),
            "wandb_run_id": run.logger.wandb_id,
            "stopped_by_signal": stopped,
            "lora": run.cfg.model.lora.enabled,
            "base_model": run.facts.base_model,
            "tokenizer": run.tok_path,
            "dtype": run.dtype_name,
            "time": time.time(),
        }
        ckpt_dir = run.run_dir / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tag = ckpt.save(
            self.engine,
            ckpt_dir,
            step,
            state,
            rank=run.rank,
            keep_last=run.cfg.train.keep_last,
            barrier=dist.barrier,
            fault=run.fault,
        )
        if run.on_checkpoint:
            run.on_checkpoint(ckpt_dir / tag, state)
        self.last_saved = step
        return tag
