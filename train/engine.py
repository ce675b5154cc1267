"""`cbt-llm train`: the one training loop. Reads top to bottom: set up -> (resume) -> loop -> save.

Any launcher works because the loop only reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT:
    torchrun --nproc_per_node 2 -m cbt_llm.cli train --config configs/demo-cpu.yaml
    deepspeed --num_gpus 2 --no_local_rank $(which cbt-llm) train --config configs/demo-cpu.yaml   (CPU too)
    cbt-llm train --config ...                                                                   (one process)
(--no_local_rank: the deepspeed launcher would otherwise put --local_rank=N in front of the subcommand.)
On SIGTERM or SIGUSR1 every rank agrees at the next step boundary, a checkpoint is written and the process
exits with train.requeue_exit_code (85) so a scheduler can requeue it; `train.resume: auto` continues it.
The deepspeed launcher passes 85 on as its own exit code; torchrun forwards SIGTERM to the workers but then
exits 1 itself, so a job script under torchrun should look for run_dir/requeue.json instead.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import resource
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from cbt_llm.config import Config, ConfigError
from cbt_llm.report import print_summary, write_metrics
from train import attention
from train import checkpoint as ckpt
from train.data import PackedRows, RankLoader, load_manifest, rank_shards, read_rows, steps_per_epoch
from train.ds_config import resolve_ds_config
from train.metrics import MetricsLogger, flops_per_token, mfu, peak_flops, plot_loss
from train.model import (apply_liger, apply_lora, count_params, label_count, load_model, masked_ce_sum, packing_isolation,
                         resolve_dtype, select_attn, write_random_base)

_STOP = {"signum": 0}


def _on_signal(signum, frame):  # only set a flag: the loop decides, together with the other ranks, when to stop
    _STOP["signum"] = int(signum)


def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; a bare process is a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def _fault_hook(rank: int):
    """Test-only fault injection: CBT_LLM_FAULT=<where>@<step>[:<rank>] SIGKILLs that rank there."""
    spec = os.environ.get("CBT_LLM_FAULT", "")
    if not spec:
        return None
    where, _, rest = spec.partition("@")
    step_s, _, rank_s = rest.partition(":")

    def hit(at: str, step: int) -> None:
        if at == where and step == int(step_s) and rank == int(rank_s or 0):
            os.kill(os.getpid(), signal.SIGKILL)

    return hit


def _lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:  # step = optimizer steps already taken
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _peak_mem_gib(device_type: str) -> float:
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: this process's peak RSS


def _quiet_libraries() -> None:
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*|.*reduce_scatter_tensor.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calls the old name


@torch.no_grad()
def evaluate(engine, rows, *, rank: int, world: int, micro_batch_size: int, pad_token_id: int, max_rows: int) -> float:
    """Validation loss over all rows (row i on rank i % world), summed over label tokens / global count.

    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively); a rank without
    a row left runs row 0 and drops its result.
    """
    import torch.distributed as dist

    from train.data import collate

    n = min(len(rows), max_rows) if max_rows else len(rows)
    mine = list(range(rank, n, world))
    batches = math.ceil(math.ceil(n / world) / micro_batch_size)
    loss, count = torch.zeros((), dtype=torch.float64, device=engine.device), 0
    engine.eval()
    for b in range(batches):
        idx = mine[b * micro_batch_size:(b + 1) * micro_batch_size]
        batch = collate(rows, idx or [0], pad_token_id)
        s = _loss_sum(engine, batch)
        if idx:
            loss += s.detach().double()
            count += label_count(batch["labels"], batch["position_ids"])
    engine.train()
    total = torch.cat([loss.view(1), torch.tensor([float(count)], dtype=torch.float64).to(engine.device)])
    dist.all_reduce(total)
    return float(total[0] / max(total[1], 1))


def _loss_sum(engine, batch: dict) -> torch.Tensor:
    """Forward a collated batch (host tensors) and return its label-token cross-entropy sum, on the device (its
    count comes from label_count on the host). With sdpa_varlen the example boundaries are found here, on the
    host, once per batch, instead of in every layer (which would wait for the GPU each time)."""
    dev = engine.device
    pos = batch["position_ids"].to(dev)
    extra = {}
    if getattr(engine.module.config, "_attn_implementation", None) == attention.NAME:
        extra = attention.boundaries(batch["position_ids"])
        extra["cu_seq_lens_q"] = extra["cu_seq_lens_k"] = extra["cu_seq_lens_q"].to(dev, non_blocking=True)
    out = engine(input_ids=batch["input_ids"].to(dev), position_ids=pos, use_cache=False, **extra)
    return masked_ce_sum(out.logits, batch["labels"].to(dev), pos, count=False)[0]


def _start_profiler(device_type: str):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    prof = profile(activities=acts)
    prof.__enter__()
    return prof


def _stop_profiler(prof, device_type: str, out: Path | None, steps: int) -> None:
    """Stop and, on rank 0, write the top operators by self time (device time on CUDA) for the profiled steps."""
    if device_type == "cuda":
        torch.cuda.synchronize()
    prof.__exit__(None, None, None)
    if out is not None:
        key = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
        out.write_text(f"torch.profiler over {steps} optimizer steps, sorted by {key}\n{table}\n", encoding="utf-8")


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
        lambda i, p: engine(input_ids=i, position_ids=p.to(engine.device), use_cache=False).logits, probe, n // 2)
    engine.train()
    if contrast > 0 and leak > 0.1 * contrast:
        raise ConfigError(
            f"{what}: packed examples attend to each other (logit gap {leak:.3g} vs {contrast:.3g}); "
            "use model.attn=sdpa or flash_attention_2, or prepare with data.packing=false")
    say(f"packing isolation ok: packed-vs-alone logit gap {leak:.2e} (a leaking model would show {contrast:.2e})")


_STALE_LOCK_S = 300  # the shared-memory comm op compiles in ~30 s; a lock this old was left by a killed build


def _prefer_this_environments_tools() -> None:
    """Put this interpreter's bin/ first on PATH. torch builds DeepSpeed's op with whichever `ninja` PATH finds;
    the venv's and the system's differ in version and build-log format, so processes that found different
    ones kept rebuilding the op in the shared extensions folder (60-95 s each time)."""
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def _clear_stale_extension_lock() -> None:
    """DeepSpeed JIT-compiles its CPU shared-memory comm op under a lock file; a build killed midway (a
    preempted or timed-out job) leaves the file behind and every later run waits on it forever."""
    lock = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > _STALE_LOCK_S:
        print(f"removing stale DeepSpeed build lock {lock} ({age:.0f} s old, left by an interrupted build)",
              file=sys.stderr, flush=True)
        lock.unlink(missing_ok=True)


def _extension_build_env() -> None:
    """Where and with which tools DeepSpeed JIT-builds its CPU op; drops a lock left by a killed build."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".torch_extensions").resolve()))
    _prefer_this_environments_tools()
    _clear_stale_extension_lock()


def prebuild_ops() -> None:
    """Compile DeepSpeed's CPU comm op once, serially, before parallel jobs (make test, CI) need it."""
    _extension_build_env()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)


def _shm_buffers() -> list[Path]:
    """This rank's DeepSpeed CPU all-reduce buffers in /dev/shm (named by master address, port and local rank)."""
    addr, port, local = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), os.environ.get("LOCAL_RANK", "0")
    if not addr or not port:
        return []
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{local}"))


def run_train(cfg: Config, *, train_rows: Callable[[list[dict], int], PackedRows] | None = None,
              on_checkpoint: Callable[[Path, dict], None] | None = None) -> int:
    """Train as configured; returns the process exit code (0, or train.requeue_exit_code after a signal).

    Two hooks for launchers that own data and checkpoint storage (launch/ray_job.py), both None for the rest:
    train_rows(shards, pad_token_id) gives this rank's train rows instead of read_rows from train.data_dir (it
    must return what read_rows would); on_checkpoint(folder, trainer_state) runs on every rank after each
    checkpoint is complete on disk.
    """
    # DeepSpeed never unlinks its shared-memory buffers (~66 MB of RAM per rank per run, in tmpfs), and a stale
    # one under the same name can confuse a later run on the same port: drop ours before and after.
    for p in _shm_buffers():
        p.unlink(missing_ok=True)
    try:
        return _run_train(cfg, train_rows, on_checkpoint)
    finally:
        for p in _shm_buffers():
            p.unlink(missing_ok=True)


def _run_train(cfg: Config, train_rows, on_checkpoint) -> int:
    # first thing: a preemption signal during the (long) start-up must set the flag, not kill the process.
    # Only the main thread may install handlers; Ray Train runs this loop in a worker thread, where a lost
    # or preempted node is handled by Ray restarting the group from the last checkpoint instead.
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, _on_signal)
    _extension_build_env()
    tc, mc = cfg.train, cfg.model
    rank, world, local_rank = _dist_env()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    run_dir, ckpt_dir = Path(tc.run_dir), Path(tc.run_dir) / "checkpoints"

    # ---- validate everything cheap before any expensive work -------------------------------------------
    manifest = load_manifest(tc.data_dir)
    spe, dropped_rows = steps_per_epoch(manifest, world, tc.micro_batch_size, tc.grad_accum)
    total_steps = tc.max_steps or tc.epochs * spe
    if mc.init == "pretrained" and not mc.name_or_path:
        raise ConfigError("model.name_or_path is empty; set it (e.g. Qwen/Qwen2.5-7B-Instruct) or model.init=random")
    dtype, attn = resolve_dtype(mc, device_type), select_attn(mc, device_type)
    ds_config = resolve_ds_config(tc, dtype, device_type, world)
    from transformers import AutoTokenizer

    tok_path = manifest["tokenizer"]["name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=mc.trust_remote_code)
    load_manifest(tc.data_dir, tokenizer=tokenizer)  # refuses shards made with a different tokenizer
    pad_id = manifest.get("pad_token_id", tokenizer.pad_token_id)

    # ---- distributed ------------------------------------------------------------------------------------
    import deepspeed
    import torch.distributed as dist

    _quiet_libraries()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                               timeout=datetime.timedelta(seconds=tc.collective_timeout_s), verbose=False)
    is_main = rank == 0
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if is_main else (lambda *a: None)
    fault = _fault_hook(rank)
    torch.manual_seed(tc.seed)

    # ---- data: this rank's own shards -------------------------------------------------------------------
    read_train = train_rows or (lambda shards, pad: read_rows(tc.data_dir, shards, pad))
    rows = read_train(rank_shards(manifest, "train", rank, world), pad_id)
    val_rows = read_rows(tc.data_dir, manifest["splits"].get("validation", {}).get("shards", []), pad_id)
    loader = RankLoader(rows, micro_batch_size=tc.micro_batch_size, grad_accum=tc.grad_accum, seed=tc.seed,
                        rank=rank, steps_per_epoch=spe, pad_token_id=pad_id)

    # ---- model ------------------------------------------------------------------------------------------
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    base_path = mc.name_or_path
    if mc.init == "random":
        base_path = str(run_dir / "base_model")
        if is_main and not (Path(base_path) / "config.json").exists():
            write_random_base(mc, Path(base_path), vocab_size=len(tokenizer), seq_len=manifest["seq_len"],
                              pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id or pad_id, seed=tc.seed)
    dist.barrier()
    hf_ds = None
    if tc.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (alive => from_pretrained loads straight into ZeRO-3 shards)
    if mc.liger:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(base_path, trust_remote_code=mc.trust_remote_code).model_type
        say(apply_liger(model_type, device_type))
    model = load_model(base_path, mc, dtype, attn)
    emb = model.get_input_embeddings().weight
    vocab = emb.ds_shape[0] if hasattr(emb, "ds_shape") else emb.shape[0]  # ZeRO-3 leaves an empty local tensor
    max_id = max(int(rows.input_ids.max(initial=0)), int(val_rows.input_ids.max(initial=0)))
    if max_id >= vocab:
        raise ConfigError(f"data has token id {max_id} but the model's vocabulary is {vocab}: tokenizer and model differ")
    model.config.use_cache = False
    if mc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mc.lora.enabled:
        model = apply_lora(model, mc.lora)
    n_total, n_trainable = count_params(model)
    say(f"model: {base_path} | attn={attn} | dtype={str(dtype).replace('torch.', '')} | params={n_total:,} "
        f"trainable={n_trainable:,} | lora={mc.lora.enabled} | grad_ckpt={mc.gradient_checkpointing} | "
        f"zero={tc.zero_stage} | world={world}")

    from torch.optim.lr_scheduler import LambdaLR

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, _lr_lambda(total_steps, tc.warmup_steps, tc.min_lr_ratio)),
    )

    if manifest.get("packing", True):
        _check_packing_isolation(engine, rows, f"{base_path} (attn={attn})", say)
    attn_kernel = attention.kernel_in_use(device_type) if attn == attention.NAME else attn
    say(f"attention: {attn} ({attn_kernel})")

    # ---- resume -----------------------------------------------------------------------------------------
    start_step, resumed_from = 0, None
    if tc.resume != "never":
        if tc.resume == "auto":
            src_dir, tag = ckpt_dir, ckpt.latest_tag(ckpt_dir)
        else:
            src_dir, tag = Path(tc.resume).parent, Path(tc.resume).name
            if not (Path(tc.resume) / ckpt.STATE_FILE).is_file():
                raise ConfigError(f"train.resume: '{tc.resume}' is not a complete checkpoint folder (no trainer_state.json)")
        if tag:
            state = ckpt.load(engine, src_dir, tag, rank)
            if state["world_size"] != world:
                raise ConfigError(f"checkpoint {tag} was written by {state['world_size']} ranks; relaunch with that many")
            if state["config_hash"] != cfg.hash("model"):
                raise ConfigError(f"checkpoint {tag} is for a different model config; use a new train.run_dir")
            loader.load_state_dict(state["loader"])
            start_step, resumed_from = state["step"], tag
            say(f"resumed from {src_dir / tag} at step {start_step}")

    # ---- metrics ----------------------------------------------------------------------------------------
    cfg_l = engine.module.config if not mc.lora.enabled else engine.module.base_model.model.config
    head_dim = getattr(cfg_l, "head_dim", None) or cfg_l.hidden_size // cfg_l.num_attention_heads
    fpt = flops_per_token(n_total, n_trainable, mc.lora.enabled, cfg_l.num_hidden_layers,
                          cfg_l.num_attention_heads, head_dim, manifest["seq_len"])
    peak = peak_flops(torch.cuda.get_device_name() if device_type == "cuda" else None)
    logger = MetricsLogger(run_dir, enabled=is_main, wandb_cfg=cfg.wandb, run_name=cfg.run_name,
                           config=cfg.model_dump(mode="json"), resume_step=start_step if resumed_from else None)
    if tc.record_order:
        (run_dir / "order").mkdir(parents=True, exist_ok=True)

    def state_at(step: int, stopped: str | None) -> dict:
        return {"step": step, "epoch": loader.epoch, "loader": loader.state_dict(), "world_size": world,
                "total_steps": total_steps, "config_hash": cfg.hash("model"), "train_hash": cfg.hash("train"),
                "wandb_run_id": logger.wandb_id, "stopped_by_signal": stopped, "lora": mc.lora.enabled,
                "base_model": base_path, "tokenizer": tok_path,
                "dtype": str(dtype).replace("torch.", ""), "time": time.time()}

    def save(step: int, stopped: str | None = None) -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = state_at(step, stopped)
        tag = ckpt.save(engine, ckpt_dir, step, state, rank=rank, keep_last=tc.keep_last, barrier=dist.barrier,
                        fault=fault)
        if on_checkpoint:
            on_checkpoint(ckpt_dir / tag, state)

    # ---- the loop ---------------------------------------------------------------------------------------
    from tqdm import tqdm

    say(f"steps: {total_steps} ({spe}/epoch; {dropped_rows} rows/epoch left out to keep ranks even) | "
        f"tokens/step <= {world * tc.micro_batch_size * tc.grad_accum * manifest['seq_len']:,}")
    bar = tqdm(total=total_steps, initial=start_step, disable=not is_main, desc="train", file=sys.stderr)
    # small collectives go on the device the backend serves (nccl: GPU tensors only); the loss is summed on the
    # device and the counts on the host, so nothing waits for the GPU between log points
    cdev = engine.device
    loss_acc = torch.zeros((), dtype=torch.float64, device=cdev)
    host_acc = [0.0, 0.0, 0.0]  # label tokens, real tokens, rows (this rank, this log window)
    t_window, last_eval, last_saved, eval_loss, step = time.perf_counter(), None, None, None, start_step
    stop = torch.zeros(1, device=cdev)
    prof = None
    for step in range(start_step + 1, total_steps + 1):
        stop[0] = float(_STOP["signum"])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at this boundary, whoever got the signal
        if stop.item() > 0:
            step, sig = step - 1, signal.Signals(int(stop.item())).name
            say(f"{sig}: saving step {step} and exiting {tc.requeue_exit_code} so the job can be requeued")
            save(step, sig)
            if is_main:
                write_metrics(run_dir / "requeue.json", {"step": step, "exit_code": tc.requeue_exit_code,
                                                         "signal": sig})
            logger.finish()
            dist.barrier()
            dist.destroy_process_group()
            return tc.requeue_exit_code
        if tc.profile_steps and step == start_step + 3:
            prof = _start_profiler(device_type)
        t0 = time.perf_counter()
        micro, keys = loader.next_step()
        if tc.record_order:
            with (run_dir / "order" / f"rank{rank}.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, "epoch": loader.epoch, "rows": keys}) + "\n")
        counts = [label_count(m["labels"], m["position_ids"]) for m in micro]
        count = torch.tensor([float(sum(counts))]).to(cdev)
        dist.all_reduce(count)
        # DeepSpeed averages gradients over ranks; multiplying by world makes the result sum / global count
        scale = world / max(count.item(), 1.0)
        lr = engine.get_lr()[0]
        for m, n in zip(micro, counts):
            loss_sum = _loss_sum(engine, m)
            engine.backward(loss_sum * scale, scale_wrt_gas=False)
            engine.step()
            loss_acc += loss_sum.detach().double()
            for j, v in enumerate((n, m["real_tokens"], m["input_ids"].shape[0])):
                host_acc[j] += v
        step_s = time.perf_counter() - t0
        if prof is not None and step == start_step + 2 + tc.profile_steps:
            _stop_profiler(prof, device_type, run_dir / "profile.txt" if is_main else None, tc.profile_steps)
            prof = None
        bar.update(1)
        if fault:
            fault("after_step", step)

        if step % tc.log_every == 0 or step == total_steps:
            window = torch.cat([loss_acc.view(1), torch.tensor(host_acc, dtype=torch.float64).to(cdev)])
            dist.all_reduce(window)
            window = window.cpu()
            elapsed = time.perf_counter() - t_window
            tps = window[2].item() / elapsed
            gn = engine.get_global_grad_norm()
            metrics = {
                "train/loss": window[0].item() / max(window[1].item(), 1), "train/lr": lr,
                "train/grad_norm": float(gn) if gn is not None else None, "train/epoch": loader.epoch,
                "perf/tokens": int(window[2].item()), "perf/tokens_per_s": tps, "perf/tokens_per_s_per_device": tps / world,
                "perf/mfu": mfu(tps / world, fpt, peak),
                "perf/packing_efficiency": window[2].item() / max(window[3].item() * manifest["seq_len"], 1),
                "perf/step_s": step_s, "mem/peak_gib": _peak_mem_gib(device_type),
            }
            if tc.eval_every and len(val_rows) and step % tc.eval_every == 0:
                eval_loss = evaluate(engine, val_rows, rank=rank, world=world, micro_batch_size=tc.micro_batch_size,
                                     pad_token_id=pad_id, max_rows=tc.eval_max_rows)
                metrics["eval/loss"], last_eval = eval_loss, step
            logger.log(step, metrics)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            loss_acc.zero_()
            host_acc = [0.0, 0.0, 0.0]
            t_window = time.perf_counter()
        elif tc.eval_every and len(val_rows) and step % tc.eval_every == 0:
            eval_loss = evaluate(engine, val_rows, rank=rank, world=world, micro_batch_size=tc.micro_batch_size,
                                 pad_token_id=pad_id, max_rows=tc.eval_max_rows)
            logger.log(step, {"eval/loss": eval_loss})
            last_eval = step
        if tc.save_every and step % tc.save_every == 0 and step != total_steps:
            save(step)
            last_saved = step
    bar.close()

    # ---- end: final eval, final checkpoint, summary -----------------------------------------------------
    if len(val_rows) and last_eval != step and step > start_step:
        eval_loss = evaluate(engine, val_rows, rank=rank, world=world, micro_batch_size=tc.micro_batch_size,
                             pad_token_id=pad_id, max_rows=tc.eval_max_rows)
        logger.log(step, {"eval/loss": eval_loss})
    if last_saved != step and tc.save_final:
        save(step)
        last_saved = step
    if is_main:
        from train.metrics import read_metrics

        hist = read_metrics(run_dir / "metrics.jsonl")
        losses = [r["train/loss"] for r in hist if "train/loss" in r]
        tps = [r["perf/tokens_per_s"] for r in hist if "perf/tokens_per_s" in r]
        summary = {
            "steps": step, "epochs_seen": round(step / spe, 3), "world_size": world, "lora": mc.lora.enabled,
            "params_total": n_total, "params_trainable": n_trainable, "attn": attn,
            "attn_kernel": attn_kernel,
            "dtype": str(dtype).replace("torch.", ""), "first_train_loss": losses[0] if losses else None,
            "last_train_loss": losses[-1] if losses else None, "eval_loss": eval_loss,
            "tokens_per_s_mean": sum(tps) / len(tps) if tps else None,
            "mfu": mfu(sum(tps) / len(tps) / world, fpt, peak) if tps else None,
            "peak_mem_gib": _peak_mem_gib(device_type),
            "checkpoint": str(ckpt_dir / ckpt.tag_for(last_saved)) if last_saved is not None else None,
            "resumed_from": resumed_from, "rows_left_out_per_epoch": dropped_rows,
        }
        logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        write_metrics(run_dir / "train_summary.json", summary)
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
        print_summary("cbt-llm train", {k: ("-" if v is None else v) for k, v in summary.items()}, file=sys.stderr)
    logger.finish()
    dist.barrier()
    dist.destroy_process_group()
    return 0
