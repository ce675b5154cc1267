"""Damaged input files in `cbt-llm prepare` (data.on_input_error).

What must hold: a zstd shard cut short, one whose content checksum fails, one with bytes after its last frame,
a JSONL file that stops in the middle of a record, a synth shard that is shorter, longer or different from what
its synth_summary.json recorded, and a file that is not what its name says are each found, as one line naming
the file and how far the read got, never a Ray traceback; under `stop` (the default) nothing is written (and an
earlier run's output is left as it was); under `quarantine` the run prepares the other files exactly as if the
damaged one had not been given and records it (reason, lines read) in the manifest and the summary. Whole files
(multi-frame zstd, a last line without a newline, synth's own zstd shards with checksums) read as before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zstandard

from cbt_llm.core.config import Config, SynthConfig
from data_pipeline.io import DamagedFileError, open_binary_read
from data_pipeline.prepare import PrepareError, run_prepare
from data_pipeline.prepare.errors import InputFileError
from data_pipeline.prepare.ray_session import init_ray
from data_pipeline.prepare.read import INPUT_ERROR, check_file, iter_file, synth_expectations
from data_pipeline.synth.template import run_synth_template
from data_pipeline.tokenizer import train_tokenizer_from_texts

SYSTEM = "你是一名心理咨询师,请用认知行为疗法回答。"


def _records(path: Path) -> list[bytes]:
    with open_binary_read(path) as fh:
        return [line for line in fh.read().split(b"\n") if line]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Synth's own output (3 zstd shards with checksums, and synth_summary.json), a tokenizer trained on it and
    one Ray session for the module."""
    d = tmp_path_factory.mktemp("damaged")
    run_synth_template(
        SynthConfig(num_records=180, seed=5, out_dir=str(d / "corpus"), num_shards=3, compress="zstd", workers=1)
    )
    texts = []
    for p in sorted((d / "corpus").glob("*.zst")):
        for line in _records(p):
            rec = json.loads(line)
            texts += [rec["question"], rec["description"], rec["answer"]]
    tok = train_tokenizer_from_texts(texts + [SYSTEM], 700, d / "tok")
    started, _ = init_ray(None, Path("/tmp") / f"cbtr-{d.name[-12:]}")
    yield {"dir": d, "tok": str(tok)}
    if started:
        import ray

        ray.shutdown()


def _copy(corpus, name: str) -> Path:
    """A fresh copy of the synth corpus folder (shards and summary) to damage."""
    dst = corpus["dir"] / name
    shutil.copytree(corpus["dir"] / "corpus", dst)
    return dst


def _cfg(corpus, inputs: list[Path] | Path, out: Path, **data) -> Config:
    base = {
        "inputs": [str(inputs / "*.jsonl*")] if isinstance(inputs, Path) else [str(p) for p in inputs],
        "out_dir": str(out),
        "tokenizer": corpus["tok"],
        "system_prompt": SYSTEM,
        "seq_len": 1024,
        "pack_window": 64,
        "val_fraction": 0.2,
        "world_size": 2,
    }
    return Config.model_validate({"data": base | data})


def _damage(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _only(blocks) -> tuple[list[int], dict | None]:
    """The record line numbers the reader gave and its damage row (pre_detail, raw) if any."""
    lines, damage = [], None
    for t in blocks:
        d = t.to_pydict()
        for line, reason, detail, raw in zip(d["line"], d["pre_reason"], d["pre_detail"], d["raw"]):
            if reason == INPUT_ERROR:
                damage = {"reason": detail, **json.loads(raw), "line": line}
            else:
                lines.append(line)
    return lines, damage


# ---- the reader, without Ray ---------------------------------------------------------------------------------


def _jsonl(n: int) -> bytes:
    return b"".join(
        json.dumps({"id": f"r{i}", "text": "很难受" * (i % 7 + 1)}, ensure_ascii=False).encode() + b"\n"
        for i in range(n)
    )


def test_zstd_damage_is_found_with_how_far_the_read_got(tmp_path):
    data = _jsonl(30000)
    whole = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    # a corpus of two frames (concatenated files, pzstd) is read to its end, as one stream
    two = zstandard.ZstdCompressor().compress(data[:5000]) + zstandard.ZstdCompressor().compress(data[5000:])
    lines, dmg = _only(iter_file(str(_damage(tmp_path, "two.jsonl.zst", two)), 0, 5000))
    assert dmg is None and lines == list(range(1, 30001))

    cut = _damage(tmp_path, "cut.jsonl.zst", whole[: len(whole) // 2])
    lines, dmg = _only(iter_file(str(cut), 0, 500))
    assert "ends inside a frame" in dmg["reason"] and "cut short" in dmg["reason"]
    assert 0 < len(lines) <= dmg["lines"] < 30000 and dmg["bytes_read"] == dmg["bytes"] == len(whole) // 2
    with pytest.raises(DamagedFileError, match="ends inside a frame"):  # every reader of corpus files sees it
        sum(1 for _ in open_binary_read(cut))

    flipped = bytearray(whole)
    flipped[len(whole) - 6] ^= 0x01  # inside the last block or the checksum: only the checksum can tell
    _, dmg = _only(iter_file(str(_damage(tmp_path, "flip.jsonl.zst", bytes(flipped))), 0, 500))
    assert dmg is not None and dmg["reason"].startswith("zstd: ")

    _, dmg = _only(iter_file(str(_damage(tmp_path, "tail.jsonl.zst", whole + b"\x00junk")), 0, 500))
    assert dmg["reason"].startswith("zstd: ") and "frame 2" in dmg["reason"] and dmg["lines"] == 30000

    _, dmg = _only(iter_file(str(_damage(tmp_path, "empty.jsonl.zst", b"")), 0, 500))
    assert "no frame" in dmg["reason"]


def test_jsonl_cut_mid_record_and_files_that_are_not_what_they_say(tmp_path):
    data = _jsonl(50)
    lines, dmg = _only(iter_file(str(_damage(tmp_path, "cut.jsonl", data[:-9])), 0, 16))
    assert "stops without a newline in the middle of a record" in dmg["reason"] and dmg["lines"] == 50
    assert lines == list(range(1, 51))  # the part line was read too; the file is damaged as a whole
    # a whole last record without its newline is fine
    lines, dmg = _only(iter_file(str(_damage(tmp_path, "nonl.jsonl", data[:-1])), 0, 16))
    assert dmg is None and len(lines) == 50
    # a Parquet file that is not one, a file that vanished
    _, dmg = _only(iter_file(str(_damage(tmp_path, "x.parquet", b"PAR1 not really")), 0, 16))
    assert dmg["reason"].startswith("cannot be read: ") and dmg["bytes"] == 15
    _, dmg = _only(iter_file(str(tmp_path / "gone.jsonl"), 0, 16))
    assert "FileNotFoundError" in dmg["reason"]
    assert check_file(str(tmp_path / "nonl.jsonl"), None) is None


def test_a_json_list_cut_short_is_a_damaged_file_not_one_reject(tmp_path):
    items = [json.loads(line) for line in _jsonl(20).decode().splitlines()]
    whole = json.dumps(items, ensure_ascii=False).encode()
    lines, dmg = _only(iter_file(str(_damage(tmp_path, "whole.json", whole)), 0, 16))
    assert dmg is None and lines == list(range(1, 21))
    _, dmg = _only(iter_file(str(_damage(tmp_path, "cut.json", whole[: len(whole) // 2])), 0, 16))
    assert "is not one whole JSON list" in dmg["reason"] and "cut short or damaged" in dmg["reason"]
    assert f"{len(whole) // 2:,} bytes" in dmg["reason"]


def test_synth_summary_is_checked_records_and_content(corpus, tmp_path):
    d = _copy(corpus, "summary_reader")
    files = sorted(str(p) for p in d.glob("*.zst"))
    expect = synth_expectations(files)
    assert set(expect) == set(files) and all(
        e["records"] == 60 and len(e["content_sha256"]) == 64 for e in expect.values()
    )
    assert check_file(files[0], expect[files[0]]) is None
    # the same records written without one line, or with one character changed: read fine, but not what synth wrote
    recs = _records(Path(files[0]))
    short = _damage(tmp_path, "short.jsonl", b"\n".join(recs[:-1]) + b"\n")
    dmg = check_file(str(short), expect[files[0]])
    assert dmg["reason"] == "holds 59 records, synth_summary.json says 60 (file cut short or changed)"
    assert dmg["lines_read"] == 59
    changed = _damage(tmp_path, "changed.jsonl", b"\n".join(recs).replace("难".encode(), "南".encode(), 1) + b"\n")
    assert "differs from the SHA-256 in synth_summary.json" in check_file(str(changed), expect[files[0]])["reason"]


# ---- prepare, stop and quarantine ----------------------------------------------------------------------------


def test_synth_zstd_corpus_prepares_checked(corpus):
    """Synth's zstd shards (frames with checksums) with their summary: read whole, every check passes."""
    man = run_prepare(_cfg(corpus, corpus["dir"] / "corpus", corpus["dir"] / "clean"))
    assert man["counts"]["read"] == 180 and "quarantined" not in man
    assert [Path(i["path"]).name for i in man["inputs"]] == [f"part-0000{k}-of-00003.jsonl.zst" for k in range(3)]


def test_cut_zstd_shard_stops_with_one_line_and_writes_nothing(corpus, capsys):
    from cbt_llm.cli import main

    d = _copy(corpus, "cut_stop")
    shard = d / "part-00001-of-00003.jsonl.zst"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    summary = json.loads((d / "synth_summary.json").read_text())
    for f in summary["files"]:  # a summary that agrees on the size: the reader must find the cut itself
        f["bytes"] = (d / f["file"]).stat().st_size
    (d / "synth_summary.json").write_text(json.dumps(summary))
    out = corpus["dir"] / "cut_stop_out"
    with pytest.raises(InputFileError) as exc:
        run_prepare(_cfg(corpus, d, out))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"input file {shard}: zstd stream ends inside a frame")
    assert f"of {size // 2:,} bytes" in msg and "lines read" in msg and "on_input_error=quarantine" in msg
    assert not out.exists()  # nothing written, not even the folder

    # an earlier run's output is left exactly as it was; the CLI says it in one line, no Ray traceback
    (out / "train").mkdir(parents=True)
    (out / "train" / "part-00000-of-00001.parquet").write_bytes(b"an earlier run's shard")
    (out / "manifest.json").write_text('{"an earlier run": true}')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    rc = main(["prepare", f"data.inputs=[{d}/*.jsonl.zst]", f"data.tokenizer={corpus['tok']}", f"data.out_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith(f"error: input file {shard}: zstd stream ends inside a frame")
    assert not any("Traceback" in line or "RayTaskError" in line for line in err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_synth_shard_of_the_wrong_size_fails_before_ray_work(corpus, tmp_path):
    d = _copy(corpus, "size_stop")
    shard = d / "part-00002-of-00003.jsonl.zst"
    shard.write_bytes(shard.read_bytes() + b"\n")
    with pytest.raises(InputFileError, match=r"part-00002-of-00003.jsonl.zst: is \d[\d,]* bytes, synth_summary.json"):
        run_prepare(_cfg(corpus, d, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_quarantine_prepares_the_rest_and_records_the_file(corpus, capsys):
    """A plain JSONL file cut mid-record between two good ones: under quarantine the run starts over without it,
    the shards are those of a run given only the good files, and manifest and summary name it."""
    d = corpus["dir"] / "quarantine"
    d.mkdir()
    shards = sorted((corpus["dir"] / "corpus").glob("*.zst"))
    recs = [_records(p) for p in shards]
    (d / "a.jsonl").write_bytes(b"\n".join(recs[0]) + b"\n")
    (d / "b.jsonl").write_bytes((b"\n".join(recs[1]) + b"\n")[:-40])  # cut inside its last record
    (d / "c.jsonl").write_bytes(b"\n".join(recs[2]) + b"\n")
    capsys.readouterr()
    man = run_prepare(_cfg(corpus, d, corpus["dir"] / "q_out", on_input_error="quarantine"))
    printed = capsys.readouterr().out
    assert man["quarantined"] == [
        {
            "path": str(d / "b.jsonl"),
            "reason": "the last line (60) stops without a newline in the middle of a record (file cut short)",
            "lines_read": 60,
            "bytes_read": (d / "b.jsonl").stat().st_size,
            "bytes": (d / "b.jsonl").stat().st_size,
        }
    ]
    assert [Path(i["path"]).name for i in man["inputs"]] == ["a.jsonl", "c.jsonl"]
    assert man["counts"]["read"] == 120
    assert "quarantined_files" in printed and "quarantined: b.jsonl" in printed
    # exactly a run without the file (the config hash apart: quarantine is part of the data settings)
    ref = run_prepare(_cfg(corpus, [d / "a.jsonl", d / "c.jsonl"], corpus["dir"] / "q_ref"))
    assert ref["splits"] == man["splits"] and ref["counts"] == man["counts"]
    assert {k for k in man if k not in ref} == {"quarantined"}
    for sh in man["splits"]["train"]["shards"]:
        assert (corpus["dir"] / "q_out" / sh["path"]).read_bytes() == (
            corpus["dir"] / "q_ref" / sh["path"]
        ).read_bytes()


def test_every_file_damaged_under_quarantine_is_an_error(corpus, tmp_path):
    bad = _damage(tmp_path, "only.jsonl.zst", b"\x28\xb5\x2f\xfd broken")
    with pytest.raises(PrepareError, match="every input file is damaged"):
        run_prepare(_cfg(corpus, [bad], tmp_path / "out", on_input_error="quarantine"))
    assert not (tmp_path / "out").exists()


def test_on_input_error_stays_out_of_the_default_config_hash():
    """The default (stop) leaves config_hash as it was before the setting existed; quarantine changes it."""
    import hashlib

    from data_pipeline.prepare.manifest import data_config_hash

    base = Config.model_validate({"data": {"inputs": ["x"]}}).data
    stop = data_config_hash(base)
    assert stop != data_config_hash(base.model_copy(update={"on_input_error": "quarantine"}))
    skip = ("out_dir", "on_input_error", "near_dup", "quality")
    obj = {k: v for k, v in base.model_dump(mode="json").items() if k not in skip and not k.startswith("ray_")}
    assert stop == hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def test_the_checks_work_through_fsspec(corpus):
    """The same checks on a URI (fsspec's in-memory file system standing in for s3:// or gs://): the summary is
    found beside the files, a size that differs fails on a stat, a cut zstd shard in the read."""
    import fsspec

    from data_pipeline.prepare.read import resolve_inputs, size_damage

    fs = fsspec.filesystem("memory")
    src = corpus["dir"] / "corpus"
    for p in src.iterdir():
        fs.pipe_file(f"/remote-corpus/{p.name}", p.read_bytes())
    files = resolve_inputs(["memory://remote-corpus/*.jsonl.zst"])
    expect = synth_expectations(files)
    assert len(files) == 3 and set(expect) == set(files)
    assert size_damage(files, expect) == {} and check_file(files[0], expect[files[0]]) is None
    whole = fs.cat_file("/remote-corpus/part-00000-of-00003.jsonl.zst")
    fs.pipe_file("/remote-corpus/part-00000-of-00003.jsonl.zst", whole[: len(whole) // 2])
    assert "synth_summary.json says" in size_damage(files, expect)[files[0]]["reason"]
    dmg = check_file(files[0], expect[files[0]])
    assert "ends inside a frame" in dmg["reason"] and dmg["bytes"] == dmg["bytes_read"] == len(whole) // 2
    fs.rm("/remote-corpus", recursive=True)
