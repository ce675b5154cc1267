"""The driver's end of prepare's ordered stream (bounded memory): every tokenized batch's bad rows to rejects/
(the first one stops the run under --strict), exact duplicates (dedup.py) and, with data.near_dup, near-duplicates
(neardup.py) of kept examples dropped, the rest handed to its split's packer (write.py) and its question to the
question files. A damaged input file's INPUT_ERROR row is raised as errors.Damaged for the pipeline to decide on."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.prepare.dedup import FirstSeen
from data_pipeline.prepare.errors import Damaged, PrepareError
from data_pipeline.prepare.neardup import NearDupIndex
from data_pipeline.prepare.read import INPUT_ERROR, damage_record
from data_pipeline.prepare.write import QuestionFiles, SplitPacker

_LINE_BITS = 40  # the dedup index stores where a first copy came from as (file_idx << 40) | line


class Rejects:
    """rejects/rejects-00000.jsonl and the count per reason; under --strict the first reject stops the run."""

    def __init__(self, path: Path, files: list[str], strict: bool):
        self.fh = open(path, "w", encoding="utf-8", newline="\n")
        self.files, self.strict = files, strict
        self.counts: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        self.fh.close()

    def add(self, fidx: int, line: int, sub: int, reason: str, detail: str, raw: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        rec = {
            "source_file": self.files[fidx],
            "line": int(line),
            "sub": int(sub),
            "reason": reason,
            "detail": detail,
            "raw": raw,
        }
        self.fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if self.strict:
            where = f"{self.files[fidx]}:{line}" + (f" (example {sub}: an answer or a piece)" if sub else "")
            raise PrepareError(f"--strict: bad record at {where}: {reason}: {detail}")


_BATCH_COLUMNS = [
    "ok",
    "file_idx",
    "line",
    "sub",
    "reason",
    "detail",
    "raw",
    "example_id",
    "split",
    "chash",
    "qhash",
    "heldout",
    "truncated",
    "pieced",
]
_PAIR_COLUMNS = ["heldout_pair", "cut"]  # data.format preference: its heldout_pairs.jsonl line, the chosen length


def _where(files: list[str], loc: int) -> str:
    """file:line of a location packed as (file_idx << _LINE_BITS) | line."""
    return f"{files[loc >> _LINE_BITS]}:{loc & ((1 << _LINE_BITS) - 1)}"


def consume_batch(
    batch,
    seen: FirstSeen,
    packers: dict[str, SplitPacker],
    rejects: Rejects,
    counts: dict,
    questions: QuestionFiles,
    near: NearDupIndex | None = None,
) -> int:
    """One tokenized batch: reject the bad rows, drop duplicates and (with `near`) near-duplicates of kept
    examples (the first copy is kept), hand the rest to its split's packer and its question to the question
    files. Returns how many records (not examples) the batch began."""
    pairs = "cut" in batch.column_names
    d = batch.select(_BATCH_COLUMNS + (_PAIR_COLUMNS if pairs else [])).to_pydict()
    ids_col = batch.column("input_ids").combine_chunks()
    lab_col = batch.column("labels").combine_chunks()
    ids_vals, lab_vals = ids_col.values.to_numpy(), lab_col.values.to_numpy()
    offs = ids_col.offsets.to_numpy()
    merged = seen.lookup_merged(batch.column("chash").to_numpy(zero_copy_only=False))
    if near is not None:
        near.begin_batch(batch.column("bands"), batch.column("sketch"))
    new_records = 0
    for i in range(batch.num_rows):
        fidx, line, sub = d["file_idx"][i], d["line"][i], d["sub"][i]
        if sub == 0:
            new_records += 1
            counts["split_sessions"] += int(d["pieced"][i])
        if not d["ok"][i]:
            if d["reason"][i] == INPUT_ERROR:  # the file read so far is damaged: not a record reject
                raise Damaged(fidx, damage_record(d["detail"][i], d["raw"][i]))
            rejects.add(fidx, line, sub, d["reason"][i], d["detail"][i], d["raw"][i])
            continue
        h = d["chash"][i]
        first = seen.get(h, int(merged[i]))
        if first is not None:
            where = _where(rejects.files, first)
            rejects.add(fidx, line, sub, "duplicate", f"{d['example_id'][i]}: same conversation as {where}", "")
            continue
        if near is not None:
            if (match := near.first_match(i)) is not None:
                detail = f"{d['example_id'][i]}: near-duplicate of {match[0]} ({_where(rejects.files, match[1])})"
                rejects.add(fidx, line, sub, "near_duplicate", detail, "")
                continue
            near.add(i, d["example_id"][i], (fidx << _LINE_BITS) | line)
        seen.add(h, (fidx << _LINE_BITS) | line)
        counts["kept"] += 1
        counts["truncated"] += int(d["truncated"][i])
        counts["split_pieces"] += int(d["pieced"][i])
        s, e = offs[i], offs[i + 1]
        # copies, not views: a view keeps the whole batch alive until its window is packed, and
        # the validation window (2% of examples) would pin every batch it has seen
        cut = d["cut"][i] if pairs else 0
        packers[d["split"][i]].add(ids_vals[s:e].copy(), lab_vals[s:e].copy(), d["example_id"][i], cut)
        if d["split"][i] == "train":
            questions.add_train(d["qhash"][i])
        elif d["heldout"][i]:  # a split session's heldout line goes with its first piece only
            questions.add_heldout(d["heldout"][i])
            if pairs:
                questions.add_heldout_pair(d["heldout_pair"][i])
    seen.merge_if_full()
    if near is not None:
        near.end_batch()
    return new_records


def consume(
    ds, packers: dict[str, SplitPacker], rejects: Rejects, questions: QuestionFiles, near: NearDupIndex | None = None
) -> dict[str, int]:
    """Drive the ordered stream to its end; every split's rows are then in its spool and the questions in their
    files (not yet closed). Returns the counts."""
    from tqdm import tqdm

    seen = FirstSeen()  # content hash -> (file_idx << 40 | line) of the copy that was kept
    counts = {"read": 0, "kept": 0, "truncated": 0, "split_sessions": 0, "split_pieces": 0}
    bar = tqdm(desc="prepare", unit="rec", mininterval=1.0, smoothing=0.1)
    batches = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
    try:
        for batch in batches:
            new_records = consume_batch(batch, seen, packers, rejects, counts, questions, near)
            counts["read"] += new_records
            bar.update(new_records)
            bar.set_postfix(kept=counts["kept"], rejected=rejects.total, refresh=False)
    except BaseException:
        close = getattr(batches, "close", None)
        if close is not None:  # stops the streaming executor now rather than when the iterator is collected
            close()
        for p in packers.values():
            if p.writer is not None:
                p.writer.close()
        raise
    finally:
        bar.close()
        rejects.close()
    for p in packers.values():
        p.close()
    return counts
