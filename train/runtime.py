"""Process housekeeping around a training run: the launcher's environment, preemption signals (and the ranks'
agreement on them), DeepSpeed's CPU op build, its /dev/shm buffers, library log levels, peak memory and the
profiler. Nothing here trains."""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

_STOP = {"signum": 0}


def _on_signal(signum, frame):  # only set a flag: the loop decides, together with the other ranks, when to stop
    _STOP["signum"] = int(signum)


def install_stop_signals() -> None:
    """SIGTERM / SIGUSR1 set the stop flag instead of killing the process. Installed first thing, so a preemption
    during the (long) start-up is not lost. Only the main thread may install handlers: Ray Train runs the loop in
    a worker thread, where a lost or preempted node is handled by Ray restarting the group from a checkpoint."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, _on_signal)


def stop_signal() -> int:
    """The signal number received since start-up, 0 if none."""
    return _STOP["signum"]


class StopFlag:
    """Every rank's agreement, at a step boundary, on whether any of them received a stop signal."""

    def __init__(self, device):
        self.flag = torch.zeros(1, device=device)  # collectives live on the device the backend serves

    def agreed(self) -> str | None:
        """The name of a stop signal any rank received (a collective: every rank calls it); None if none."""
        import torch.distributed as dist

        self.flag[0] = float(stop_signal())
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
        return signal.Signals(int(self.flag.item())).name if self.flag.item() > 0 else None


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; a bare process is a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def quiet_libraries() -> None:
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*|.*reduce_scatter_tensor.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calls the old name


def peak_mem_gib(device_type: str) -> float:
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: this process's peak RSS


# ---- DeepSpeed's CPU shared-memory op -----------------------------------------------------------------------

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
        print(
            f"removing stale DeepSpeed build lock {lock} ({age:.0f} s old, left by an interrupted build)",
            file=sys.stderr,
            flush=True,
        )
        lock.unlink(missing_ok=True)


def extension_build_env() -> None:
    """Where and with which tools DeepSpeed JIT-builds its CPU op; drops a lock left by a killed build."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".torch_extensions").resolve()))
    _prefer_this_environments_tools()
    _clear_stale_extension_lock()


def prebuild_ops() -> None:
    """Compile DeepSpeed's CPU comm op once, serially, before parallel jobs (make test, CI) need it."""
    extension_build_env()
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


@contextmanager
def shm_buffers_removed():
    """DeepSpeed never unlinks its shared-memory buffers (~66 MB of RAM per rank per run, in tmpfs), and a stale
    one under the same name can confuse a later run on the same port: drop ours before and after."""
    for p in _shm_buffers():
        p.unlink(missing_ok=True)
    try:
        yield
    finally:
        for p in _shm_buffers():
            p.unlink(missing_ok=True)


# ---- profiler -----------------------------------------------------------------------------------------------


class StepProfiler:
    """torch.profiler over `steps` optimizer steps starting at `first` (after warm-up); rank 0 writes the top
    operators by self time (device time on CUDA) to `out`. steps=0: does nothing."""

    def __init__(self, steps: int, first: int, device_type: str, out: Path | None):
        self.steps, self.first, self.device_type, self.out, self.prof = steps, first, device_type, out, None

    def before_step(self, step: int) -> None:
        if self.steps and step == self.first:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device_type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()

    def after_step(self, step: int) -> None:
        if self.prof is None or step != self.first + self.steps - 1:
            return
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        if self.out is not None:
            key = "self_cuda_time_total" if self.device_type == "cuda" else "self_cpu_time_total"
            table = self.prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
            self.out.write_text(
                f"torch.profiler over {self.steps} optimizer steps, sorted by {key}\n{table}\n", encoding="utf-8"
            )
        self.prof = None
