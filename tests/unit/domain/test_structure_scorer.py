"""The CBT-structure scorer (cbt_llm/domain/structure.py) on text it never trained on.

Hand-written answers (tests/data/structure_handwritten.jsonl; its README says how they were written; `heldout4` is
the held-out set of the shipped scorer, the other splits are design data): the scorer
must label their segments, find which parts are present when parts are removed, and see the order break when
they are shuffled. PsyQA's human answers (when the sample is present) are not written to the CBT order, and the
scorer must say so. The numbers behind these thresholds are in bench/RESULTS.md ("CBT structure scorer").
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
from collections.abc import Sequence

import numpy as np
import pytest

from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.cbt import CBT_PARTS, join_answer
from cbt_llm.domain.structure import (
    LABELS,
    ORDER_PRIOR,
    VERSION,
    StaleScorerError,
    decode,
    load_scorer,
    order_agreement,
    order_prior,
    split_segments,
    structure_of,
)
from data_pipeline.synth.scorer import load_or_train, seed_bank, train_scorer
from data_pipeline.synth.template import record_at
from evaluation.scorer_eval import answer_text, evaluate_scorer, longest_shared, variants
from tests.fixtures.paths import PSYQA_SAMPLE, TEST_DATA

ANSWERS = TEST_DATA / "structure_handwritten.jsonl"
PSYQA = PSYQA_SAMPLE


def _texts(answers: list[dict]) -> list[str]:
    return [s["text"] for a in answers for s in a["segments"]]


def _answers(split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in ANSWERS.read_text(encoding="utf-8").splitlines() if line]
    return [a for a in rows if split is None or a["split"] == split]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """The shipped configuration, saved and loaded back (so every test scores through the artifact)."""
    path = tmp_path_factory.mktemp("structure") / "scorer.npz"
    train_scorer().save(path)
    return load_scorer(path)


def test_the_default_training_corpus_is_the_frozen_template_v2_sample(scorer):
    """The scorer trains on a committed sample, not on what the generator writes today, so a generator change
    (template-v3) leaves the measured v4 scorer as it was."""
    import hashlib

    from data_pipeline.synth.scorer import FROZEN_CORPUS, frozen_corpus

    digest = hashlib.sha256(FROZEN_CORPUS.read_bytes()).hexdigest()
    assert digest == "68497ab2613f15f4ff7cb0b249c074d2c6281ca0e8fcf852318f8340928bc308"
    records = frozen_corpus()
    assert len(records) == 2000 and records[0]["id"] == "synth-0-000000000"
    assert all(set(r["cbt"]) == set(CBT_PARTS) for r in records)
    assert "|train:synth-template seed0 n2000 + seed-bank|" in scorer.signature


def test_the_handwritten_set_is_what_its_readme_says():
    rows = _answers()
    splits = ("dev", "test", "fresh", "heldout2", "heldout3", "heldout4")
    assert [sum(a["split"] == s for a in rows) for s in splits] == [8, 32, 12, 45, 62, 62]
    assert len({a["id"] for a in rows}) == len(rows)
    for a in rows:
        labels = [s["label"] for s in a["segments"]]
        assert set(labels) <= set(LABELS), a["id"]
        if a["split"] not in ("heldout3", "heldout4"):  # the earlier splits: five parts in canonical order
            assert set(CBT_PARTS) <= set(labels) and structure_of(labels)["order"] == 1.0, a["id"]
    # heldout3 and heldout4 are laid out as real answers are: parts left out, out of order, repeated, "other" lines
    for split, shape in (("heldout3", [18, 6, 12, 9]), ("heldout4", [19, 5, 6, 5])):
        labels = [[s["label"] for s in a["segments"]] for a in _answers(split)]
        parts = [[lab for lab in seq if lab != "other"] for seq in labels]
        assert [
            sum(not set(CBT_PARTS) <= set(p) for p in parts),
            sum(structure_of(p)["order"] < 1.0 for p in parts),
            sum(len(p) > len(set(p)) for p in parts),
            sum(seq.count("other") for seq in labels),
        ] == shape, split
    # not copied from the template corpus: no segment shares a sentence with 2000 generated answers
    generated = {s for i in range(2000) for p in record_at(0, i)["cbt"].values() for s in split_segments(p)}
    assert not generated & {s for a in rows for seg in a["segments"] for s in split_segments(seg["text"])}
    # nor do the scorer's hand-written banks come near them: no exemplar shares 10 characters in a row with a segment
    n, shared, exemplar = longest_shared((t for texts in seed_bank().values() for t in texts), _texts(rows))
    assert n <= 9, (shared, exemplar)


def test_segments_are_paragraphs_else_sentences():
    for a in _answers():
        texts = [s["text"] for s in a["segments"]]
        got = split_segments(answer_text(a))
        if a["layout"] == "paragraphs":
            assert got == texts, a["id"]
        else:  # one paragraph: cut into sentences, and no sentence straddles two labelled segments
            assert "".join(got) == "".join(texts) and len(got) >= len(texts), a["id"]
            ends = {sum(len(t) for t in texts[: k + 1]) for k in range(len(texts))}
            assert ends <= {sum(len(t) for t in got[: k + 1]) for k in range(len(got))}, a["id"]
    assert split_segments("第一段。还是第一段！\n\n第二段？") == ["第一段。还是第一段！", "第二段？"]
    assert split_segments("他说：“我不行。”你觉得呢？好；再想想，") == [
        "他说：“我不行。”",
        "你觉得呢？",
        "好；再想想，",
    ]
    assert split_segments("  ") == []


@pytest.mark.parametrize(
    "labels, order",
    [
        (list(CBT_PARTS), 1.0),
        (list(reversed(CBT_PARTS)), 0.0),
        (["empathy", "other", "empathy", "strategy", "other"], 1.0),
        (["strategy", "empathy", "key_thought"], 1 / 3),  # pairs: (s,e) no, (s,k) no, (e,k) yes
        (["empathy", "empathy", "other"], None),  # fewer than two parts: undefined, not 1.0
        ([], None),
    ],
)
def test_order_agreement(labels, order):
    assert order_agreement(labels) == (pytest.approx(order) if order is not None else None)


def test_structure_of_counts_parts_once():
    s = structure_of(["strategy", "empathy", "strategy", "other"])
    # segment pairs of two different parts: (strategy, empathy) out of order, (empathy, strategy) in order
    assert s["parts"] == ["empathy", "strategy"] and s["coverage"] == 2 and s["order"] == 0.5


def test_accuracy_per_part_on_the_design_answers(scorer):
    # test and fresh were held out from scorer v1, heldout2 from v2 (measured once, bench/RESULTS.md run 4); all
    # three are design data for v3 and v4
    for split in ("test", "fresh"):
        r = evaluate_scorer(scorer, _answers(split))
        assert r["segments"]["accuracy"] >= 0.93, (split, r["segments"])
        for part in CBT_PARTS:
            assert r["segments"]["per_label"][part]["accuracy"] >= 0.9, (split, part, r["segments"])
            assert r["presence"][part]["accuracy"] >= 0.9, (split, part, r["presence"])
        assert r["coverage"]["mae"] < 0.2 and r["order"]["mae"] < 0.06, (split, r["coverage"], r["order"])
        assert r["signature"] == scorer.signature and scorer.signature.startswith(VERSION)
    r = evaluate_scorer(scorer, _answers("heldout2"))  # v4 measured 0.956 1.0 0.978 1.0 0.935
    assert r["segments"]["accuracy"] >= 0.95, r["segments"]
    for part in CBT_PARTS:
        assert r["segments"]["per_label"][part]["accuracy"] >= 0.9, (part, r["segments"]["per_label"][part])
        assert r["presence"][part]["accuracy"] >= 0.85, (part, r["presence"][part])
    assert r["coverage"]["mae"] < 0.25 and r["order"]["mae"] < 0.06, (r["coverage"], r["order"])


# heldout3 was measured once with v3 (bench/RESULTS.md run 5: 0.940 0.980 0.800 0.897 0.932), then became design
# data for v4, which measured 0.955 0.980 0.964 0.897 0.932 on it. Strategy stays below 0.9 there because heldout3
# labels 5 referral lines ("去精神心理科做个评估") strategy, where the spec puts them in encouragement.
HELDOUT3_FLOOR = {"empathy": 0.93, "key_thought": 0.96, "challenge": 0.94, "strategy": 0.87, "encouragement": 0.91}


def test_accuracy_per_part_on_the_heldout3_answers(scorer):
    r = evaluate_scorer(scorer, _answers("heldout3"))
    assert r["answers"] == 62 and r["segments"]["accuracy"] >= 0.92, r["segments"]
    for part, floor in HELDOUT3_FLOOR.items():
        assert r["segments"]["per_label"][part]["accuracy"] >= floor, (part, r["segments"]["per_label"][part])
        assert r["presence"][part]["accuracy"] >= 0.78, (part, r["presence"][part])
    assert r["coverage"]["mae"] < 0.4 and r["order"]["mae"] < 0.1, (r["coverage"], r["order"])


def test_accuracy_per_part_on_the_heldout4_answers(scorer):
    # The held-out set of v4: written and committed after v4 was frozen, measured once (bench/RESULTS.md run 6):
    # 0.939 1.000 0.942 1.000 0.935, all 295 segments 0.956. The aim, at least 0.9 per part, is met there.
    r = evaluate_scorer(scorer, _answers("heldout4"))
    assert r["answers"] == 62 and r["segments"]["n"] == 295 and r["segments"]["accuracy"] >= 0.95, r["segments"]
    for part in CBT_PARTS:
        assert r["segments"]["per_label"][part]["accuracy"] >= 0.9, (part, r["segments"]["per_label"][part])
        assert r["presence"][part]["accuracy"] >= 0.84, (part, r["presence"][part])  # v4: 0.860 to 0.981
    assert r["coverage"]["mae"] < 0.3 and r["order"]["mae"] < 0.08, (r["coverage"], r["order"])  # v4: 0.228, 0.053


def test_decoding_reads_an_unsure_segment_by_its_neighbours_and_keeps_a_sure_one():
    prior = order_prior(LABELS, **ORDER_PRIOR["paragraphs"])
    emp, enc, key = LABELS.index("empathy"), LABELS.index("encouragement"), LABELS.index("key_thought")

    def probs(first: dict[int, float]) -> np.ndarray:
        p = np.full((2, len(LABELS)), 0.01)
        for k, v in first.items():
            p[0, k] = v
        p[1, key] = 0.95
        return np.log(p / p.sum(axis=1, keepdims=True))

    # unsure between empathy and encouragement, then a clear key thought: the opening is read as empathy
    assert decode(probs({emp: 0.45, enc: 0.47}), prior) == [emp, key]
    # sure it is encouragement: the prior does not overrule it (answers may put parts out of order)
    assert decode(probs({emp: 0.05, enc: 0.9}), prior) == [enc, key]


def _path_score(seq: Sequence[int], log_probs: np.ndarray, prior: np.ndarray) -> float:
    """A label sequence's score as decode defines it; the prior's last row/column are the start and end."""
    steps = zip((len(LABELS), *seq), (*seq, len(LABELS)))
    return sum(log_probs[i, k] for i, k in enumerate(seq)) + sum(prior[a, b] for a, b in steps)


def test_decoding_finds_the_best_sequence():
    # Viterbi against every sequence of 4 labels, on random scores and the prior of each unit
    rng = np.random.default_rng(0)
    for unit, params in ORDER_PRIOR.items():
        prior = order_prior(LABELS, **params)
        for _ in range(5):
            lp = np.log(rng.dirichlet(np.ones(len(LABELS)), size=4))
            best = max(_path_score(seq, lp, prior) for seq in itertools.product(range(len(LABELS)), repeat=4))
            assert _path_score(decode(lp, prior), lp, prior) == pytest.approx(best), unit


def test_the_order_prior_costs_little_on_shuffled_answers(scorer):
    # the prior favours the canonical order; on answers written out of it, it must not force them back into it
    for split, floor in (
        ("test", 0.95),
        ("heldout2", 0.85),
        ("heldout3", 0.84),
        ("heldout4", 0.83),
    ):  # v4: .970 .883 .871 .854
        r = evaluate_scorer(scorer, _answers(split))
        assert r["shuffled"]["accuracy"] >= floor, (split, r["shuffled"])
    # a reversed answer with clear parts keeps its labels, reversed
    a = _answers("fresh")[0]
    flipped = {**a, "segments": list(reversed(a["segments"]))}
    got = scorer.score(answer_text(flipped))
    assert [s["label"] for s in got["segments"]] == [s["label"] for s in flipped["segments"]]
    assert got["order"] < 0.2


def test_removed_parts_lower_coverage_and_shuffles_break_the_order(scorer):
    rng = random.Random(1)
    full, removed, shuffled = [], [], []
    for a in _answers("test"):
        for v in variants(a, rng):
            got = scorer.score(answer_text(v))
            kind = v["id"].split("/")[1]
            if kind == "full":
                full.append(got)
            elif kind.startswith("no-"):
                removed.append((kind[3:], got))
            elif kind == "shuffled":
                shuffled.append(got)
    assert statistics.fmean(g["coverage"] for g in full) >= 4.8
    assert statistics.fmean(g["order"] for g in full) >= 0.95
    # a removed part is reported missing in at least 80% of the answers it was removed from, for every part
    for part in CBT_PARTS:
        gone = [part not in g["parts"] for p, g in removed if p == part]
        assert sum(gone) / len(gone) >= 0.8, part
    assert statistics.fmean(g["order"] for g in shuffled) < statistics.fmean(g["order"] for g in full) - 0.3


def test_generated_answers_score_five_parts_in_order(scorer):
    # records of another seed than the scorer trained on, and of the generator as it is now (template-v3), whose
    # phrasings the frozen template-v2 corpus never showed it; templated text, so this is a floor, not an accuracy
    # (measured: 397 of 400 whole, the 3 misses all a challenge part)
    got = [scorer.score(join_answer(record_at(7, i)["cbt"])) for i in range(200)]
    whole = sum(g["coverage"] == 5 and g["order"] == 1.0 for g in got)
    assert whole >= 194, [g for g in got if g["coverage"] < 5 or g["order"] < 1.0][:3]
    assert all(g["coverage"] >= 4 and g["order"] == 1.0 for g in got)


def test_artifact_round_trip_and_refusals(scorer, tmp_path):
    path = scorer.save(tmp_path / "s.structure")  # any suffix: the file is exactly where it was asked for
    assert path.is_file() and path.stat().st_size < 1_000_000
    again = load_scorer(path)
    texts = _texts(_answers("dev"))
    assert np.allclose(again.probabilities(texts), scorer.probabilities(texts), atol=1e-6)
    assert again.priors == scorer.priors == ORDER_PRIOR and again.label(texts) == scorer.label(texts)
    with np.load(path, allow_pickle=False) as z:  # no pickle inside
        header = json.loads(str(z["header"]))
    assert header["version"] == VERSION and header["labels"] == list(LABELS)
    header["version"] = "structure:v0"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "header"}
    np.savez_compressed(tmp_path / "old.npz", header=np.array(json.dumps(header)), **arrays)
    with pytest.raises(ConfigError, match=f"structure:v0, this code reads {VERSION}"):
        load_scorer(tmp_path / "old.npz")
    with pytest.raises(ConfigError, match="not found") as exc:
        load_scorer(tmp_path / "missing.npz")
    assert "\n" not in str(exc.value)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a scorer file"):
        load_scorer(tmp_path / "junk.npz")


def test_training_is_deterministic_and_load_or_train_reuses_the_file(tmp_path):
    a = train_scorer(records=200, seed=3)
    b = load_or_train(tmp_path / "s.npz", records=200, seed=3)
    assert (tmp_path / "s.npz").is_file()
    assert a.vocab == b.vocab and np.array_equal(a.coef, b.coef) and a.signature == b.signature
    assert "synth-template seed3 n200 + seed-bank" in a.signature
    c = load_or_train(tmp_path / "s.npz", records=10, seed=9)  # the file exists: loaded, not retrained
    assert c.signature == a.signature
    # a file another version of the scorer wrote is rebuilt (this code's features and banks), not refused
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "header"}
        header = {**json.loads(str(z["header"])), "version": "structure:v1"}
    np.savez_compressed(tmp_path / "v1.npz", header=np.array(json.dumps(header)), **arrays)
    with pytest.raises(StaleScorerError):
        load_scorer(tmp_path / "v1.npz")
    d = load_or_train(tmp_path / "v1.npz", records=10, seed=9)
    assert (
        "synth-template seed9 n10 + seed-bank" in d.signature
        and load_scorer(tmp_path / "v1.npz").signature == d.signature
    )


@pytest.mark.skipif(not PSYQA.is_file(), reason=f"PsyQA sample not found at {PSYQA} (not redistributable; optional)")
def test_psyqa_human_answers_are_not_in_cbt_order(scorer):
    data = json.loads(PSYQA.read_text(encoding="utf-8"))
    human = [scorer.score(a["answer_text"]) for q in data for a in q["answers"]]
    written = [scorer.score(answer_text(a)) for a in _answers("test")]
    assert len(human) == 268
    human_order = statistics.fmean(h["order"] for h in human if h["order"] is not None)
    written_order = statistics.fmean(w["order"] for w in written)
    # human counselling answers hold empathy, guidance and interpretation, but not in the CBT order
    assert human_order < 0.8 < 0.95 < written_order
    assert statistics.fmean(h["coverage"] for h in human) < statistics.fmean(w["coverage"] for w in written)
