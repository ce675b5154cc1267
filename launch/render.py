"""Render launcher scripts from the typed config: deepspeed launcher, Slurm sbatch, Ray job.

Nothing here is a hand-edited template with values to fill in by hand: every number in a script comes from
`cfg.launch` (nodes, processes per node, ports, Slurm fields) or `cfg.train` (run folder, requeue exit code),
so the script and the training config cannot disagree. The training command inside every script is the same
`cbt-llm train --config <file> <overrides>` a user runs by hand, so what the script trains is exactly what
`cbt-llm train --dry-run` with the same arguments prints.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError

LAUNCHERS = ("deepspeed", "slurm", "ray")


@dataclass
class TrainCommand:
    """What the launched processes run: `cbt-llm train` with this config file and these overrides."""

    config: str | None
    overrides: list[str] = field(default_factory=list)

    def args(self) -> str:
        """The arguments after `cbt-llm train`, shell-quoted."""
        parts = (["--config", self.config] if self.config else []) + list(self.overrides)
        return " ".join(shlex.quote(p) for p in parts)


def procs_per_node(cfg: Config) -> int:
    """Training processes per node: launch.gpus_per_node, or data.world_size / nodes when it is 0."""
    lc = cfg.launch
    if lc.gpus_per_node:
        return lc.gpus_per_node
    if cfg.data.world_size % lc.nodes:
        raise ConfigError(
            f"launch.gpus_per_node is 0 (auto) but data.world_size {cfg.data.world_size} does not divide by "
            f"launch.nodes {lc.nodes}; set --gpus-per-node"
        )
    return cfg.data.world_size // lc.nodes


def world_size(cfg: Config) -> int:
    """Total training processes: nodes x processes per node."""
    return cfg.launch.nodes * procs_per_node(cfg)


def slurm_log_dir(cfg: Config) -> str:
    """launch.slurm.log_dir, or <train.run_dir>/slurm."""
    return cfg.launch.slurm.log_dir or str(Path(cfg.train.run_dir) / "slurm")


def ray_storage_path(cfg: Config) -> str:
    """launch.ray.storage_path, or <train.run_dir>/ray."""
    return cfg.launch.ray.storage_path or str(Path(cfg.train.run_dir) / "ray")


def _header(cfg: Config, what: str, cmd: TrainCommand) -> list[str]:
    return [
        f"# {what} for run '{cfg.run_name}', rendered by `cbt-llm launch` from the typed config; "
        "re-render, don't edit.",
        f"# world size {world_size(cfg)} = {cfg.launch.nodes} node(s) x {procs_per_node(cfg)} process(es); "
        f"run folder {cfg.train.run_dir}",
        f"# trains: cbt-llm train {cmd.args()}",
    ]


def _cpu_env(cfg: Config) -> list[str]:
    if not cfg.launch.cpu:
        return []
    # CPU ranks share the machine's cores: one intra-op thread each avoids oversubscription stalls
    return ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"]


def render_deepspeed(cfg: Config, cmd: TrainCommand) -> str:
    """A bash script running the deepspeed launcher.

    One node: `deepspeed --num_gpus G`. Several nodes with launch.hostfile: one command on node 0 that reaches
    the others over ssh/pdsh. Several nodes without a hostfile: `--no_ssh`, the same script run on every node
    with NODE_RANK set (0 on the node whose address is launch.master_addr).
    """
    lc = cfg.launch
    g = procs_per_node(cfg)
    lines = ["#!/usr/bin/env bash", *_header(cfg, "deepspeed launcher", cmd), "set -euo pipefail", *_cpu_env(cfg)]
    ds = ["deepspeed"]
    if lc.nodes == 1:
        ds += [f"--num_gpus {g}", f"--master_port {lc.master_port}"]
    elif lc.hostfile:
        lines.append(
            f"# node 0 starts all {lc.nodes} nodes over ssh (pdsh); every host in the hostfile needs the same paths"
        )
        ds += [
            f"--hostfile {shlex.quote(lc.hostfile)}",
            f"--num_nodes {lc.nodes}",
            f"--num_gpus {g}",
            f"--master_addr {shlex.quote(lc.master_addr)}",
            f"--master_port {lc.master_port}",
        ]
    else:
        # deepspeed still reads every node's slot count from a hostfile under --no_ssh (the names are only
        # labels there); without one it stops with "Num nodes is >1 but no extra nodes available via hostfile"
        slots = " ".join(f"node{i}" for i in range(lc.nodes))
        lines += [
            f"# no ssh: run this same script on each of the {lc.nodes} nodes, NODE_RANK=0 on {lc.master_addr}",
            f'NODE_RANK="${{NODE_RANK:?set NODE_RANK to the index of this node, 0..{lc.nodes - 1}}}"',
            'HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/cbt-llm-hostfile.XXXXXX")',
            f'for h in {slots}; do echo "$h slots={g}"; done > "$HOSTFILE"',
        ]
        ds += [
            "--no_ssh",
            '--hostfile "$HOSTFILE"',
            f"--num_nodes {lc.nodes}",
            '--node_rank "$NODE_RANK"',
            f"--num_gpus {g}",
            f"--master_addr {shlex.quote(lc.master_addr)}",
            f"--master_port {lc.master_port}",
        ]
    # --no_local_rank: otherwise the launcher puts --local_rank=N before the subcommand; ranks come from env
    ds += ["--no_local_rank", '"$(command -v cbt-llm)"', "train", cmd.args()]
    lines.append("exec " + " \\\n  ".join(ds))
    return "\n".join(lines) + "\n"


def render_slurm(cfg: Config, cmd: TrainCommand) -> str:
    """An sbatch script: one torchrun per node under `srun --kill-on-bad-exit=1`, c10d rendezvous on the head
    node's address, USR1 before the time limit forwarded to training, requeue when training checkpointed.
    """
    lc, sc, tc = cfg.launch, cfg.launch.slurm, cfg.train
    g = procs_per_node(cfg)
    log_dir = slurm_log_dir(cfg)
    run_dir = tc.run_dir
    sb = [
        f"--job-name=cbt-llm-{cfg.run_name}",
        f"--nodes={lc.nodes}",
        "--ntasks-per-node=1",
    ]
    if not lc.cpu:
        sb.append(f"--gpus-per-node={g}")
    if sc.cpus_per_task:
        sb.append(f"--cpus-per-task={sc.cpus_per_task}")
    if sc.mem != "":
        sb.append(f"--mem={sc.mem}")
    if sc.partition:
        sb.append(f"--partition={sc.partition}")
    if sc.account:
        sb.append(f"--account={sc.account}")
    sb += [
        f"--time={sc.time}",
        "--requeue",
        f"--signal=B:USR1@{sc.grace_s}",
        # %x-%j: the job's own log; append, so a requeued job's restarts follow each other in one file
        "--open-mode=append",
        f"--output={log_dir}/%x-%j.out",
        *sc.extra_sbatch,
    ]
    train_args = cmd.args()
    container = f"apptainer exec --nv {shlex.quote(sc.container)} " if sc.container else ""
    L = ["#!/usr/bin/env bash"]
    L += [f"#SBATCH {s}" for s in sb]
    L += _header(cfg, "Slurm batch script", cmd)
    L += [
        "# Preemption: Slurm sends USR1 to this script grace_s before the limit (or `scancel --signal=USR1 --batch`);",
        "# the trap forwards it to training, which checkpoints and exits; then the job requeues itself and the",
        "# next run resumes from the latest checkpoint (train.resume=auto) into the same W&B run.",
        "set -uo pipefail",
        'cd "${SLURM_SUBMIT_DIR:-$PWD}"',
        *_cpu_env(cfg),
        f"RUN_DIR={shlex.quote(run_dir)}",
        f"LOG_DIR={shlex.quote(log_dir)}",
        f"REQUEUE_EXIT={tc.requeue_exit_code}",
        f"MAX_RESTARTS={sc.max_restarts}",
        "RESTART=${SLURM_RESTART_COUNT:-0}",
        'mkdir -p "$LOG_DIR" "$RUN_DIR"',
        'echo "$(date -Is) job $SLURM_JOB_ID restart $RESTART on $SLURM_JOB_NODELIST ($SLURM_NNODES nodes)"',
        "",
        "# The head node's address: its NodeAddr when the cluster sets one, else its host name.",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "HEAD_ADDR=$(scontrol show node \"$HEAD_NODE\" | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p' | head -n 1)",
        "HEAD_ADDR=${HEAD_ADDR:-$HEAD_NODE}",
        f"RDZV_PORT={sc.rdzv_port}",
        "",
        'rm -f "$RUN_DIR/requeue.json"',
        'SIGNALED=""',
        "forward() {",
        "  SIGNALED=$1",
        '  echo "$(date -Is) got SIG$1: asking training to checkpoint and exit"',
        '  [ -n "${SRUN_PID:-}" ] && kill -s "$1" "$SRUN_PID" 2>/dev/null',
        "}",
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "",
        "# One task per node; a task exiting non-zero kills the others (no hang on a dead node).",
        "# torchrun passes USR1 on to its workers and gives them time to save (USR1 is not in its default list).",
        'srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 \\',
        '  --output="$LOG_DIR/%x-%j-r${RESTART}-node%n.log" \\',
        f'  {container}torchrun --nnodes "$SLURM_NNODES" --nproc_per_node {g} \\',
        '  --rdzv_backend c10d --rdzv_endpoint "$HEAD_ADDR:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID" \\',
        "  --max_restarts 0 --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \\",
        f"  -m cbt_llm.cli train {train_args} &",
        "SRUN_PID=$!",
        "# wait returns early when a trapped signal arrives: keep waiting until srun itself has exited",
        "while true; do",
        '  wait "$SRUN_PID"; rc=$?',
        '  kill -0 "$SRUN_PID" 2>/dev/null || break',
        "done",
        'echo "$(date -Is) training step exited with $rc"',
        "",
        "# deepspeed passes the requeue code on; torchrun exits 1, so the run folder's requeue.json tells too",
        'if [ "$rc" -eq "$REQUEUE_EXIT" ] || [ -f "$RUN_DIR/requeue.json" ]; then',
        '  if [ "$RESTART" -ge "$MAX_RESTARTS" ]; then',
        '    echo "$(date -Is) checkpointed, but restart $RESTART reached '
        'launch.slurm.max_restarts=$MAX_RESTARTS; not requeueing"',
        '    exit "$REQUEUE_EXIT"',
        "  fi",
        '  echo "$(date -Is) checkpoint saved; requeueing job $SLURM_JOB_ID (restart $((RESTART + 1)))"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'exit "$rc"',
    ]
    return "\n".join(L) + "\n"


def render_ray(cfg: Config, cmd: TrainCommand) -> str:
    """A bash script submitting a Ray job (`ray job submit` to $RAY_ADDRESS) that runs `cbt-llm launch ray
    --entrypoint` (launch.ray_job.run_job) on the cluster."""
    lc = cfg.launch
    addr = lc.ray.address
    L = ["#!/usr/bin/env bash", *_header(cfg, "Ray cluster job", cmd), "set -euo pipefail", *_cpu_env(cfg)]
    if addr:
        L.append(f"export RAY_ADDRESS={shlex.quote(addr)}")
    L += [
        'export RAY_ADDRESS="${RAY_ADDRESS:?set RAY_ADDRESS to the cluster, e.g. http://head:8265}"',
        "# the entrypoint runs on the head node in this folder (a shared file system, as for Slurm);",
        f"# every checkpoint is reported to {ray_storage_path(cfg)} and restored workers load from there;",
        "# the job's exit code is the trainer's: non-zero when training failed after launch.ray.max_failures restarts",
        'exec ray job submit --submission-id "cbt-llm-' + cfg.run_name + '-$(date +%s)" -- \\',
        f'  bash -c "cd $PWD && python -m cbt_llm.cli launch ray --entrypoint {train_args_escaped(cmd)}"',
    ]
    return "\n".join(L) + "\n"


def train_args_escaped(cmd: TrainCommand) -> str:
    """cmd.args() made safe inside a double-quoted bash string."""
    return cmd.args().replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")


def render(launcher: str, cfg: Config, cmd: TrainCommand) -> str:
    """The script for `launcher` (one of LAUNCHERS)."""
    if launcher == "deepspeed":
        return render_deepspeed(cfg, cmd)
    if launcher == "slurm":
        return render_slurm(cfg, cmd)
    if launcher == "ray":
        return render_ray(cfg, cmd)
    raise ConfigError(f"launcher '{launcher}' is not one of {', '.join(LAUNCHERS)}")


# The readable examples under launch/examples/: (file name, launcher, config, overrides). A test re-renders them
# and fails when they are stale; refresh with `python -m launch.render`.
EXAMPLES = [
    ("deepspeed-1node-8gpu.sh", "deepspeed", "configs/train/qwen2.5-7b-lora.yaml", ["launch.gpus_per_node=8"]),
    (
        "deepspeed-2node-no-ssh.sh",
        "deepspeed",
        "configs/train/qwen2.5-7b-lora.yaml",
        ["launch.nodes=2", "launch.gpus_per_node=8", "launch.master_addr=10.0.0.1"],
    ),
    (
        "deepspeed-2node-hostfile.sh",
        "deepspeed",
        "configs/train/qwen2.5-7b-full.yaml",
        ["launch.nodes=2", "launch.gpus_per_node=8", "launch.master_addr=node001", "launch.hostfile=hostfile"],
    ),
    (
        "slurm-4node-8gpu.sbatch",
        "slurm",
        "configs/train/qwen2.5-7b-lora.yaml",
        [
            "launch.nodes=4",
            "launch.gpus_per_node=8",
            "launch.slurm.partition=gpu",
            "launch.slurm.time=2-00:00:00",
            "launch.slurm.cpus_per_task=64",
            "launch.slurm.mem=0",
        ],
    ),
    (
        "slurm-2node-apptainer.sbatch",
        "slurm",
        "configs/train/baichuan2-7b-lora.yaml",
        ["launch.nodes=2", "launch.gpus_per_node=8", "launch.slurm.container=cbt-llm.sif"],
    ),
    (
        "ray-job-8gpu.sh",
        "ray",
        "configs/train/qwen2.5-7b-lora.yaml",
        ["launch.gpus_per_node=8", "launch.ray.storage_path=/shared/ray-results"],
    ),
    ("slurm-demo-cpu.sbatch", "slurm", "configs/demo-cpu.yaml", ["launch.cpu=true"]),
]


def render_example(name: str, launcher: str, config: str, overrides: list[str]) -> str:
    """One example script, rendered exactly as `cbt-llm launch <launcher> --config <config> <overrides> --dry-run`."""
    from cbt_llm.core.config import load_config

    return render(launcher, load_config(config, overrides), TrainCommand(config=config, overrides=overrides))


def write_examples(out_dir: str | Path = Path(__file__).parent / "examples") -> list[Path]:
    """(Re)write launch/examples/ from EXAMPLES."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, launcher, config, overrides in EXAMPLES:
        p = out / name
        p.write_text(render_example(name, launcher, config, overrides), encoding="utf-8")
        written.append(p)
    return written


if __name__ == "__main__":
    for path in write_examples():
        print(path)
