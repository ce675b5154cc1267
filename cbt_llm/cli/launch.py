"""`cbt-llm launch deepspeed|slurm|ray`: render the launcher script for the training run and run or submit it; with
`ray --entrypoint`, run the Ray job itself (what `ray job submit` starts on the cluster)."""

from __future__ import annotations

from cbt_llm.cli.args import Flag, add_flags
from cbt_llm.core.config import Config

FLAGS: list[Flag] = [
    ("--nodes", "launch.nodes", int, "machines"),
    ("--gpus-per-node", "launch.gpus_per_node", int, "GPUs per machine (processes per machine on CPU)"),
]
LAUNCHERS = (
    ("deepspeed", "the deepspeed launcher: one node, a hostfile over ssh, or --no_ssh per node"),
    ("slurm", "an sbatch script: torchrun per node, c10d rendezvous, requeue on preemption"),
    ("ray", "a Ray job running Ray Train's TorchTrainer"),
)


def run(cfg: Config, args) -> int:
    if getattr(args, "entrypoint", False):
        from launch.ray_job import run_job

        return run_job(cfg)
    from launch.render import TrainCommand
    from launch.submit import run_launch

    cmd = TrainCommand(config=args.config, overrides=list(args.overrides))
    return run_launch(args.launcher, cfg, cmd, dry_run=args.launch_dry_run, node_rank=args.node_rank, wait=args.wait)


def add_parser(sub) -> None:
    launch = sub.add_parser("launch", help="render and run/submit the training job: deepspeed launcher, Slurm or Ray")
    kinds = launch.add_subparsers(dest="launcher", required=True)
    for name, help_ in LAUNCHERS:
        p = kinds.add_parser(name, help=help_)
        p.add_argument("--config", help="YAML config (see configs/)")
        # its own --dry-run: print the rendered script rather than the resolved config
        p.add_argument(
            "--dry-run", dest="launch_dry_run", action="store_true", help="print the launcher script and exit"
        )
        add_flags(p, FLAGS)
        p.add_argument(
            "--node-rank", type=int, default=None, help="deepspeed --no_ssh multi-node: this machine's index"
        )
        p.add_argument("--wait", action="store_true", help="slurm: wait for the job to finish (sbatch --wait)")
        if name == "ray":
            p.add_argument(
                "--entrypoint",
                action="store_true",
                help="run the Ray job itself, on the cluster (what the submitted script runs); no submission",
            )
        p.add_argument("overrides", nargs="*", help="dotted overrides, passed on to `cbt-llm train` too")
        p.set_defaults(func=run, dry_run=False)
