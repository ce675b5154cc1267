"""`cbt-llm launch {deepspeed,slurm,ray}`: render the script, check, then run or submit it.

The script is written to <train.run_dir>/launch/ before it runs, so what ran can always be read back.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.fileio import write_text_atomic
from cbt_llm.core.report import print_summary, write_metrics
from launch.preflight import preflight
from launch.render import TrainCommand, render

_SCRIPT_NAMES = {"deepspeed": "deepspeed.sh", "slurm": "slurm.sbatch", "ray": "ray_job.sh"}


def _env() -> dict:
    """The launch environment: this Python's bin folder first on PATH so `cbt-llm`, `deepspeed`, `torchrun`
    and `ray` resolve to the same install (sbatch passes the environment on to the job)."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".torch_extensions").resolve()))
    return env


def write_script(launcher: str, cfg: Config, text: str) -> Path:
    """Write the rendered script under <run_dir>/launch/ (executable) and return its path."""
    # atomically: under --no_ssh every node writes this same file while another node's bash may be reading it
    return write_text_atomic(Path(cfg.train.run_dir) / "launch" / _SCRIPT_NAMES[launcher], text, mode=0o755)


def _need(tool: str, hint: str) -> None:
    from shutil import which

    if not which(tool, path=_env()["PATH"]):
        raise ConfigError(f"`{tool}` not found on PATH; {hint}")


def run_launch(
    launcher: str,
    cfg: Config,
    cmd: TrainCommand,
    *,
    dry_run: bool = False,
    node_rank: int | None = None,
    wait: bool = False,
) -> int:
    """Render, preflight, then run (deepspeed), submit (slurm) or submit-and-follow (ray). Returns an exit code."""
    text = render(launcher, cfg, cmd)
    if dry_run:
        print(text, end="")
        return 0
    facts = preflight(cfg, launcher)
    script = write_script(launcher, cfg, text)
    t0 = time.time()
    summary: dict = {"launcher": launcher, **facts, "script": str(script)}
    env = _env()
    if launcher == "deepspeed":
        _need("deepspeed", "install deepspeed (pip install -c constraints.txt deepspeed)")
        if cfg.launch.nodes > 1 and not cfg.launch.hostfile:
            if node_rank is None:
                raise ConfigError(
                    "--node-rank is required for a multi-node launch without launch.hostfile (0 on launch.master_addr)"
                )
            env["NODE_RANK"] = str(node_rank)
            summary["node_rank"] = node_rank
        rc = subprocess.call(["bash", str(script)], env=env)
    elif launcher == "slurm":
        _need("sbatch", "run this on a Slurm login node, or use `--dry-run` to print the script")
        args = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + [str(script)]
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
        m = re.match(r"\s*(\d+)", proc.stdout)
        summary["job_id"] = m.group(1) if m else None
        if proc.returncode and not m:
            print(proc.stderr.strip(), file=sys.stderr)
        rc = proc.returncode
        print(f"submitted Slurm job {summary['job_id']}; logs in {facts.get('slurm_log_dir', '')}", file=sys.stderr)
    else:
        _need("ray", "install ray (pip install -c constraints.txt 'ray[default]')")
        if not (cfg.launch.ray.address or env.get("RAY_ADDRESS")):
            raise ConfigError(
                "no Ray cluster: set launch.ray.address (or RAY_ADDRESS) to the dashboard, e.g. http://head:8265"
            )
        # `ray job submit` follows the job's log and exits 1 when the job failed (launch.ray_job exits non-zero)
        rc = subprocess.call(["bash", str(script)], env=env)
        summary["ray_address"] = cfg.launch.ray.address or env.get("RAY_ADDRESS")
    summary.update(exit_code=rc, seconds=round(time.time() - t0, 1))
    print_summary(f"cbt-llm launch {launcher}", summary, file=sys.stderr)
    write_metrics(Path(cfg.train.run_dir) / "launch" / f"{launcher}.json", summary)
    return rc
