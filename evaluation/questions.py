"""Question sets for evaluation, and the guard that keeps training questions out of them.

A model is evaluated on questions it was not trained on. prepare writes the validation split as text
(heldout.jsonl) and the train split as question fingerprints (train_questions.u64; data_pipeline/shards.py);
check_no_train_overlap refuses any question set that shares a normalised question with the train split, by the
same normalisation and hash prepare used (data_pipeline.formats.normalise_question / question_hash).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cbt_llm.config import ConfigError
from data_pipeline.formats import question_hash
from data_pipeline.shards import HELDOUT_FILE, load_manifest, train_question_hashes


class TrainOverlapError(ConfigError):
    """A question set that shares questions with the train split: one line with the count and an example."""


def train_overlap(questions: Iterable[str], data_dir: str | Path) -> list[int]:
    """Indices of `questions` whose normalised form is a question of the train split prepared in `data_dir`."""
    man = load_manifest(data_dir)
    train = train_question_hashes(data_dir, man)
    hashes = np.fromiter((question_hash(q) for q in questions), np.int64)
    if not len(train) or not len(hashes):
        return []
    pos = np.minimum(np.searchsorted(train, hashes), len(train) - 1)
    return np.flatnonzero(train[pos] == hashes).tolist()


def check_no_train_overlap(questions: Iterable[str], data_dir: str | Path, what: str = "questions") -> None:
    """Raise TrainOverlapError when any question (after normalisation: NFKC, case-folded, whitespace removed)
    is in the train split of the prepared data in `data_dir`; `what` names the set in the message.

    Also raises ManifestError (a ConfigError) when `data_dir` holds no manifest or one without fingerprints.
    """
    qs = list(questions)
    hits = train_overlap(qs, data_dir)
    if hits:
        example = " ".join(qs[hits[0]].split())
        example = example if len(example) <= 40 else example[:40] + "..."
        raise TrainOverlapError(
            f"{what}: {len(hits)} of {len(qs)} questions are in the train split of '{data_dir}' (e.g. '{example}'); "
            f"evaluate on {Path(data_dir) / HELDOUT_FILE} or remove them"
        )


def load_heldout(data_dir: str | Path) -> list[dict]:
    """The held-out records prepare wrote (heldout.jsonl, data_pipeline/shards.py), in file order."""
    man = load_manifest(data_dir)
    if "heldout" not in man:
        raise ConfigError(f"'{data_dir}' has no {HELDOUT_FILE} (made by an older prepare); re-run `cbt-llm prepare`")
    path = Path(data_dir) / man["heldout"]["path"]
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
