"""The Ray pipeline that ties prepare's steps together, and `run_prepare` (see the package docstring)."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

from cbt_llm.core.config import Config, DataConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.report import print_summary, write_metrics
from data_pipeline.prepare import screen
from data_pipeline.prepare.dedup import FirstSeen
from data_pipeline.prepare.manifest import build_manifest, run_metrics
from data_pipeline.prepare.neardup import NearDupIndex
from data_pipeline.prepare.parse import Parse
from data_pipeline.prepare.ray_session import configure_ray_data, init_ray, short_ray_dir
from data_pipeline.prepare.read import (
    INPUT_ERROR,
    check_file,
    damage_record,
    read_files,
    resolve_inputs,
    size_damage,
    synth_expectations,
)
from data_pipeline.prepare.split import overlong_policy
from data_pipeline.prepare.tokens import Tokenize
from data_pipeline.prepare.write import QuestionFiles, SplitPacker, swap_into_place, write_shards
from data_pipeline.shards import SPLITS, write_manifest

_LINE_BITS = 40  # the dedup index stores where a first copy came from as (file_idx << 40) | line
# Logical CPUs each read+parse task and each tokenizer actor asks Ray for. At 1 each, a pool of one actor per
# CPU leaves the read task no CPU to start on (a fixed pool of 2 on 2 CPUs hangs; an autoscaling pool stays
# below it while reads are pending, 2 cores doing 1.1x one thread's work by ds.stats()).
# At half a CPU, one actor per CPU and the reads fit side by side on any number of CPUs.
_STEP_CPUS = 0.5


class PrepareError(RuntimeError):
    """A prepare run that must stop (bad record under --strict, empty output): one line for the user."""


class InputFileError(PrepareError):
    """A damaged or unreadable input file under data.on_input_error: stop (read.py's docstring says which)."""


class _Damaged(Exception):
    """Raised on the driver when the stream brings a damaged file's INPUT_ERROR row."""

    def __init__(self, file_idx: int, damage: dict):
        super().__init__(damage["reason"])
        self.file_idx, self.damage = file_idx, damage


def how_far(damage: dict) -> str:
    """How far the read of a damaged file got, in words: lines and bytes."""
    read, size = damage.get("bytes_read"), damage.get("bytes")
    if read is None:
        of = f"{size:,}-byte file" if size is not None else "file"
        return f"{damage['lines_read']:,} lines read of the {of}"
    of = f" of {size:,}" if size is not None else ""
    return f"{damage['lines_read']:,} lines read, {read:,}{of} bytes"


def input_error_message(path: str, damage: dict) -> str:
    """The one line a damaged input stops the run with: the file, what is wrong, how far the read got, the fix."""
    return (
        f"input file {path}: {damage['reason']} ({how_far(damage)}); nothing was written. Restore or re-create the "
        "file (or drop it from data.inputs), or set data.on_input_error=quarantine to prepare without it"
    )


def _check_format(dc: DataConfig) -> None:
    """Settings that do not apply to preference pairs fail before any work."""
    if dc.format != "preference":
        return
    if dc.overlong not in ("auto", "reject"):
        raise ConfigError(
            f"data.overlong={dc.overlong}: a preference pair is never truncated or split (one over data.seq_len is "
            "rejected as pair_overlong); use auto or reject"
        )
    if screen.enabled(dc):
        raise ConfigError(
            "data.quality / data.near_dup screen single answers, not preference pairs; turn them off for "
            "data.format=preference (score the pairs where they are made)"
        )


def _check_sizes(dc: DataConfig) -> None:
    if dc.num_shards and dc.num_shards % dc.world_size:
        raise ConfigError(
            f"data.num_shards={dc.num_shards} is not a multiple of data.world_size={dc.world_size}; "
            f"use {dc.world_size * max(1, dc.num_shards // dc.world_size)} or 0 (automatic)"
        )


class ParseAndTokenize:
    """Ray Data actor: one block of raw records parsed and validated (parse.Parse), screened when data.quality or
    data.near_dup asks (screen.Screen), then templated, tokenized and masked (tokens.Tokenize), in one step. As
    two Ray steps the parsed rows went through the object store between a task and an actor, and that hop cost
    more CPU than parsing; in one actor the tokenizer is still loaded once and the pool still spreads blocks of
    one input file over every CPU (and node)."""

    def __init__(self, parse: Parse, screen_step, tokenize_args: tuple):
        self.parse, self.screen = parse, screen_step
        self.tokenize = Tokenize(*tokenize_args)

    def __call__(self, table):
        parsed = self.parse(table)
        return self.tokenize(self.screen(parsed) if self.screen else parsed)


def build_dataset(
    files: list[str],
    dc: DataConfig,
    end_token: str,
    scorer: str = "",
    light_tokenizer: str = "",
    expect: dict[str, dict] | None = None,
):
    """The Ray Data graph: read (tasks) -> parse + validate [+ screen] + tokenize + mask (actors), in (file, line)
    order. `scorer`: the structure scorer's path when data.quality gates on coverage; `light_tokenizer`: the
    tokenizer.json the actors may load without transformers (tokenizer.light_tokenizer_file); `expect`: what
    synth_summary.json says of some files (read.synth_expectations), checked as they are read."""
    import ray

    configure_ray_data(dc.ray_block_mb)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    stems = [Path(f).name for f in files]
    expect = expect or {}
    items = []
    for i, f in enumerate(files):
        e = expect.get(f, {})
        records = e.get("records")
        items.append(
            {
                "path": f,
                "file_idx": i,
                "records": records if isinstance(records, int) else -1,
                "content_sha256": e.get("content_sha256") or "",
            }
        )
    ds = ray.data.from_items(items, override_num_blocks=len(files))
    ds = ds.map_batches(
        read_files, batch_size=1, batch_format="numpy", fn_kwargs={"lines": dc.ray_read_lines}, num_cpus=_STEP_CPUS
    )
    parse = Parse(dc.format, dc.system_prompt, dc.max_chars, dc.val_fraction, dc.seed, stems)
    screen_step = screen.make_screen(dc, scorer) if screen.enabled(dc) else None
    with warnings.catch_warnings():  # max_restarts has no named parameter yet in Ray 2.60
        warnings.simplefilter("ignore", DeprecationWarning)
        # up to one actor per CPU of the session (the cluster's, under --ray-address), grown as batches queue;
        # the read tasks run beside them (_STEP_CPUS)
        ds = ds.map_batches(
            ParseAndTokenize,
            fn_constructor_args=(
                parse,
                screen_step,
                (
                    dc.tokenizer,
                    dc.seq_len,
                    overlong_policy(dc),
                    end_token,
                    light_tokenizer,
                    dc.format == "preference",
                ),
            ),
            batch_size=dc.ray_tokenize_batch,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus),
            num_cpus=_STEP_CPUS,
            # a restarted actor could not recover its fused constructor args anyway (ray-project/ray#53727),
            # and a crash should fail the run loudly rather than retry forever
            max_restarts=0,
        )
    return ds


class _Rejects:
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


def _consume_batch(
    batch,
    seen: FirstSeen,
    packers: dict[str, SplitPacker],
    rejects: _Rejects,
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
                raise _Damaged(fidx, damage_record(d["detail"][i], d["raw"][i]))
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


def _consume(
    ds, packers: dict[str, SplitPacker], rejects: _Rejects, questions: QuestionFiles, near: NearDupIndex | None = None
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
            new_records = _consume_batch(batch, seen, packers, rejects, counts, questions, near)
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


def _write_splits(
    packers: dict[str, SplitPacker], staging: Path, dc: DataConfig, pad_id: int, read: int, rejected: int, out: Path
) -> dict[str, list[dict]]:
    """Cut each split's spool into shards in `staging`; returns their manifest entries per split."""
    train_rows = packers["train"].rows
    if train_rows == 0:
        raise PrepareError(
            f"no training rows: {read} records read, {rejected} rejected; see {out}/rejects/ after fixing the input"
        )
    if train_rows < dc.world_size:
        raise PrepareError(
            f"only {train_rows} training rows for data.world_size={dc.world_size}: every rank needs at least one; "
            "add data or lower world_size"
        )
    num_shards = dc.num_shards or dc.world_size * max(1, -(-train_rows // (dc.world_size * dc.rows_per_shard)))
    if num_shards > train_rows:  # never write empty shards
        asked, num_shards = num_shards, dc.world_size * (train_rows // dc.world_size)
        print(f"note: data.num_shards={asked} > {train_rows} train rows; writing {num_shards} shards", flush=True)
    shards = {"train": write_shards(packers["train"].spool_path, staging, "train", num_shards, pad_id, dc.packing)}
    shards["validation"] = (
        write_shards(packers["validation"].spool_path, staging, "validation", 1, pad_id, dc.packing)
        if packers["validation"].rows
        else []
    )
    for p in packers.values():
        p.spool_path.unlink(missing_ok=True)
    if dc.format == "preference":  # a shard's examples are pairs, as the manifest's counts (rows hold whole pairs)
        for entries in shards.values():
            for e in entries:
                e["examples"] //= 2
    return shards


def _find_damaged(files: list[str], expect: dict[str, dict]) -> dict[str, dict]:
    """{path: damage} of every damaged file among `files`, each read whole in a Ray task (records discarded)."""
    if not files:
        return {}
    import ray

    check = ray.remote(num_cpus=_STEP_CPUS, max_retries=0)(check_file)
    found = ray.get([check.remote(f, expect.get(f)) for f in files])
    return {f: d for f, d in zip(files, found) if d is not None}


def _quarantine(damaged: dict[str, dict], quarantined: dict[str, dict]) -> None:
    for path, dmg in damaged.items():
        quarantined[path] = dmg
        print(f"quarantined: {path}: {dmg['reason']} ({how_far(dmg)})", flush=True)


def run_prepare(cfg: Config, strict: bool = False, ray_address: str | None = None) -> dict:
    """`cbt-llm prepare`: see the package docstring. Returns the manifest dict.

    Raises FileNotFoundError / ConfigError before starting Ray when inputs, tokenizer or sizes are wrong,
    PrepareError on the first bad record under `strict`, and InputFileError (a PrepareError) on a damaged
    input file under data.on_input_error: stop; then nothing is written (a folder this run made is removed,
    an earlier run's output is left as it was). Under quarantine the damaged files are left out (the run
    starts over without them when the damage shows mid-stream) and listed in the manifest's `quarantined`.
    """
    from cbt_llm.domain.chat_format import IM_END
    from cbt_llm.inference.tokenizer import load_tokenizer, tokenizer_hash
    from data_pipeline.tokenizer import light_tokenizer_file

    dc = cfg.data
    stop = dc.on_input_error == "stop"
    t_start = time.perf_counter()
    # fail early, before any expensive work
    _check_sizes(dc)
    _check_format(dc)
    all_files = resolve_inputs(dc.inputs)
    expect = synth_expectations(all_files)
    quarantined: dict[str, dict] = {}
    cut = size_damage(all_files, expect)  # a stat per listed file: sizes that differ fail before Ray starts
    if cut and stop:
        path, dmg = next(iter(cut.items()))
        raise InputFileError(input_error_message(path, dmg))
    _quarantine(cut, quarantined)
    tok = load_tokenizer(dc.tokenizer)
    tok_hash = tokenizer_hash(tok)
    end_token = IM_END if IM_END in tok.get_vocab() else (tok.eos_token or "")
    pad_id = int(tok.pad_token_id)
    scorer, scorer_signature = screen.load_scorer_once(dc)

    out = Path(dc.out_dir).resolve()
    made_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".staging-{os.getpid()}"
    ray_dir = short_ray_dir(out)

    started, ray_s = init_ray(ray_address, ray_dir, dc.ray_object_store_mb)
    t_ray_ready = time.perf_counter()
    done = False
    try:
        while True:  # once, unless quarantine finds a damaged file mid-stream: then again without it
            files = [f for f in all_files if f not in quarantined]
            if not files:
                raise PrepareError(
                    f"every input file is damaged ({len(quarantined)} quarantined: see above); nothing was written"
                )
            shutil.rmtree(staging, ignore_errors=True)
            (staging / "rejects").mkdir(parents=True)
            ds = build_dataset(files, dc, end_token, scorer, light_tokenizer_file(tok, dc.tokenizer), expect)
            packers = {s: SplitPacker(s, dc, pad_id, staging / f"spool-{s}.parquet") for s in SPLITS}
            rejects = _Rejects(staging / "rejects" / "rejects-00000.jsonl", files, strict)
            questions = QuestionFiles(staging, pairs=dc.format == "preference")
            try:
                near = NearDupIndex(dc.near_dup.threshold) if dc.near_dup.enabled else None
                counts = _consume(ds, packers, rejects, questions, near)
                break
            except _Damaged as exc:
                if stop:
                    raise InputFileError(input_error_message(files[exc.file_idx], exc.damage)) from None
                # the files before it were read whole; find every damaged one after it in one pass, start over
                found = {files[exc.file_idx]: exc.damage} | _find_damaged(files[exc.file_idx + 1 :], expect)
                _quarantine(found, quarantined)
                print(f"prepare: starting over without {len(quarantined)} quarantined file(s)", flush=True)
            finally:
                questions.close_files()
        t_stream = time.perf_counter()
        shards = _write_splits(packers, staging, dc, pad_id, counts["read"], rejects.total, out)
        manifest = build_manifest(
            dc,
            files,
            tok_hash,
            pad_id,
            counts,
            rejects.counts,
            packers,
            shards,
            questions.close(),
            scorer_signature,
            quarantined=[{"path": f, **quarantined[f]} for f in all_files if f in quarantined],
        )
        write_manifest(staging, manifest)
        swap_into_place(staging, out)
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if started:
            import ray

            ray.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)
        if not done and made_out:  # a failed run leaves no folder of its own behind
            shutil.rmtree(out, ignore_errors=True)

    stream_s = max(1e-9, t_stream - t_ray_ready)  # processing only; Ray start-up is reported on its own
    pack_s = sum(p.pack_s for p in packers.values())
    metrics = run_metrics(manifest, pack_s, ray_s, stream_s, time.perf_counter() - t_start, out)
    write_metrics(out / "prepare_metrics.json", metrics)
    print_summary("prepare", metrics)
    if manifest["rows_uneven"]:
        print(
            f"note: {packers['train'].rows} train rows do not divide by world_size {dc.world_size}; rows per rank "
            f"{manifest['rows_per_rank']} (nothing dropped; the trainer evens them out)",
            flush=True,
        )
    return manifest
