"""The prepare -> train contract: packed Parquet shards and the manifest.json that lists them.

`cbt-llm prepare` writes through this module and training and the launchers read through it; neither side
imports the other. An output folder (data.out_dir = train.data_dir) holds:

    manifest.json                             written last: a folder without it holds no usable data
    train/part-00000-of-0000N.parquet ...     N train shards, N a multiple of data.world_size
    validation/part-00000-of-00001.parquet    one shard (none when val_fraction is 0)
    rejects/rejects-00000.jsonl               one line per bad record: source_file, line, sub, reason, detail, raw
    heldout.jsonl                             the validation split as text, for evaluation (below)
    train_questions.u64                       the train split's question fingerprints (below)
    heldout_pairs.jsonl                       data.format preference only: the validation pairs as text (below)
    prepare_metrics.json                      throughput and timings of the run (not part of the contract)

A shard row (ROW_SCHEMA) is one training row of at most seq_len tokens:

    input_ids      list<int32>   token ids; packed rows hold several examples back to back
    labels         list<int32>   the id where the model learns it (answers and their end token), IGNORE elsewhere
    position_ids   list<int32>   restart at 0 at every example: training keeps packed examples apart by them
    num_examples   int32         examples in the row
    example_ids    list<string>  the id of each example, in row order

With data.packing=false every row is one example padded to seq_len with pad_token_id (labels IGNORE).

manifest.json (MANIFEST_SCHEMA_VERSION 1), the keys readers rely on:

    schema_version, seq_len, packing, packer, pad_token_id, world_size, format, system_prompt
    tokenizer        {name_or_path, hash}: the content hash (data_pipeline.tokenizer.tokenizer_hash) the shards
                     were made with; a reader given a tokenizer refuses any other
    config_hash      hash of the data: config that shaped the shards
    inputs           [{path, bytes}]
    counts           read, kept, rejected {reason: n}, rejected_total, truncated, and per split: examples, rows,
                     tokens (non-padding), label_tokens; under data.overlong split also split_sessions (examples
                     over seq_len, split) and split_pieces (kept pieces of them, each an example "<id>#<k>")
    packing_efficiency  {split: tokens / (rows x seq_len)}
    rows_per_rank, rows_uneven   train rows each rank reads, and train rows % world_size
    splits           {train|validation: {shards: [{path, rows, examples, tokens, label_tokens, sha256}]}}
    split_rule       {key: "normalised question", val_fraction, seed}: an example is in validation when
                     data_pipeline.sources.formats.split_of(question, val_fraction, seed) says so
    heldout          {path: "heldout.jsonl", records, sha256}
    train_questions  {path: "train_questions.u64", questions, sha256}

heldout.jsonl: one JSON object per kept validation example, in input order, its id the example id the shards
carry: {id, question, description, keywords, reference, crisis, distortions}. `reference` is the example's
(last) answer; `crisis` is meta.crisis for our corpus, cbt_llm.domain.crisis.corpus_is_crisis(question,
description) for other formats; formats without descriptions, keywords or distortion labels leave them empty. A
session (format messages) has one line whatever its pieces, its question the presenting problem, an empty
reference (its last turn is a summary, not an answer) and two more keys: intake (meta.intake) and turns. Empty
when val_fraction is 0. Evaluation asks these questions of a model; they were never trained on.

train_questions.u64: the distinct data_pipeline.sources.formats.question_hash values (64-bit BLAKE2b of the normalised
question) of the kept train examples, sorted, little-endian int64. Train questions are not written as text;
these let evaluation refuse a question set that overlaps the train split (train_question_hashes).

    quarantined      only when data.on_input_error: quarantine left damaged input files out:
                     [{path, reason, lines_read, bytes_read, bytes}] (bytes: the file's size), in input order

Preference shards (data.format: preference, for train.objective dpo; tests/fixtures/tiny.py's
make_preference_shards writes the same layout). The manifest also has `"objective": "preference"` (SFT manifests
have no objective key and mean "sft": objective_of), `counts.examples` and each shard entry's `examples` count
pairs, `counts.pairs` {split: pairs} repeats them, `split_rule.key` is "normalised last user turn", and
`heldout_pairs` {path: "heldout_pairs.jsonl", records, sha256} names the validation pairs as text. In a row:

    - a pair is two sequences, adjacent, chosen first: example_ids "<pair id>/chosen", "<pair id>/rejected" in
      row order, position_ids restarting at 0 at each; num_examples counts sequences (2 per pair). A pair never
      straddles rows (so never ranks or micro-batches); a pair whose sequences exceed seq_len together is
      rejected (pair_overlong), never truncated.
    - each sequence is the rendered prompt (data.system_prompt first when the prompt has none), the answer and
      its end token; labels are the answer and end token only (the SFT rule), IGNORE on the prompt.
    - data.packing=false: one pair per row, padded to seq_len after the rejected sequence, whose position_ids
      run on through the padding (so padding never starts a sequence of its own; its labels are IGNORE).

heldout_pairs.jsonl: one JSON object per kept validation pair, in input order: {id, messages (the prompt as
trained, system turn first), chosen, rejected, crisis, meta (the record's own: source, scores, flaw, ...)}.
heldout.jsonl then holds one line per validation pair too: the prompt's last user turn as the question, the
chosen answer as reference.

Rank r of W reads train shards r, r+W, r+2W, ... (rank_shards). Shard sizes differ by at most one row, so ranks
do too. A re-run with the same inputs and config writes byte-identical shards and manifest.

Before training reads a shard, verify_shards checks it against the manifest (train start-up and launch
preflight, per train.verify_shards): always that it is a whole Parquet file with the manifest's row count,
and the SHA-256 of all of them (full) or of some (sample). Shards are written with Parquet page checksums and
every reader verifies them, so a page that changed on disk fails when it is read (train reads its rows at
start-up, before the first step) with one line naming the shard, in every mode.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from cbt_llm.core.errors import ConfigError

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
HELDOUT_FILE = "heldout.jsonl"
TRAIN_QUESTIONS_FILE = "train_questions.u64"
HELDOUT_PAIRS_FILE = "heldout_pairs.jsonl"
OBJECTIVES = ("sft", "preference")  # what shards are for (manifest "objective"; absent means sft)
SPLITS = ("train", "validation")
IGNORE = -100  # the label of a token the loss skips (torch's cross_entropy ignore_index default)

ROW_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("num_examples", pa.int32()),
        ("example_ids", pa.list_(pa.string())),
    ]
)

_REQUIRED = ("schema_version", "seq_len", "pad_token_id", "tokenizer", "splits", "counts")
_RERUN = "re-run `cbt-llm prepare`"
VERIFY_MODES = ("size", "sample", "full")  # train.verify_shards
_SAMPLE_EVERY = 8  # verify_shards(mode="sample") hashes one shard in this many (at least one)


class ManifestError(ConfigError):
    """Shards that cannot be used as given (missing, corrupt, or made with another tokenizer)."""


def shard_path(split: str, index: int, count: int) -> str:
    """A shard's path inside the output folder, as the manifest lists it."""
    return f"{split}/part-{index:05d}-of-{count:05d}.parquet"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read 1 MiB at a time (the manifest's per-shard checksum)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write folder/manifest.json in its one encoding (UTF-8, indented, keys in the order given)."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def load_manifest(data_dir: str | Path, tokenizer=None, verify_checksums: bool = False) -> dict:
    """Read and check data_dir/manifest.json: schema version, train shards listed, every shard present; with
    `tokenizer` (a tokenizer object or a path/id), refuse when its content hash or pad id differs from the ones
    the shards were made with. `verify_checksums` re-hashes every shard (slow on big data).

    Raises ManifestError (a ConfigError: one line naming the problem and the fix).
    """
    out = Path(data_dir)
    path = out / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(
            f"train.data_dir: no {MANIFEST_FILE} in '{out}'; run `cbt-llm prepare` first "
            "or point train.data_dir at its data.out_dir"
        )
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc.msg}); {_RERUN}") from None
    for key in _REQUIRED:
        if key not in man:
            raise ManifestError(f"{path}: missing '{key}'; {_RERUN}")
    if man["schema_version"] != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema_version {man['schema_version']}, this code reads {MANIFEST_SCHEMA_VERSION}; {_RERUN}"
        )
    if not man["splits"].get("train", {}).get("shards"):
        raise ManifestError(f"{path}: no train shards listed; {_RERUN}")
    for info in man["splits"].values():
        for sh in info.get("shards", []):
            p = out / sh["path"]
            if not p.is_file():
                raise ManifestError(f"{path}: shard '{sh['path']}' is missing; {_RERUN}")
            if verify_checksums and sha256_file(p) != sh["sha256"]:
                raise ManifestError(
                    f"shard '{p}' does not match its sha256 in the manifest (changed or corrupt); {_RERUN}"
                )
    for key in ("heldout", "train_questions", "heldout_pairs"):  # absent from older (or SFT) manifests
        if key in man:
            p = out / man[key]["path"]
            if not p.is_file():
                raise ManifestError(f"{path}: '{man[key]['path']}' is missing; {_RERUN}")
            if verify_checksums and sha256_file(p) != man[key]["sha256"]:
                raise ManifestError(f"'{p}' does not match its sha256 in the manifest (changed or corrupt); {_RERUN}")
    if tokenizer is not None:
        check_tokenizer(man, out, tokenizer)
    return man


def objective_of(manifest: dict) -> str:
    """What the shards are for: "preference" (pairs, data.format preference) or "sft" (every other format;
    their manifests carry no objective key)."""
    return manifest.get("objective", "sft")


def _whole_parquet(path: Path, rows: int) -> None:
    """Raise ManifestError unless `path` is a whole Parquet file of `rows` rows: its footer reads, its row
    groups end no later than the footer starts (a file cut short, grown, or missing bytes in the middle fails),
    and its row count is the manifest's. Reads the footer only."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException, ValueError) as exc:
        why = " ".join(str(exc).split())[:160]
        raise ManifestError(
            f"shard '{path}' is not a readable Parquet file ({why}): cut short or overwritten; {_RERUN}"
        ) from None
    size = path.stat().st_size
    footer_start = size - 8 - meta.serialized_size  # ... data | footer | 4-byte footer length | PAR1
    data_end = 4
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            col = group.column(c)
            first = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            data_end = max(data_end, (first or col.data_page_offset) + col.total_compressed_size)
    if data_end > footer_start:
        raise ManifestError(
            f"shard '{path}' is {size:,} bytes, too short for the {data_end + 8 + meta.serialized_size:,} its "
            f"row groups and footer take (bytes lost); {_RERUN}"
        )
    if meta.num_rows != rows:
        raise ManifestError(f"shard '{path}' has {meta.num_rows} rows, manifest.json says {rows}; {_RERUN}")


def verify_shards(
    data_dir: str | Path, manifest: dict, mode: str = "size", shards: list[dict] | None = None, seed: int = 0
) -> int:
    """Check shards (manifest entries; default every train and validation shard) against the manifest before
    anything reads them: present, whole Parquet files with the manifest's row counts (_whole_parquet: footers
    only, cheap), and by `mode` (train.verify_shards) their SHA-256: full = every one, sample = one in
    _SAMPLE_EVERY (at least one) picked by `seed`, size = none. Returns how many were hashed.

    Raises ManifestError (one line naming the shard and the fix)."""
    if mode not in VERIFY_MODES:
        raise ConfigError(f"train.verify_shards: '{mode}' is not one of {', '.join(VERIFY_MODES)}")
    out = Path(data_dir)
    if shards is None:
        shards = [sh for split in SPLITS for sh in manifest["splits"].get(split, {}).get("shards", [])]
    for sh in shards:
        p = out / sh["path"]
        if not p.is_file():
            raise ManifestError(f"shard '{p}' listed in manifest.json is missing; {_RERUN}")
        _whole_parquet(p, sh["rows"])
    if mode == "full":
        chosen = list(shards)
    elif mode == "sample" and shards:
        rng = np.random.default_rng([seed % 2**32, len(shards)])
        k = max(1, -(-len(shards) // _SAMPLE_EVERY))
        chosen = [shards[i] for i in sorted(rng.choice(len(shards), size=k, replace=False))]
    else:
        chosen = []
    for sh in chosen:
        p = out / sh["path"]
        if sha256_file(p) != sh["sha256"]:
            raise ManifestError(
                f"shard '{p}' does not match its sha256 in manifest.json (changed or corrupt); {_RERUN}"
            )
    return len(chosen)


def check_tokenizer(man: dict, out: Path, tokenizer) -> None:
    """Refuse (ManifestError) a tokenizer (object or path/id) whose content hash or pad id differs from the
    ones the shards in `out` were made with (what load_manifest(tokenizer=...) checks, for a caller that
    already holds the manifest)."""
    from cbt_llm.inference.tokenizer import load_tokenizer, tokenizer_hash

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    got = tokenizer_hash(tok)
    want = man["tokenizer"]["hash"]
    if got != want:
        raise ManifestError(
            f"tokenizer mismatch: shards in '{out}' were made with '{man['tokenizer']['name_or_path']}' (hash {want}), "
            f"the given tokenizer has hash {got}; use that tokenizer or {_RERUN} with this one"
        )
    if tok.pad_token_id is not None and int(tok.pad_token_id) != int(man["pad_token_id"]):
        raise ManifestError(
            f"pad_token_id {tok.pad_token_id} differs from the manifest's {man['pad_token_id']}; {_RERUN}"
        )


def train_question_hashes(data_dir: str | Path, manifest: dict) -> np.ndarray:
    """The train split's question fingerprints (sorted int64, see train_questions.u64 above).

    Raises ManifestError when the manifest predates them (a prepare run before heldout.jsonl) or the file's size
    disagrees with the count the manifest gives.
    """
    entry = manifest.get("train_questions")
    if entry is None:
        raise ManifestError(f"'{data_dir}' lists no train question fingerprints (made by an older prepare); {_RERUN}")
    path = Path(data_dir) / entry["path"]
    hashes = np.fromfile(path, dtype="<i8")
    if len(hashes) != entry["questions"]:
        raise ManifestError(f"'{path}' holds {len(hashes)} hashes, the manifest says {entry['questions']}; {_RERUN}")
    return hashes


def rank_shards(manifest: dict, split: str, rank: int, world: int) -> list[dict]:
    """The shards of `split` this rank owns: shard i goes to rank i % world (prepare writes a multiple of world)."""
    shards = manifest["splits"][split]["shards"]
    if split == "train" and len(shards) % world:
        raise ManifestError(
            f"manifest has {len(shards)} train shards, not a multiple of world_size {world}; "
            f"re-run `cbt-llm prepare data.world_size={world}`"
        )
    return [s for i, s in enumerate(shards) if i % world == rank]
