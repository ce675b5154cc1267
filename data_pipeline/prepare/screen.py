"""The quality gate and near-duplicate signatures (Ray tasks, between parse and tokenize; only when
data.quality or data.near_dup asks for them).

Per good example:
- quality: the structure scorer's coverage (0-5 parts present, cbt_llm/domain/structure.py) of its assistant
  turns, one paragraph each, and the judge total its record carries in meta.judge.total (cbt_llm/domain/record.py).
  An example under data.quality.min_structure_coverage, or with a judge total under data.quality.min_judge_total,
  becomes a `low_quality` reject whose detail gives the score and the threshold. A record without a judge total
  is not judged (the template corpus carries none; gate those on coverage); a judge total that is not a number
  is a reject, never a pass.
- near_dup: the `bands` column (neardup.band_hashes of the example's MinHash signature), which the driver's
  NearDupIndex decides on in (file, line) order.
"""

from __future__ import annotations

import functools
import json
import math
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa

from cbt_llm.core.config import DataConfig
from data_pipeline.prepare import neardup
from data_pipeline.prepare.parse import PARSED_FIELDS, RAW_KEEP_CHARS


@functools.lru_cache(maxsize=2)
def _scorer(path: str):
    """The structure scorer, loaded once per worker process (Ray reuses them across tasks)."""
    from cbt_llm.domain.structure import load_scorer

    return load_scorer(path)


def assistant_text(messages: list[dict[str, str]]) -> str:
    """What the structure scorer reads: the assistant turns, one paragraph each (a single answer as it is)."""
    return "\n".join(m["content"] for m in messages if m["role"] == "assistant")


class Screen:
    """Ray Data step (an instance, run as tasks): low_quality rejects and the `bands` column.

    scorer: the structure scorer's .npz (the driver built or loaded it), "" when coverage is not gated;
    min_coverage / min_judge: 0 turns that check off; num_perm 0 turns near-duplicate signatures off.
    """

    def __init__(self, scorer: str, min_coverage: int, min_judge: float, num_perm: int, shingle: int, threshold: float):
        self.scorer, self.min_coverage, self.min_judge = scorer, min_coverage, min_judge
        self.num_perm, self.shingle = num_perm, shingle
        self.bands, self.rows = neardup.lsh_params(threshold, num_perm) if num_perm else (0, 0)

    def __call__(self, table: pa.Table) -> pa.Table:
        d = table.select(["ok", "reason", "detail", "raw", "example_id", "judge", "messages"]).to_pydict()
        bands: list[list[int]] = []
        sketches: list[bytes] = []
        for i, ok in enumerate(d["ok"]):
            if not ok:
                bands.append([])
                sketches.append(b"")
                continue
            messages = json.loads(d["messages"][i])
            low = self.low_quality(messages, d["judge"][i])
            if low:
                d["ok"][i], d["reason"][i] = False, "low_quality"
                d["detail"][i] = f"{d['example_id'][i]}: {low}"
                d["raw"][i] = d["messages"][i][:RAW_KEEP_CHARS]
                bands.append([])
                sketches.append(b"")
                continue
            band, sk = self.signature(messages)
            bands.append(band)
            sketches.append(sk)
        types = dict(PARSED_FIELDS)
        for k in ("ok", "reason", "detail", "raw"):
            table = table.set_column(table.schema.get_field_index(k), k, pa.array(d[k], types[k]))
        table = table.append_column("bands", pa.array(bands, pa.list_(pa.int64())))
        return table.append_column("sketch", pa.array(sketches, pa.binary()))

    def low_quality(self, messages: list[dict[str, str]], judge: float | None) -> str:
        """Why an example fails the gate ("" when it passes): its score against the threshold."""
        if self.min_judge and judge is not None:
            if math.isnan(judge):
                return "meta.judge.total is not a number; fix the record or set data.quality.min_judge_total=0"
            if judge < self.min_judge:
                return f"judge total {judge:g} < data.quality.min_judge_total {self.min_judge:g}"
        if self.min_coverage:
            coverage = _scorer(self.scorer).score(assistant_text(messages))["coverage"]
            if coverage < self.min_coverage:
                return f"structure coverage {coverage} < data.quality.min_structure_coverage {self.min_coverage}"
        return ""

    def signature(self, messages: list[dict[str, str]]) -> tuple[list[int], bytes]:
        """(band hashes, sketch) of an example; empty when near-duplicates are off."""
        if not self.num_perm:
            return [], b""
        sig = neardup.signature(neardup.conversation_text(messages), self.shingle, self.num_perm)
        return neardup.band_hashes(sig, self.bands, self.rows, neardup.crisis_group(messages)), neardup.sketch(sig)


def enabled(dc: DataConfig) -> bool:
    """Whether prepare runs the Screen step: off, the pipeline (and its shards) are as without it."""
    return dc.near_dup.enabled or bool(dc.quality.min_structure_coverage) or bool(dc.quality.min_judge_total)


def load_scorer_once(dc: DataConfig) -> tuple[str, str]:
    """On the driver, before Ray starts: (absolute path, signature) of the structure scorer when coverage is
    gated, built there first if it is missing; ("", "") otherwise. The workers load it from that path."""
    if not dc.quality.min_structure_coverage:
        return "", ""
    from data_pipeline.synth.scorer import load_or_train

    scorer = load_or_train(dc.quality.scorer)
    return str(Path(dc.quality.scorer).resolve()), scorer.signature


def make_screen(dc: DataConfig, scorer_path: str) -> Screen:
    nd, q = dc.near_dup, dc.quality
    num_perm = nd.num_perm if nd.enabled else 0
    return Screen(scorer_path, q.min_structure_coverage, q.min_judge_total, num_perm, nd.shingle, nd.threshold)


def manifest_entry(dc: DataConfig, scorer_signature: str) -> dict:
    """How the screening was done, for manifest.json (written only when the step ran)."""
    entry: dict = {"quality": {**dc.quality.model_dump(), "scorer_signature": scorer_signature or None}}
    if dc.near_dup.enabled:
        bands, rows = neardup.lsh_params(dc.near_dup.threshold, dc.near_dup.num_perm)
        entry["near_dup"] = {
            **dc.near_dup.model_dump(),
            "bands": bands,
            "rows_per_band": rows,
            "text": "user and assistant turns, NFKC, case-folded, without whitespace and punctuation",
            "minhash": f"datasketch {version('datasketch')} MinHash affine32 seed {neardup.SEED}",
        }
    return entry
