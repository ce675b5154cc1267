"""`cbt-llm synth template`: schema-valid, varied, safe and byte-for-byte deterministic on any shard count."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from cbt_llm.cli import main
from cbt_llm.core.config import SynthConfig, load_config
from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.cbt import CBT_PARTS, DISTORTIONS, join_answer
from cbt_llm.domain.crisis import CORPUS_KEYWORDS, CRISIS_SUPPORT_SENTENCE, corpus_is_crisis, detect
from cbt_llm.domain.record import SCHEMA_VERSION, validate_record
from data_pipeline.io import dumps
from data_pipeline.synth.banks import records as C
from data_pipeline.synth.draws import digest
from data_pipeline.synth.template import (
    PROMPT_VERSION,
    SUMMARY_NAME,
    _compose,
    _seed_prefix,
    iter_records,
    record_at,
    run_synth_template,
    shard_name,
    shard_ranges,
)
from tests.fixtures.paths import ROOT

ISSUE_TOPICS = {
    "anxiety",
    "low_mood",
    "sleep",
    "study_stress",
    "work_stress",
    "relationships",
    "family_conflict",
    "loneliness",
    "self_esteem",
    "grief",
    "health_worry",
    "social_anxiety",
}
N = 3000
CRISIS_FRACTION = 0.1


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return list(iter_records(seed=7, start=0, stop=N, crisis_fraction=CRISIS_FRACTION))


def _quoted_thought(description: str) -> str:
    m = re.search(r"“([^“”]+)。”", description)
    assert m, description
    return m.group(1)


def _run(tmp: Path, n: int, shards: int, seed: int = 3, compress: str = "none", workers: int = 1, **kw) -> dict:
    cfg = SynthConfig(
        num_records=n, seed=seed, out_dir=str(tmp), num_shards=shards, compress=compress, workers=workers, **kw
    )
    return run_synth_template(cfg)


def _concat(folder: Path, shards: int, compress: str = "none") -> bytes:
    out = b""
    for k in range(shards):
        data = (folder / shard_name(k, shards, compress)).read_bytes()
        out += zstandard.ZstdDecompressor().decompressobj().decompress(data) if compress == "zstd" else data
    return out


# ---------------------------------------------------------------------------------------------- content


def test_every_record_validates_unchanged_against_schema_v1(records):
    for i, rec in enumerate(records):
        valid, reason = validate_record(rec)
        assert reason is None, (rec["id"], reason)
        assert valid == rec  # nothing to strip or coerce: the generator writes schema-normal records
        assert rec["id"] == f"synth-7-{i:09d}"
        assert rec["answer"] == join_answer(rec["cbt"])
        assert list(rec["cbt"]) == list(CBT_PARTS)
        assert rec["source"] == "synth-template"
        assert rec["meta"] == {
            "generator": "template",
            "prompt_version": "template-v3",
            "seed": 7,
            "topic": rec["meta"]["topic"],
            "crisis": rec["meta"]["crisis"],
            "schema_version": SCHEMA_VERSION,
        }
        assert 3 <= len(rec["keywords"]) == len(set(rec["keywords"]))
        assert rec["distortions"] and rec["distortions"][0] in DISTORTIONS


def test_all_twelve_topics_and_eight_distortions_appear_roughly_evenly(records):
    topics: dict[str, int] = {}
    dists: dict[str, int] = {}
    for rec in records:
        topics[rec["meta"]["topic"]] = topics.get(rec["meta"]["topic"], 0) + 1
        dists[rec["distortions"][0]] = dists.get(rec["distortions"][0], 0) + 1
    assert set(topics) == ISSUE_TOPICS
    assert set(dists) == set(DISTORTIONS)
    # uniform draws: 3000/12 = 250 and 3000/8 = 375 expected; allow wide statistical slack
    assert min(topics.values()) > 150 and max(topics.values()) < 350
    assert min(dists.values()) > 250 and max(dists.values()) < 500


def test_key_thought_and_challenge_address_the_distortion_in_the_description(records):
    for rec in records:
        d = rec["distortions"][0]
        topic = C.TOPICS[rec["meta"]["topic"]]
        thought = _quoted_thought(rec["description"])
        assert thought in topic["thoughts"][d], (rec["id"], d, thought)  # the description shows distortion d
        key, challenge = rec["cbt"]["key_thought"], rec["cbt"]["challenge"]
        assert f"“{thought}”" in key  # the answer quotes the very thought back
        assert C.DISTORTION_NAMES_ZH[d] in key
        for other in DISTORTIONS:
            if other != d:
                assert C.DISTORTION_NAMES_ZH[other] not in key, (rec["id"], d, other)
        assert C.CHALLENGE_MARKERS[d] in challenge, (rec["id"], d)


def test_every_marker_bank_is_consistent():
    for d in DISTORTIONS:
        assert all(C.DISTORTION_NAMES_ZH[d] in t for t in C.KEY_THOUGHT_TEMPLATES[d])
        assert all(C.CHALLENGE_MARKERS[d] in t for t in C.CHALLENGE_TEMPLATES[d])
        for topic in C.TOPICS.values():
            assert len(topic["thoughts"][d]) == 2
        # template-v3's clause banks keep the same markers: each explanation names its own distortion only
        for t in C.KEY_THOUGHT_EXPLANATIONS[d]:
            assert C.DISTORTION_NAMES_ZH[d] in t
            assert not any(C.DISTORTION_NAMES_ZH[o] in t for o in DISTORTIONS if o != d), (d, t)
        assert all(C.CHALLENGE_MARKERS[d] in t for t in C.CHALLENGE_EXTRA[d])
    assert all("{thought}" in t for t in C.KEY_THOUGHT_LEADS)


def test_encouragement_always_points_to_professional_help(records):
    for rec in records:
        enc = rec["cbt"]["encouragement"]
        assert "专业" in enc and ("心理咨询师" in enc or "医生" in enc), rec["id"]
    for t in C.PROFESSIONAL_HELP + C.PROFESSIONAL_HELP_MORE:
        assert "专业" in t and ("心理咨询师" in t or "医生" in t), t


def test_crisis_answers_keep_the_hotline_and_the_crisis_help_line(records):
    # composition never touches the crisis path: the empathy part ends with the hotline sentence and the
    # encouragement with a crisis professional-help line (a calm answer never gets either)
    for r in records:
        cbt = r["cbt"]
        if r["meta"]["crisis"]:
            assert cbt["empathy"].endswith(CRISIS_SUPPORT_SENTENCE), r["id"]
            assert any(cbt["encouragement"].endswith(t) for t in C.CRISIS_PROFESSIONAL), r["id"]
        else:
            assert any(cbt["encouragement"].endswith(t) for t in C.PROFESSIONAL_HELP + C.PROFESSIONAL_HELP_MORE)


def test_answer_parts_are_composed_not_picked_whole(records):
    # template-v2 gave 35 distinct encouragements and 50 distinct challenges in 2,000 answers (whole templates);
    # template-v3 composes each part from clauses, so no part is one of a few dozen fixed strings
    first = records[:2000]
    distinct = {p: len({r["cbt"][p] for r in first}) for p in CBT_PARTS}
    assert min(distinct.values()) >= 700, distinct
    assert distinct["empathy"] >= 1900 and distinct["key_thought"] >= 1900, distinct
    for r in first:
        assert not any("{" in t or "}" in t for t in r["cbt"].values()), r["id"]  # every slot filled


def test_strategy_clause_order_varies(records):
    # clause order within a part is drawn: the distortion's tool opens the strategy in about a third of answers
    tool_first = sum(
        any(
            r["cbt"]["strategy"].startswith(lead + t)
            for t in C.DISTORTION_TOOLS[r["distortions"][0]]
            for lead in C.STRATEGY_TOOL_LEADS
        )
        for r in records
    )
    assert 0.28 * N < tool_first < 0.39 * N, tool_first


def test_questions_and_descriptions_are_varied(records):
    first = records[:2000]
    assert len({r["question"] for r in first}) >= 0.95 * 2000
    assert len({r["description"] for r in first}) >= 0.99 * 2000
    assert len({r["answer"] for r in first}) >= 0.99 * 2000


def test_each_record_has_spare_entropy():
    # all choices come from one 512-bit digest; >= 64 unused bits left means no choice was starved
    prefix = _seed_prefix(11)
    for i in range(2000):
        _, left = _compose(digest(prefix, i), 11, i, 500_000)  # crisis path draws the most
        assert left.bit_length() > 64


# ---------------------------------------------------------------------------------------------- safety


def test_crisis_records_are_flagged_and_carry_the_support_sentence(records):
    crisis = [r for r in records if r["meta"]["crisis"]]
    calm = [r for r in records if not r["meta"]["crisis"]]
    assert 0.08 * N < len(crisis) < 0.12 * N
    for r in crisis:
        assert corpus_is_crisis(r["question"]) and corpus_is_crisis(r["description"]), r["id"]
        assert CRISIS_SUPPORT_SENTENCE in r["answer"]
        assert "心理危机" in r["keywords"]
    for r in calm:
        assert not corpus_is_crisis(r["question"], r["description"]), r["id"]
        assert CRISIS_SUPPORT_SENTENCE not in r["answer"]


def test_template_v3_carries_the_12356_sentence():
    # The sentence comes from cbt_llm/domain/crisis.py; a new hotline there changes the corpus, so it is a new template
    # version (PROMPT_VERSION) and this expectation changes with it.
    assert PROMPT_VERSION == "template-v3"
    assert CRISIS_SUPPORT_SENTENCE == (
        "如果你现在有伤害自己或结束生命的想法，请立刻联系身边信任的人，"
        "拨打心理援助热线（如全国统一心理援助热线 12356、北京心理危机研究与干预中心 010-82951332）"
        "或前往最近的医院急诊，你不必独自面对这些。"
    )


def test_crisis_records_are_flagged_by_the_guard_too(records):
    # the guard's detection (cbt_llm.domain.crisis.detect) agrees with the corpus flag on every generated record:
    # no crisis record loses its flag, no calm record gains one
    for r in records:
        assert bool(detect(r["question"] + r["description"])) is r["meta"]["crisis"], r["id"]


def test_crisis_fraction_zero_gives_no_crisis_records():
    assert not any(r["meta"]["crisis"] for r in iter_records(1, 0, 1000, crisis_fraction=0.0))


def test_only_the_crisis_banks_contain_crisis_words():
    def strings(obj):
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from strings(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from strings(v)

    crisis_banks = {"CRISIS_QUESTION_PHRASES", "CRISIS_DESCRIPTION_SENTENCES", "CRISIS_EMPATHY", "CRISIS_PROFESSIONAL"}
    for name in dir(C):
        if name.isupper() and name not in crisis_banks:
            for s in strings(getattr(C, name)):
                assert not any(k in s for k in CORPUS_KEYWORDS), (name, s)
    for s in C.CRISIS_QUESTION_PHRASES + C.CRISIS_DESCRIPTION_SENTENCES:
        assert corpus_is_crisis(s), s


# ---------------------------------------------------------------------------------------------- files


def test_shard_ranges_are_contiguous_and_cover_everything():
    for n, k in [(10, 3), (7, 7), (1_000_003, 4)]:
        ranges = shard_ranges(n, k)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_same_seed_is_byte_identical_on_1_3_and_7_shards_and_records_are_pure(tmp_path):
    n = 1500
    s1 = _run(tmp_path / "a", n, 1)
    one = _concat(tmp_path / "a", 1)
    _run(tmp_path / "again", n, 1)
    assert _concat(tmp_path / "again", 1) == one
    for shards in (3, 7):
        _run(tmp_path / f"s{shards}", n, shards)
        assert _concat(tmp_path / f"s{shards}", shards) == one
    lines = one.decode().splitlines()
    assert len(lines) == n == s1["records"]
    # each line is the project's one JSON encoding, and record i does not depend on its neighbours
    assert lines[1234] == dumps(record_at(3, 1234))
    assert all(line == dumps(json.loads(line)) for line in lines[:200])


def test_parallel_workers_write_the_same_bytes(tmp_path):
    _run(tmp_path / "one", 900, 1)
    summary = _run(tmp_path / "par", 900, 3, workers=2)
    assert summary["workers"] == 2
    assert _concat(tmp_path / "par", 3) == _concat(tmp_path / "one", 1)


def test_zstd_shards_decompress_to_the_same_bytes(tmp_path):
    _run(tmp_path / "plain", 800, 2)
    s = _run(tmp_path / "z", 800, 2, compress="zstd")
    assert (tmp_path / "z" / "part-00000-of-00002.jsonl.zst").is_file()
    plain = _concat(tmp_path / "plain", 2)
    assert _concat(tmp_path / "z", 2, "zstd") == plain
    assert s["bytes"] < len(plain) / 3  # templated text compresses well


def test_different_seeds_differ(tmp_path):
    _run(tmp_path / "a", 300, 1, seed=1)
    _run(tmp_path / "b", 300, 1, seed=2)
    a = _concat(tmp_path / "a", 1).decode().splitlines()
    b = _concat(tmp_path / "b", 1).decode().splitlines()
    qa = [json.loads(x)["question"] for x in a]
    qb = [json.loads(x)["question"] for x in b]
    assert sum(x != y for x, y in zip(qa, qb)) > 0.9 * 300


def test_summary_counts_match_the_files(tmp_path):
    out = tmp_path / "c"
    s = _run(out, 1200, 3, crisis_fraction=0.2)
    recs = [json.loads(x) for x in _concat(out, 3).decode().splitlines()]
    on_disk = json.loads((out / SUMMARY_NAME).read_text(encoding="utf-8"))
    assert on_disk == s
    assert (out / "_SUCCESS").is_file()
    assert not list(out.glob(".*inprogress"))
    assert s["records"] == len(recs) == 1200
    assert s["crisis"] == sum(r["meta"]["crisis"] for r in recs)
    for t in ISSUE_TOPICS:
        assert s["topics"][t] == sum(r["meta"]["topic"] == t for r in recs)
    assert sum(s["distortions"].values()) == 1200
    assert s["records_per_s"] > 0 and s["shards"] == 3
    for f in s["files"]:
        data = (out / f["file"]).read_bytes()
        assert f["bytes"] == len(data) and f["content_sha256"] == hashlib.sha256(data).hexdigest()
        assert f["records"] == len(data.splitlines())
    assert s["bytes"] == sum(f["bytes"] for f in s["files"])


def test_rerun_with_fewer_shards_removes_the_old_shards(tmp_path):
    _run(tmp_path, 400, 4)
    _run(tmp_path, 400, 2, compress="zstd")
    assert sorted(p.name for p in tmp_path.glob("part-*")) == [
        "part-00000-of-00002.jsonl.zst",
        "part-00001-of-00002.jsonl.zst",
    ]


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_writes_shards_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "corpus"
    rc = main(
        [
            "synth",
            "template",
            "--num-records",
            "300",
            "--num-shards",
            "2",
            "--seed",
            "5",
            "--workers",
            "1",
            "--out",
            str(out),
            "synth.crisis_fraction=0.05",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "records/s" in printed and "crisis records" in printed
    summary = json.loads((out / SUMMARY_NAME).read_text(encoding="utf-8"))
    assert summary["records"] == 300 and summary["seed"] == 5 and summary["crisis_fraction"] == 0.05
    lines = _concat(out, 2).decode().splitlines()
    assert len(lines) == 300 and json.loads(lines[0])["id"] == "synth-5-000000000"


def test_cli_rejects_bad_settings_with_one_clear_line(tmp_path, capsys):
    assert main(["synth", "template", "--num-records", "3", "--num-shards", "4", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "synth.num_shards" in err and "lower num_shards" in err
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    assert main(["synth", "template", "--num-records", "3", "--num-shards", "1", "--out", str(afile)]) == 2
    assert "synth.out_dir" in capsys.readouterr().err
    assert main(["synth", "template", "--compress", "gzip", "--out", str(tmp_path / "y")]) == 2
    assert "synth.compress" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- synth.flawed_fraction

# SHA-256 of the first 2,000 records of seed 0 (make demo's corpus: crisis_fraction 0.02), one JSON line each,
# recorded before synth.flawed_fraction existed: its default must leave the demo's corpus byte for byte as it was.
DEMO_HEAD_SHA256 = "fd6cd74eff5ff8825d9c3a0f965bd7b7414d579b5602b822a4f68a98ecef88a9"


def _sha(records) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update((dumps(r) + "\n").encode())
    return h.hexdigest()


def test_flawed_fraction_is_off_by_default_and_leaves_the_demo_corpus_as_recorded(tmp_path):
    assert SynthConfig().flawed_fraction == 0.0
    assert load_config(ROOT / "configs" / "demo-cpu.yaml").synth.flawed_fraction == 0.0
    assert _sha(iter_records(0, 0, 2000)) == DEMO_HEAD_SHA256
    assert _sha(iter_records(0, 0, 2000, flawed_fraction=0.0, flawed_mix={"order": 1.0})) == DEMO_HEAD_SHA256
    s = _run(tmp_path, 2000, 2, seed=0)
    assert hashlib.sha256(_concat(tmp_path, 2)).hexdigest() == DEMO_HEAD_SHA256
    assert not {"flawed", "flaws", "flawed_fraction"} & set(s)  # the summary keeps its keys too


FLAWED = 0.5


@pytest.fixture(scope="module")
def flawed() -> list[dict]:
    return list(iter_records(seed=7, start=0, stop=N, crisis_fraction=CRISIS_FRACTION, flawed_fraction=FLAWED))


def test_flawed_records_change_only_their_answer_and_stay_schema_valid(records, flawed):
    n = Counter()
    for plain, rec in zip(records, flawed):
        assert validate_record(rec)[1] is None, rec["id"]
        flaw = rec["meta"].get("flaw")
        if flaw is None:
            assert rec == plain
            continue
        n[flaw] += 1
        # the same question, description and parts: only the answer and meta's flaw differ
        assert {k: v for k, v in rec.items() if k not in ("answer", "meta")} == {
            k: v for k, v in plain.items() if k not in ("answer", "meta")
        }
        assert {k: v for k, v in rec["meta"].items() if k not in ("flaw", "flaw_detail")} == plain["meta"]
        paragraphs, cbt, detail = rec["answer"].split("\n\n"), rec["cbt"], rec["meta"]["flaw_detail"]
        if flaw == "missing_part":
            assert paragraphs == [cbt[p] for p in CBT_PARTS if p != detail["part"]]
        else:
            assert paragraphs == [cbt[p] for p in detail["order"]] and detail["order"] != list(CBT_PARTS)
        if rec["meta"]["crisis"]:  # a crisis answer keeps its support: no_empathy and a missing empathy are never drawn
            assert CRISIS_SUPPORT_SENTENCE in rec["answer"] and flaw != "no_empathy"
            assert detail.get("part") != "empathy"
    total = sum(n.values())
    assert abs(total / N - FLAWED) < 0.05  # binomial sd 0.009 at n = 3000
    assert set(n) == {"missing_part", "order", "no_empathy"}
    assert n["order"] > n["missing_part"] and n["order"] > n["no_empathy"]  # the default mix 0.4 / 0.3 / 0.3


def test_flawed_fraction_is_deterministic_on_any_shard_count_and_pure(tmp_path, flawed):
    again = list(iter_records(seed=7, start=0, stop=N, crisis_fraction=CRISIS_FRACTION, flawed_fraction=FLAWED))
    assert again == flawed
    i = next(k for k, r in enumerate(flawed) if "flaw" in r["meta"])
    assert record_at(7, i, CRISIS_FRACTION, flawed_fraction=FLAWED) == flawed[i]
    s1 = _run(tmp_path / "one", 900, 1, flawed_fraction=FLAWED)
    s3 = _run(tmp_path / "three", 900, 3, workers=2, flawed_fraction=FLAWED)
    one = _concat(tmp_path / "one", 1)
    assert _concat(tmp_path / "three", 3) == one
    lines = [json.loads(x) for x in one.decode().splitlines()]
    assert [dumps(r) for r in lines] == [dumps(r) for r in iter_records(3, 0, 900, flawed_fraction=FLAWED)]
    flaws = Counter(r["meta"]["flaw"] for r in lines if "flaw" in r["meta"])
    for s in (s1, s3):
        assert s["flawed_fraction"] == FLAWED and s["flawed"] == sum(flaws.values())
        assert s["flaws"] == {f: flaws.get(f, 0) for f in s["flawed_mix"]}
    # another seed flaws other records; another mix other flaws
    assert [("flaw" in r["meta"]) for r in iter_records(8, 0, 200, flawed_fraction=FLAWED)] != [
        ("flaw" in r["meta"]) for r in iter_records(7, 0, 200, flawed_fraction=FLAWED)
    ]
    only_order = list(iter_records(7, 0, 300, flawed_fraction=1.0, flawed_mix={"order": 1.0}))
    assert all(r["meta"]["flaw"] == "order" for r in only_order)


def test_flawed_fraction_is_for_records_only():
    for kind in ("pairs", "sessions"):
        with pytest.raises(ConfigError, match="flawed_fraction"):
            load_config(None, ["synth.flawed_fraction=0.5", f"synth.{kind}=true"])
    with pytest.raises(ConfigError, match="synth.flawed_mix"):
        load_config(None, ["synth.flawed_mix={unsafe: 1.0}"])  # a pair-only flaw: never in a training corpus
