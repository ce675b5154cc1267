"""The Ray pipeline that ties prepare's steps together, and `run_prepare` (see the package docstring)."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

from cbt_llm.core.config import Config, DataConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.report import print_summary, write_metrics
from data_pipeline.prepare import screen
from data_pipeline.prepare.consume import Rejects, consume
from data_pipeline.prepare.errors import Damaged, InputFileError, PrepareError, input_error_message, quarantine
from data_pipeline.prepare.manifest import build_manifest, run_metrics
from data_pipeline.prepare.neardup import NearDupIndex
from data_pipeline.prepare.parse import Parse
from data_pipeline.prepare.ray_session import configure_ray_data, init_ray, short_ray_dir
from data_pipeline.prepare.read import check_file, read_files, resolve_inputs, size_damage, synth_expectations
from data_pipeline.prepare.split import overlong_policy
from data_pipeline.prepare.tokens import Tokenize
from data_pipeline.prepare.write import QuestionFiles, SplitPacker, swap_into_place, write_shards
from data_pipeline.shards import SPLITS, write_manifest

# Logical CPUs each read+parse task and each tokenizer actor asks Ray for. At 1 each, a pool of one actor per
# CPU leaves the read task no CPU to start on (a fixed pool of 2 on 2 CPUs hangs; an autoscaling pool stays
# below it while reads are pending, 2 cores doing 1.1x one thread's work by ds.stats()).
# At half a CPU, one actor per CPU and the reads fit side by side on any number of CPUs.
_STEP_CPUS = 0.5


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


def run_prepare(cfg: Config, strict: bool = False, ray_address: str | None = None) -> dict:
    """`cbt-llm prepare`: see the package docstring. Returns the manifest dict.

    Raises FileNotFoundError / ConfigError before starting Ray when inputs, tokenizer or sizes are wrong,
    PrepareError on the first bad record under `strict`, and InputFileError (a PrepareError) on a damaged
    input file under data.on_input_error: stop; then nothing is written (a folder this run made is removed,
    an earlier run's output is left as it was). Under quarantine the damaged files are left out (the run
    starts over without them when the damage shows mid-stream) and listed in the manifest's `quarantined`.
    """
    from cbt_llm.inference.tokenizer import end_token_of, load_tokenizer, tokenizer_hash
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
    quarantine(cut, quarantined)
    tok = load_tokenizer(dc.tokenizer)
    tok_hash = tokenizer_hash(tok)
    end_token = end_token_of(tok)
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
            rejects = Rejects(staging / "rejects" / "rejects-00000.jsonl", files, strict)
            questions = QuestionFiles(staging, pairs=dc.format == "preference")
            try:
                near = NearDupIndex(dc.near_dup.threshold) if dc.near_dup.enabled else None
                counts = consume(ds, packers, rejects, questions, near)
                break
            except Damaged as exc:
                if stop:
                    raise InputFileError(input_error_message(files[exc.file_idx], exc.damage)) from None
                # the files before it were read whole; find every damaged one after it in one pass, start over
                found = {files[exc.file_idx]: exc.damage} | _find_damaged(files[exc.file_idx + 1 :], expect)
                quarantine(found, quarantined)
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
