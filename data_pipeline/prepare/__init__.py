"""`cbt-llm prepare`: corpus files -> validated, split, templated, tokenized, masked, packed Parquet shards.

The flow, one way, one module per job:

    Ray Data                                            driver (ordered stream, bounded memory: consume.py)
    read files -> parse + validate -> tokenize + mask -> dedup -> window of pack_window examples
    (read.py,     (parse.py,          (tokens.py)        (dedup.py)  -> pack (data.packer) -> spool
     one task      in one actor pool: pipeline.                         (write.py)
     per file)     ParseAndTokenize)                    end: spool -> shards (multiple of world_size),
                                                             rejects/, manifest.json, metrics

With data.quality or data.near_dup set, a screen step (screen.py, in the same actor) runs between parse and
tokenize: it turns examples under the quality thresholds into low_quality rejects and gives the others their
MinHash band hashes, which the driver's near-duplicate index (neardup.py) decides on after the exact-duplicate
check.

tokens.py encodes through encode.py, the encoder it shares with split.py, which cuts a session longer than
data.seq_len into pieces on turn boundaries (data.overlong: split). The packers are data_pipeline/packing.py;
manifest.py builds manifest.json's content and the run's metrics.

pipeline.py ties them together (run_prepare) in the Ray session of ray_session.py. Ray Data runs with
preserve_order, so the driver sees records in (file, line) order whatever the parallelism: the first copy of a
duplicate is the one kept, windows hold the same examples on every run and shards are byte-identical on a
re-run. The heavy per-record work (JSON, schema, chat template, tokenizer) runs in Ray workers; the driver only
does set look-ups, packing arithmetic and Parquet writes.

data.format: preference carries answer pairs the same way: parse reads the three pair shapes (sources/formats.py),
tokens.py encodes each pair as its chosen and rejected sequences back to back, and write.py packs a pair as one item
whose two sequences stay adjacent in a row (the layout: data_pipeline/shards.py); the manifest says
"objective": "preference" and the validation pairs are also written as text (heldout_pairs.jsonl).

A damaged input file (read.py's docstring) ends its blocks with one input_error row instead of raising in a Ray
task; the driver stops the run with one line naming it (InputFileError; data.on_input_error: stop) or starts
over without it and lists it in the manifest (quarantine); errors.py holds both, and PrepareError.

The output folder (its format: data_pipeline/shards.py): train/ and validation/ Parquet shards, rejects/,
heldout.jsonl and train_questions.u64 (the questions as evaluation needs them) and manifest.json. Shards are
written to a staging folder and moved in; manifest.json is replaced last, so a reader that goes through
data_pipeline.shards.load_manifest never sees a half-written set.
"""

from data_pipeline.prepare.errors import PrepareError
from data_pipeline.prepare.pipeline import run_prepare

__all__ = ["PrepareError", "run_prepare"]
