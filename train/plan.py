"""What `cbt-llm train --dry-run` prints after the resolved config: rows and tokens per optimizer step and steps per
epoch, from the shards' manifest when it is there (train.tokens_per_micro_batch needs its seq_len to become rows)."""

from __future__ import annotations

from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError
from train.data import load_manifest, rows_per_micro_batch, steps_per_epoch


def batch_arithmetic(cfg: Config) -> str:
    """The batch arithmetic of a run, as '#' comment lines; a missing manifest says so instead of the step counts."""
    tc = cfg.train
    world = cfg.data.world_size  # the ranks the shards were sized for
    where = (
        "data.out_dir"
        if tc.data_dir == cfg.data.out_dir
        else f"train.data_dir, set apart from data.out_dir {cfg.data.out_dir}"
    )
    reads = f"# data: reads the shards in {tc.data_dir} ({where})"
    try:
        m = load_manifest(tc.data_dir)
        mb = rows_per_micro_batch(tc, m["seq_len"])
        spe, left_out = steps_per_epoch(m, world, mb, tc.grad_accum)
    except ConfigError as exc:
        return (
            f"{reads}\n# batch: world_size {world} x micro_batch_size {tc.micro_batch_size} x grad_accum "
            f"{tc.grad_accum}\n# steps per epoch: unknown ({exc})"
        )
    rows_per_step = world * mb * tc.grad_accum
    budget = (
        f" (train.tokens_per_micro_batch {tc.tokens_per_micro_batch} // seq_len {m['seq_len']})"
        if tc.tokens_per_micro_batch
        else ""
    )
    eff = m["packing_efficiency"]["train"]
    total = tc.max_steps or tc.epochs * spe
    return "\n".join(
        [
            reads,
            f"# batch: world_size {world} x micro_batch_size {mb}{budget} x grad_accum {tc.grad_accum} "
            f"= {rows_per_step} packed rows per optimizer step",
            f"# tokens per micro-batch: <= {mb * m['seq_len']:,} per rank",
            f"# tokens per step: <= {rows_per_step * m['seq_len']:,} (about {rows_per_step * m['seq_len'] * eff:,.0f} "
            f"real at packing efficiency {eff:.3f}); steps per epoch: {spe} ({left_out} rows left out); "
            f"total steps: {total}",
        ]
    )
