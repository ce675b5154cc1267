"""`cbt-llm train`: the training recipe. Reads top to bottom: set up -> resume -> loop -> final save and summary.

Any launcher works because the recipe only reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT:
    torchrun --nproc_per_node 2 -m cbt_llm.cli train --config configs/demo-cpu.yaml
    deepspeed --num_gpus 2 --no_local_rank $(which cbt-llm) train --config configs/demo-cpu.yaml   (CPU too)
    cbt-llm train --config ...                                                                   (one process)
(--no_local_rank: the deepspeed launcher would otherwise put --local_rank=N in front of the subcommand.)
On SIGTERM or SIGUSR1 every rank agrees at the next step boundary, a checkpoint is written and the process
exits with train.requeue_exit_code (85) so a scheduler can requeue it; `train.resume: auto` continues it.
The deepspeed launcher passes 85 on as its own exit code; torchrun forwards SIGTERM to the workers but then
exits 1 itself, so a job script under torchrun should look for run_dir/requeue.json instead.

What each step does lives elsewhere: train.step (loss, optimizer step, validation loss), train.dpo (the same for
train.objective=dpo: preference losses on packed pairs) and train.reference (its precomputed reference),
train.periodic (the work on a schedule: metrics line, validation, generation eval, checkpoint saving),
train.run (the run's resolved state and facts), train.optim (optimizer, schedule), train.model (model,
attention, LoRA), train.data (rows, loader), train.checkpoint (the checkpoint format), train.metrics,
train.runtime (process housekeeping, stop agreement), train.faults (test-only fault injection).
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cbt_llm.core.config import Config, check_world_size
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.report import print_summary, write_metrics
from data_pipeline.shards import check_tokenizer, load_manifest, rank_shards, verify_shards
from train import attention, runtime
from train import checkpoint as ckpt
from train.data import (
    PackedRows,
    RankLoader,
    columns_for,
    read_rows,
    rows_per_micro_batch,
    steps_per_epoch,
)
from train.dpo import check_objective, sequence_logps
from train.ds_config import resolve_ds_config
from train.metrics import FlopsCount, MetricsLogger, peak_flops, plot_loss, read_metrics
from train.model import (
    apply_activation_checkpointing,
    apply_liger,
    apply_lora,
    count_params,
    load_model,
    packing_isolation,
    resolve_dtype,
    select_attn,
    write_merged_base,
    write_random_base,
)
from train.optim import build_client_optimizer, choose_optimizer, lr_lambda, master_weights
from train.periodic import Checkpointer, GenerationEval, TrainLog, Validation
from train.reference import ensure_reference
from train.run import Run
from train.step import chunked_lm_loss_supported, train_step


def run_train(
    cfg: Config,
    *,
    train_rows: Callable[[list[dict], int], PackedRows] | None = None,
    on_checkpoint: Callable[[Path, dict], None] | None = None,
    gen_eval: Callable[..., dict] | None = None,
) -> int:
    """Train as configured; returns the process exit code (0, or train.requeue_exit_code after a signal).

    Two hooks for launchers that own data and checkpoint storage (launch/ray_job.py), both None for the rest:
    train_rows(shards, pad_token_id) gives this rank's train rows instead of read_rows from train.data_dir (it
    must return what read_rows would); on_checkpoint(folder, trainer_state) runs on every rank after each
    checkpoint is complete on disk.

    gen_eval (train.gen_eval_every; the CLI passes evaluation.intrain.TrainingGenEval, train does not import the
    evaluation stage): gen_eval(model, step=, rank=, world=, device=, synced_gpus=) is called on every rank with the
    model in eval mode and returns the metrics to log (rank 0; {} elsewhere).
    """
    runtime.install_stop_signals()
    runtime.extension_build_env()
    with runtime.shm_buffers_removed():
        run = _check_config(cfg, on_checkpoint)
        run.gen_eval = _check_gen_eval(cfg, gen_eval)
        engine, rows, val_rows = _set_up(run, train_rows)
        loader = _resume(run, engine, rows)
        code = _loop(run, engine, loader, val_rows)
        _tear_down(run)
        return code


# ---- set up ---------------------------------------------------------------------------------------------------


def _check_config(cfg: Config, on_checkpoint) -> Run:
    """Everything cheap, before any expensive work: shards, batch arithmetic, model source, precision, kernel."""
    rank, world, local_rank = runtime.dist_env()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    manifest = load_manifest(cfg.train.data_dir)
    check_objective(cfg.train.objective, manifest, cfg.train.data_dir)
    if cfg.model.lora.init_adapter and not cfg.model.lora.enabled:
        raise ConfigError(
            "model.lora.init_adapter merges an adapter into the base for a new LoRA adapter: set "
            "model.lora.enabled=true (to fully fine-tune from it, export it with --merge-lora and set "
            "model.name_or_path)"
        )
    world_note = check_world_size(
        world,
        len(manifest["splits"]["train"]["shards"]),
        data_dir=cfg.train.data_dir,
        prepared_for=manifest.get("world_size", cfg.data.world_size),
    )
    mb = rows_per_micro_batch(cfg.train, manifest["seq_len"])
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": mb})})
    tc, mc = cfg.train, cfg.model
    spe, left_out = steps_per_epoch(manifest, world, mb, tc.grad_accum)
    # the shards this rank will read, whole and as the manifest lists them (hashed per train.verify_shards)
    mine = rank_shards(manifest, "train", rank, world) + manifest["splits"].get("validation", {}).get("shards", [])
    verify_shards(tc.data_dir, manifest, tc.verify_shards, mine, seed=tc.seed + rank)
    if mc.init == "pretrained" and not mc.name_or_path:
        raise ConfigError("model.name_or_path is empty; set it (e.g. Qwen/Qwen2.5-7B-Instruct) or model.init=random")
    from cbt_llm.inference.tokenizer import open_tokenizer

    tok_path = manifest["tokenizer"]["name_or_path"]
    tokenizer = open_tokenizer(tok_path, mc.trust_remote_code)
    check_tokenizer(manifest, Path(tc.data_dir), tokenizer)  # refuses shards made with a different tokenizer
    run = Run(
        cfg=cfg,
        rank=rank,
        world=world,
        local_rank=local_rank,
        device_type=device_type,
        manifest=manifest,
        steps_per_epoch=spe,
        rows_left_out=left_out,
        total_steps=tc.max_steps or tc.epochs * spe,
        pad_id=manifest.get("pad_token_id", tokenizer.pad_token_id),
        tok_path=tok_path,
        dtype=resolve_dtype(mc, device_type),
        attn=select_attn(mc, device_type),
        optimizer=choose_optimizer(tc, device_type),
        on_checkpoint=on_checkpoint,
    )
    run.ds_config = resolve_ds_config(tc, run.dtype, device_type, world, client_optimizer=run.optimizer.client)
    run.facts.vocab, run.facts.eos = len(tokenizer), tokenizer.eos_token_id
    if world_note:
        run.say(world_note)
    return run


def _check_gen_eval(cfg: Config, gen_eval):
    if cfg.train.gen_eval_every and gen_eval is None:
        raise ConfigError(
            "train.gen_eval_every: generation eval runs from `cbt-llm train` (torchrun, the deepspeed launcher, "
            "Slurm), which brings the evaluation stage; set train.gen_eval_every=0 here"
        )
    return gen_eval if cfg.train.gen_eval_every else None


def _set_up(run: Run, train_rows) -> tuple[Any, PackedRows, PackedRows]:
    """Process group, this rank's rows, the model, the DeepSpeed engine and the start-up checks."""
    import deepspeed

    tc = run.cfg.train
    runtime.quiet_libraries()
    if run.device_type == "cuda":
        torch.cuda.set_device(run.local_rank)
    deepspeed.init_distributed(
        dist_backend="nccl" if run.device_type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=tc.collective_timeout_s),
        verbose=False,
    )
    torch.manual_seed(tc.seed)
    cols = columns_for(tc.objective)
    read_train = train_rows or (lambda shards, pad: read_rows(tc.data_dir, shards, pad, cols))
    rows = read_train(rank_shards(run.manifest, "train", run.rank, run.world), run.pad_id)
    val_rows = read_rows(tc.data_dir, run.manifest["splits"].get("validation", {}).get("shards", []), run.pad_id, cols)
    if run.pref and rows.pairs is None:
        raise ConfigError(
            "train.objective=dpo: the train rows came without example_ids (a train_rows hook must read them)"
        )
    model = _build_model(run, rows, val_rows)
    engine = _build_engine(run, model)
    if run.pref and run.pref.reference == "precomputed":
        # before a checkpoint is loaded (train.resume): the reference is the starting model
        folder, reused = ensure_reference(
            engine,
            rows,
            val_rows,
            data_dir=tc.data_dir,
            manifest=run.manifest,
            model=run.facts.base_model,
            dtype=run.dtype_name,
            rank=run.rank,
            world=run.world,
            micro_batch_size=tc.micro_batch_size,
            pad_token_id=run.pad_id,
            logps=lambda batch: sequence_logps(engine, batch, **run.loss_chunking()),
            say=run.say,
        )
        run.facts.reference, run.facts.reference_reused = str(folder), reused
    if run.manifest.get("packing", True):
        _check_packing_isolation(engine, rows, f"{run.facts.base_model} (attn={run.attn})", run.say)
    run.facts.attn_kernel = attention.kernel_in_use(run.device_type) if run.attn == attention.NAME else run.attn
    run.say(f"attention: {run.attn} ({run.facts.attn_kernel})")
    return engine, rows, val_rows


def _build_model(run: Run, rows: PackedRows, val_rows: PackedRows):
    """The Hugging Face model (a seeded random one written once by rank 0 for model.init=random), with its
    activation checkpointing and LoRA; refuses data whose token ids the vocabulary does not cover."""
    import torch.distributed as dist

    mc, tc = run.cfg.model, run.cfg.train
    if run.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.yaml").write_text(run.cfg.to_yaml(), encoding="utf-8")
    base_path = mc.name_or_path
    if mc.init == "random":
        base_path = str(run.run_dir / "base_model")
        if run.is_main and not (Path(base_path) / "config.json").exists():
            write_random_base(
                mc,
                Path(base_path),
                vocab_size=run.facts.vocab,
                seq_len=run.manifest["seq_len"],
                pad_token_id=run.pad_id,
                eos_token_id=run.facts.eos or run.pad_id,
                seed=tc.seed,
                tokenizer=run.tok_path,
            )
    if mc.lora.init_adapter:
        merged = run.run_dir / "base_merged"
        if run.is_main:
            write_merged_base(
                base_path, mc.lora.init_adapter, merged, dtype=run.dtype, trust_remote_code=mc.trust_remote_code
            )
        base_path = str(merged)
    dist.barrier()
    run.facts.base_model = base_path
    if mc.lora.init_adapter:
        run.say(f"model.lora.init_adapter: {mc.lora.init_adapter} merged into the base -> {base_path}")
    if tc.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # kept alive on the run: while it exists, from_pretrained loads straight into ZeRO-3 shards
        run.hf_ds_config = HfDeepSpeedConfig(run.ds_config)
    if mc.liger:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(base_path, trust_remote_code=mc.trust_remote_code).model_type
        run.say(apply_liger(model_type, run.device_type))
    model = load_model(base_path, mc, run.dtype, run.attn)
    emb = model.get_input_embeddings().weight
    vocab = emb.ds_shape[0] if hasattr(emb, "ds_shape") else emb.shape[0]  # ZeRO-3 leaves an empty local tensor
    max_id = max(int(rows.input_ids.max(initial=0)), int(val_rows.input_ids.max(initial=0)))
    if max_id >= vocab:
        raise ConfigError(
            f"data has token id {max_id} but the model's vocabulary is {vocab}: tokenizer and model differ"
        )
    model.config.use_cache = False
    run.facts.activation_checkpointing = apply_activation_checkpointing(model, mc)
    if mc.lora.enabled:
        model = apply_lora(model, mc.lora)
    return model


def _build_engine(run: Run, model):
    """deepspeed.initialize with the resolved optimizer and the LR schedule; logs what was chosen."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    tc, mc = run.cfg.train, run.cfg.model
    n_total, n_trainable = count_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=run.ds_config,
        optimizer=build_client_optimizer(run.optimizer, params, tc),
        lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(run.total_steps, tc.warmup_steps, tc.min_lr_ratio)),
    )
    chunk = tc.loss_chunk_tokens if tc.loss_chunk_tokens and chunked_lm_loss_supported(engine.module) else 0
    cfg_l = engine.module.config if not mc.lora.enabled else engine.module.base_model.model.config
    head_dim = getattr(cfg_l, "head_dim", None) or cfg_l.hidden_size // cfg_l.num_attention_heads
    master = master_weights(engine)
    f = run.facts
    f.params_total, f.params_trainable, f.loss_chunk_tokens = n_total, n_trainable, chunk
    f.flops = FlopsCount.for_model(
        n_total, n_trainable, mc.lora.enabled, cfg_l.num_hidden_layers, cfg_l.num_attention_heads, head_dim
    )
    if run.pref and run.pref.reference == "adapters_off":
        # each micro-batch also runs the reference's forward pass (adapters off): 2N per token, a third of the
        # attention's 12 L H d_head per squared length
        f.flops = FlopsCount(f.flops.dense_per_token + 2 * n_total, f.flops.attn_per_len_sq * 16 / 12)
    f.peak = peak_flops(torch.cuda.get_device_name() if run.device_type == "cuda" else None)
    f.master_dtype, f.master_numel_this_rank = master["dtype"], master["numel_this_rank"]
    run.say(
        f"model: {f.base_model} | attn={run.attn} | dtype={run.dtype_name} | "
        f"params={n_total:,} trainable={n_trainable:,} | lora={mc.lora.enabled} | "
        f"activation checkpointing: {f.activation_checkpointing} | zero={tc.zero_stage} | "
        f"world={run.world}"
    )
    run.say(
        f"optimizer: {run.optimizer.describe()} | master weights {master['dtype']}, "
        f"{master['numel_this_rank']} elements on rank 0 | loss: "
        f"{f'chunked ({chunk} tokens)' if chunk else 'full logits'}"
    )
    if run.pref:
        run.say(f"objective: {run.pref.describe()}")
    return engine


def _check_packing_isolation(engine, rows, what: str, say) -> None:
    """Fail fast if the model lets packed examples see each other (see train.model.packing_isolation).

    Every rank runs the same probe on the start of its first row: under ZeRO-3 a forward pass is collective.
    """
    n = min(int(rows.offsets[1]), 32) if len(rows) else 0
    if n < 8:
        return
    probe = torch.from_numpy(rows.input_ids[:n].copy())[None].to(engine.device)
    engine.eval()
    leak, contrast = packing_isolation(
        lambda i, p: engine(input_ids=i, position_ids=p.to(engine.device), use_cache=False).logits, probe, n // 2
    )
    engine.train()
    if contrast > 0 and leak > 0.1 * contrast:
        raise ConfigError(
            f"{what}: packed examples attend to each other (logit gap {leak:.3g} vs {contrast:.3g}); "
            "use model.attn=sdpa or flash_attention_2, or prepare with data.packing=false"
        )
    say(f"packing isolation ok: packed-vs-alone logit gap {leak:.2e} (a leaking model would show {contrast:.2e})")


# ---- resume ---------------------------------------------------------------------------------------------------


def _resume(run: Run, engine, rows: PackedRows) -> RankLoader:
    """The data loader, at the position of the checkpoint train.resume names (auto: the latest in run_dir)."""
    tc = run.cfg.train
    loader = RankLoader(
        rows,
        micro_batch_size=tc.micro_batch_size,
        grad_accum=tc.grad_accum,
        seed=tc.seed,
        rank=run.rank,
        steps_per_epoch=run.steps_per_epoch,
        pad_token_id=run.pad_id,
    )
    tag = None
    if tc.resume == "auto":
        src_dir = run.run_dir / "checkpoints"
        tag = ckpt.latest_tag(src_dir)
    elif tc.resume != "never":
        src_dir, tag = Path(tc.resume).parent, Path(tc.resume).name
        if not (Path(tc.resume) / ckpt.STATE_FILE).is_file():
            raise ConfigError(
                f"train.resume: '{tc.resume}' is not a complete checkpoint folder (no trainer_state.json)"
            )
    if tag:
        state = ckpt.load(engine, src_dir, tag, run.rank)
        if state["world_size"] != run.world:
            raise ConfigError(f"checkpoint {tag} was written by {state['world_size']} ranks; relaunch with that many")
        if state["config_hash"] not in _model_hashes(run.cfg):
            raise ConfigError(f"checkpoint {tag} is for a different model config; use a new train.run_dir")
        if state.get("objective", "sft") != tc.objective:
            raise ConfigError(
                f"checkpoint {tag} was trained with train.objective={state.get('objective', 'sft')}, this run says "
                f"{tc.objective}; use a new train.run_dir (to start DPO from an SFT LoRA run: model.lora.init_adapter)"
            )
        loader.load_state_dict(state["loader"])
        run.start_step, run.resumed_from = state["step"], tag
        run.say(f"resumed from {src_dir / tag} at step {run.start_step}")
    run.logger = MetricsLogger(
        run.run_dir,
        enabled=run.is_main,
        wandb_cfg=run.cfg.wandb,
        run_name=run.cfg.run_name,
        config=run.cfg.model_dump(mode="json"),
        resume_step=run.start_step if run.resumed_from else None,
    )
    return loader


def _model_hashes(cfg: Config) -> set[str]:
    """The model section's hash, and the one it had before model.lora.init_adapter existed (when it is unset), so
    checkpoints written before that field still resume."""
    hashes = {cfg.hash("model")}
    if not cfg.model.lora.init_adapter:
        import hashlib

        obj = cfg.model.model_dump(mode="json")
        obj["lora"].pop("init_adapter", None)
        hashes.add(hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16])
    return hashes


# ---- the loop -------------------------------------------------------------------------------------------------


def _loop(run: Run, engine, loader: RankLoader, val_rows: PackedRows) -> int:
    """Optimizer steps until total_steps, or until a stop signal (then save and return the requeue code). The
    periodic work (train.periodic) runs in this order at every step; each piece knows its own schedule."""
    from tqdm import tqdm

    tc, seq_len = run.cfg.train, run.manifest["seq_len"]
    run.say(
        f"steps: {run.total_steps} ({run.steps_per_epoch}/epoch; {run.rows_left_out} rows/epoch left out to "
        f"keep ranks even) | tokens/step <= {run.world * tc.micro_batch_size * tc.grad_accum * seq_len:,}"
    )
    bar = tqdm(total=run.total_steps, initial=run.start_step, disable=not run.is_main, desc="train", file=sys.stderr)
    profiler = runtime.StepProfiler(
        tc.profile_steps, run.start_step + 3, run.device_type, run.run_dir / "profile.txt" if run.is_main else None
    )
    train_log = TrainLog(run, engine, bar)
    validation, generation = Validation(run, engine, val_rows), GenerationEval(run, engine)
    checkpoints = Checkpointer(run, engine, loader)
    stop, step = runtime.StopFlag(engine.device), run.start_step
    step_fn = run.pref.train_step if run.pref else train_step
    for step in range(run.start_step + 1, run.total_steps + 1):
        if sig := stop.agreed():
            return checkpoints.save_and_requeue(step - 1, sig)
        profiler.before_step(step)
        train_log.begin_step()
        micro, keys = loader.next_step()
        _record_order(run, step, loader.epoch, keys)
        lr = engine.get_lr()[0]  # the rate this step uses: train_step moves the schedule on
        train_log.end_step(step_fn(engine, micro, world=run.world, **run.loss_chunking()), lr=lr, epoch=loader.epoch)
        profiler.after_step(step)
        bar.update(1)
        if run.fault:
            run.fault("after_step", step)
        metrics = train_log.maybe_collect(step)
        metrics.update(validation.maybe_run(step))
        metrics.update(generation.maybe_run(step))
        train_log.log(step, metrics)
        checkpoints.maybe_save(step)
    bar.close()
    _finish(run, step, validation, checkpoints)
    return 0


def _record_order(run: Run, step: int, epoch: int, keys: list[str]) -> None:
    if run.cfg.train.record_order:
        (run.run_dir / "order").mkdir(parents=True, exist_ok=True)
        with (run.run_dir / "order" / f"rank{run.rank}.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "rows": keys}) + "\n")


# ---- finish ---------------------------------------------------------------------------------------------------


def _finish(run: Run, step: int, validation: Validation, checkpoints: Checkpointer) -> None:
    """Validation loss at the last step (unless just done), the final checkpoint, and rank 0's summary."""
    final = validation.maybe_run_final(step)
    if final:
        run.logger.log(step, final)
    checkpoints.save_final(step)
    if run.is_main:
        _write_summary(run, step, checkpoints.last_saved, validation.loss, validation.metrics)


def _write_summary(
    run: Run, step: int, last_saved: int | None, eval_loss: float | None, eval_metrics: dict | None = None
) -> None:
    hist = read_metrics(run.run_dir / "metrics.jsonl")
    losses = [r["train/loss"] for r in hist if "train/loss" in r]
    tps = [r["perf/tokens_per_s"] for r in hist if "perf/tokens_per_s" in r]
    mfus = [r["perf/mfu"] for r in hist if r.get("perf/mfu") is not None]
    f = run.facts
    summary = {
        "steps": step,
        "epochs_seen": round(step / run.steps_per_epoch, 3),
        "world_size": run.world,
        "lora": run.cfg.model.lora.enabled,
        "params_total": f.params_total,
        "params_trainable": f.params_trainable,
        "attn": run.attn,
        "attn_kernel": f.attn_kernel,
        "dtype": run.dtype_name,
        "optimizer": run.optimizer.describe(),
        "master_weights_dtype": f.master_dtype,
        "master_weights_numel_rank0": f.master_numel_this_rank,
        "loss_chunk_tokens": f.loss_chunk_tokens,
        "micro_batch_size": run.cfg.train.micro_batch_size,
        "activation_checkpointing": f.activation_checkpointing,
        "first_train_loss": losses[0] if losses else None,
        "last_train_loss": losses[-1] if losses else None,
        "eval_loss": eval_loss,
        "tokens_per_s_mean": sum(tps) / len(tps) if tps else None,
        "mfu": sum(mfus) / len(mfus) if mfus else None,
        "peak_mem_gib": runtime.peak_mem_gib(run.device_type),
        "checkpoint": str(run.run_dir / "checkpoints" / ckpt.tag_for(last_saved)) if last_saved is not None else None,
        "resumed_from": run.resumed_from,
        "rows_left_out_per_epoch": run.rows_left_out,
    }
    if run.pref:
        summary.update(_preference_summary(run, hist, eval_metrics or {}))
    run.logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    write_metrics(run.run_dir / "train_summary.json", summary)
    plot_loss(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
    print_summary("cbt-llm train", {k: ("-" if v is None else v) for k, v in summary.items()}, file=sys.stderr)


def _preference_summary(run: Run, hist: list[dict], eval_metrics: dict) -> dict:
    """A dpo run's lines of the summary: its loss and reference, and the last logged rewards (train and eval)."""
    dc = run.cfg.train.dpo
    last = next((r for r in reversed(hist) if "rewards/accuracies" in r), {})
    out = {
        "objective": "dpo",
        "dpo_loss": dc.loss,
        "dpo_beta": dc.orpo_lambda if dc.loss == "orpo" else dc.beta,
        "reference": run.pref.reference,
        "reference_store": run.facts.reference,
        "reference_reused": run.facts.reference_reused,
    }
    for k in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        out[f"last_{k.replace('/', '_')}"] = last.get(k)
    for k in ("eval/rewards/accuracies", "eval/rewards/margins"):
        out[k.replace("/", "_")] = eval_metrics.get(k)
    return out


def _tear_down(run: Run) -> None:
    """The one teardown: close W&B, wait for every rank, leave the process group."""
    import torch.distributed as dist

    run.logger.finish()
    dist.barrier()
    dist.destroy_process_group()
