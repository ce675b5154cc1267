"""Config section of `cbt-llm launch`: the deepspeed launcher, Slurm and Ray."""

from __future__ import annotations

from pydantic import Field

from cbt_llm.core.config.base import Section


class SlurmConfig(Section):
    """`cbt-llm launch slurm`: the sbatch script (one torchrun per node, c10d rendezvous, requeue on preemption)."""

    partition: str = Field("", description="#SBATCH --partition (empty: the cluster's default).")
    account: str = Field("", description="#SBATCH --account (empty: your default).")
    time: str = Field("24:00:00", description="#SBATCH --time wall-clock limit (D-HH:MM:SS or HH:MM:SS).")
    cpus_per_task: int = Field(0, ge=0, description="#SBATCH --cpus-per-task for each node's torchrun (0: omit).")
    mem: str | int = Field("", description="#SBATCH --mem per node, e.g. 480G (empty: omit; 0 = all of it).")
    grace_s: int = Field(
        120,
        ge=10,
        description="#SBATCH --signal=B:USR1@grace: seconds before the time limit that training gets to checkpoint.",
    )
    max_restarts: int = Field(
        20,
        ge=0,
        description="Requeue the job at most this many times (SLURM_RESTART_COUNT) after a checkpoint-and-exit.",
    )
    rdzv_port: int = Field(29500, ge=1024, le=65535, description="TCP port of the c10d rendezvous on the head node.")
    log_dir: str = Field(
        "", description="Folder for the job's logs, one per job, restart and node (empty: <train.run_dir>/slurm)."
    )
    container: str = Field(
        "", description="Apptainer/Singularity image (.sif) to run torchrun in, `apptainer exec --nv` (empty: none)."
    )
    extra_sbatch: list[str] = Field(
        default_factory=list, description="More #SBATCH lines, e.g. ['--qos=high', '--constraint=h100']."
    )


class RayLaunchConfig(Section):
    """`cbt-llm launch ray`: a Ray cluster job running Ray Train's TorchTrainer (V2 API)."""

    address: str = Field(
        "", description="Ray cluster address for `ray job submit` (empty: $RAY_ADDRESS, else a local cluster)."
    )
    storage_path: str = Field("", description="Where Ray Train keeps checkpoints (empty: <train.run_dir>/ray).")
    max_failures: int = Field(
        2, ge=0, description="FailureConfig(max_failures): restarts from the last checkpoint after a worker dies."
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")


class LaunchConfig(Section):
    """`cbt-llm launch`: how a training run reaches machines. World size = nodes x gpus_per_node."""

    nodes: int = Field(1, ge=1, description="Number of machines.")
    gpus_per_node: int = Field(
        0, ge=0, description="Training processes per machine: GPUs, or processes on CPU (0: data.world_size / nodes)."
    )
    cpu: bool = Field(False, description="Run on CPU with gloo (tests, the demo); no GPUs are requested.")
    master_addr: str = Field(
        "127.0.0.1", description="deepspeed multi-node without ssh: address of node 0 that every node can reach."
    )
    master_port: int = Field(29500, ge=1024, le=65535, description="TCP port of the rank-0 rendezvous.")
    hostfile: str = Field(
        "",
        description="deepspeed multi-node over ssh/pdsh: hostfile ('host slots=N' per line); empty: --no_ssh, "
        "one command per node.",
    )
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    ray: RayLaunchConfig = Field(default_factory=RayLaunchConfig)
