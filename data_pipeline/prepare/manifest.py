"""What a prepare run says about itself: manifest.json's content (its format: data_pipeline/shards.py, the
contract every later stage reads), the hash of the data settings that shaped the shards, and the run's metrics."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cbt_llm.core.config import DataConfig
from data_pipeline.packing import packing_efficiency
from data_pipeline.prepare import screen
from data_pipeline.prepare.split import overlong_policy
from data_pipeline.prepare.write import SplitPacker
from data_pipeline.shards import MANIFEST_SCHEMA_VERSION, SPLITS


def data_config_hash(dc: DataConfig) -> str:
    """Hash of everything in data: that changes the shards (out_dir is where they go; the ray_* fields are how
    Ray runs, never what the shards hold)."""
    obj = {k: v for k, v in dc.model_dump(mode="json").items() if k != "out_dir" and not k.startswith("ray_")}
    if not screen.enabled(dc):  # the pass off leaves the hash as it was before these settings existed
        del obj["near_dup"], obj["quality"]
    if obj.get("on_input_error") == "stop":  # so does the default: a run that writes shards read every file
        del obj["on_input_error"]
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def split_counts(dc: DataConfig, counts: dict[str, int]) -> dict[str, int]:
    """Conversations split on turn boundaries (counted once each) and the pieces of them kept; only under the
    split policy, so the other policies' manifests stay as they were."""
    if overlong_policy(dc) != "split":
        return {}
    return {"split_sessions": counts["split_sessions"], "split_pieces": counts["split_pieces"]}


def build_manifest(
    dc: DataConfig,
    files: list[str],
    tok_hash: str,
    pad_id: int,
    counts: dict[str, int],
    rejected: dict[str, int],
    packers: dict[str, SplitPacker],
    shards: dict[str, list[dict]],
    question_files: dict[str, dict],
    scorer_signature: str = "",
    quarantined: list[dict] | None = None,
) -> dict:
    """manifest.json's content (its format: data_pipeline/shards.py). `quarantined`: the damaged input files
    data.on_input_error: quarantine left out ({path, reason, lines_read, bytes_read, bytes}), in input order."""
    train_rows = packers["train"].rows
    pairs = dc.format == "preference"
    man = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "seq_len": dc.seq_len,
        "packing": dc.packing,
        "packer": dc.packer if dc.packing else None,
        "pad_token_id": pad_id,
        "tokenizer": {"name_or_path": dc.tokenizer, "hash": tok_hash},
        "config_hash": data_config_hash(dc),
        "system_prompt": dc.system_prompt,
        "format": dc.format,
        # pairs for preference optimisation; an SFT manifest has no objective key (shards.objective_of)
        **({"objective": "preference"} if pairs else {}),
        "inputs": [{"path": f, "bytes": os.path.getsize(f) if "://" not in f else None} for f in files],
        # only when a file was left out: a clean run writes the manifest it always did
        **({"quarantined": quarantined} if quarantined else {}),
        "counts": {
            "read": counts["read"],
            "kept": counts["kept"],
            "rejected": dict(sorted(rejected.items())),
            "rejected_total": sum(rejected.values()),
            "truncated": counts["truncated"],
            **split_counts(dc, counts),
            "examples": {s: packers[s].examples for s in SPLITS},
            **({"pairs": {s: packers[s].examples for s in SPLITS}} if pairs else {}),
            "rows": {s: packers[s].rows for s in SPLITS},
            "tokens": {s: packers[s].tokens for s in SPLITS},
            "label_tokens": {s: packers[s].label_tokens for s in SPLITS},
        },
        "packing_efficiency": {
            s: round(packing_efficiency(packers[s].tokens, packers[s].rows, dc.seq_len), 6) for s in SPLITS
        },
        "world_size": dc.world_size,
        # rank r reads train shards r, r+W, r+2W, ...; rows per rank differ by at most one
        "rows_per_rank": [sum(e["rows"] for e in shards["train"][r :: dc.world_size]) for r in range(dc.world_size)],
        "rows_uneven": train_rows % dc.world_size,
        "splits": {s: {"shards": shards[s]} for s in SPLITS},
        # how an example's split was chosen (data_pipeline.sources.formats.split_of), and the questions as text / hashes
        "split_rule": {
            "key": "normalised last user turn" if pairs else "normalised question",
            "val_fraction": dc.val_fraction,
            "seed": dc.seed,
        },
        **question_files,
        # only when it ran: a run without it writes the manifest it always did
        **({"screen": screen.manifest_entry(dc, scorer_signature)} if screen.enabled(dc) else {}),
    }
    return man


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def run_metrics(man: dict, pack_s: float, ray_s: float, stream_s: float, seconds: float, out: Path) -> dict:
    """prepare_metrics.json and the summary table. Rates are over the stream only; Ray start-up is its own line."""
    c = man["counts"]
    total_tokens = sum(c["tokens"].values())
    quarantined = man.get("quarantined", [])
    return {
        **({"quarantined_files": len(quarantined)} if quarantined else {}),
        **{
            f"quarantined: {Path(q['path']).name}": f"{_short(q['reason'], 56)} ({q['lines_read']:,} lines read)"
            for q in quarantined
        },
        "records_read": c["read"],
        "examples_kept": c["kept"],
        "rejected": c["rejected_total"],
        **{f"rejected.{k}": v for k, v in c["rejected"].items()},
        "truncated": c["truncated"],
        **{k: c[k] for k in ("split_sessions", "split_pieces") if k in c},
        "rows.train": c["rows"]["train"],
        "rows.validation": c["rows"]["validation"],
        "train_shards": len(man["splits"]["train"]["shards"]),
        "rows_uneven(train % world_size)": man["rows_uneven"],
        "tokens": total_tokens,
        "label_tokens": sum(c["label_tokens"].values()),
        "packing_efficiency.train": man["packing_efficiency"]["train"],
        "packing_efficiency.validation": man["packing_efficiency"]["validation"],
        "records/s": c["read"] / stream_s,
        "tokens/s": total_tokens / stream_s,
        "ray_startup_s": round(ray_s, 3),
        "pack_s": round(pack_s, 3),
        "seconds": round(seconds, 3),
        "out_dir": str(out),
    }
