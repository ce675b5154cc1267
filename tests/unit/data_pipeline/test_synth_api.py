"""`cbt-llm synth api` against a real local HTTP server with scripted faults (tests/fixtures/fake_openai_server.py)."""

from __future__ import annotations

import json
import random
import re
import socket
from pathlib import Path

import pytest

from cbt_llm.cli import main as cli_main  # noqa: E402
from cbt_llm.core.config import ApiSynthConfig  # noqa: E402
from cbt_llm.core.errors import ConfigError  # noqa: E402
from cbt_llm.domain.crisis import CRISIS_SUPPORT_SENTENCE, has_crisis_support  # noqa: E402
from cbt_llm.domain.prompts import build_messages  # noqa: E402
from cbt_llm.domain.record import validate_record  # noqa: E402
from data_pipeline.synth.api import PROFESSIONAL_HELP_SENTENCE, ReplyError, parse_reply, run_synth_api
from data_pipeline.synth.client import _parse_retry_after, backoff_delay
from tests.fixtures.fake_openai_server import COMPLETION_TOKENS, PROMPT_TOKENS, FakeOpenAIServer  # noqa: E402
from tests.fixtures.paths import PSYQA_SAMPLE

PSYQA_SAMPLE = PSYQA_SAMPLE
CRISIS_INSTRUCTION_MARK = "危机支持信息"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def write_questions(path: Path, questions: list[tuple[str, str]]) -> Path:
    """JSONL of (id, question) pairs in our plain question format."""
    path.write_text(
        "".join(
            json.dumps({"id": i, "question": q, "description": "", "keywords": "情绪,测试"}, ensure_ascii=False) + "\n"
            for i, q in questions
        ),
        encoding="utf-8",
    )
    return path


def numbered(n: int, prefix: str = "q") -> list[tuple[str, str]]:
    return [(f"{prefix}{i:03d}", f"第{i}号问题:我最近总是感到很焦虑,该怎么办?") for i in range(n)]


def make_cfg(tmp_path: Path, srv: FakeOpenAIServer, input_path: Path, **kw) -> ApiSynthConfig:
    base = dict(
        input=str(input_path),
        out_dir=str(tmp_path / "out"),
        base_url=srv.base_url,
        model="fake-model",
        concurrency=4,
        timeout_s=30.0,
        max_retries=3,
        backoff_s=0.01,
        max_backoff_s=0.05,
    )
    base.update(kw)
    return ApiSynthConfig(**base)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- faults


def test_every_fault_is_retried_and_ends_ok(tmp_path):
    faults = [
        "429",
        "500",
        "503",
        "malformed_body",
        "no_choices",
        "not_json",
        "missing_part",
        "empty_part",
        "english_part",
    ]
    qs = [(f"f-{f}", f"故障{f}:我总觉得自己做什么都不行。") for f in faults]
    qs += [("ok-fenced", "围栏:我和朋友吵架了。"), ("ok-chatty", "闲聊:我害怕当众讲话。")]
    plan = {f"故障{f}:": [f] for f in faults}
    plan.update({"围栏:": ["good_fenced"], "闲聊:": ["good_chatty"]})
    with FakeOpenAIServer(plan=plan) as srv:
        summary = run_synth_api(make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", qs)))
        per_q = {f: [r["fault"] for r in srv.requests_for(f"故障{f}:")] for f in faults}
        for f in faults:
            assert per_q[f] == [f, "good"], f  # one fault, then one retry that succeeded
        assert len(srv.requests_for("围栏:")) == len(srv.requests_for("闲聊:")) == 1
        sent = srv.usage_sent
        # Every reply that reports usage is counted, used or not: the good ones plus not_json, missing_part,
        # empty_part and english_part (429/5xx, malformed_body and no_choices report none).
        assert summary["prompt_tokens"] == sent["prompt_tokens"] == PROMPT_TOKENS * (len(qs) + 4)
        assert summary["completion_tokens"] == sent["completion_tokens"] == COMPLETION_TOKENS * (len(qs) + 4)
    assert summary["total"] == summary["ok"] == len(qs)
    assert (summary["rejected"], summary["skipped"], summary["retried"]) == (0, 0, len(faults))
    assert summary["requests"] == len(qs) + len(faults)
    assert summary["errors"] == {"http_429": 1, "http_500": 1, "http_503": 1, "malformed_body": 1, "invalid_reply": 5}
    out = tmp_path / "out"
    records = read_jsonl(out / "records.jsonl")
    assert sorted(r["id"] for r in records) == sorted(i for i, _ in qs)
    for r in records:
        assert validate_record(r)[1] is None
        assert r["source"] == "api:fake-model"
        assert r["meta"]["generator"] == "api" and r["meta"]["prompt_version"] == "v2"  # the default
        assert r["meta"]["model"] == "fake-model"
        assert r["meta"]["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS}
        assert r["meta"]["crisis"] is False
        assert r["distortions"] == ["all_or_nothing"]
    attempts = {r["id"]: r["meta"]["attempts"] for r in records}
    assert attempts["f-429"] == 2 and attempts["ok-fenced"] == 1
    assert (out / "rejects.jsonl").read_text() == ""
    assert json.loads((out / "summary.json").read_text())["ok"] == len(qs)


def test_slow_reply_times_out_and_is_retried(tmp_path):
    qs = [("slow", "慢:我最近失眠很严重。"), ("fast", "快:我不想上班。")]
    with FakeOpenAIServer(plan={"慢:": ["slow"]}, slow_s=3.0) as srv:
        cfg = make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", qs), timeout_s=0.5)
        summary = run_synth_api(cfg)
        assert [r["fault"] for r in srv.requests_for("慢:")][:1] == ["slow"]
    assert summary["ok"] == 2 and summary["rejected"] == 0
    assert summary["errors"].get("timeout", 0) >= 1
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "out" / "records.jsonl")) == ["fast", "slow"]


def test_question_that_always_fails_is_rejected_with_reason(tmp_path):
    qs = [("a", "总是500:我很难过。"), ("b", "总缺字段:我很孤独。"), ("c", "正常:我想改变自己。")]
    plan = {"总是500:": "always:500", "总缺字段:": "always:missing_part"}
    with FakeOpenAIServer(plan=plan) as srv:
        summary = run_synth_api(make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", qs), max_retries=2))
        assert len(srv.requests_for("总是500:")) == len(srv.requests_for("总缺字段:")) == 3
    assert (summary["ok"], summary["rejected"], summary["retried"]) == (1, 2, 4)
    rejects = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    assert set(rejects) == {"a", "b"}
    assert rejects["a"]["stage"] == "api" and rejects["a"]["attempts"] == 3
    assert rejects["a"]["reason"].startswith("HTTP 500") and "gave up after 3 attempts" in rejects["a"]["reason"]
    assert rejects["a"]["errors"] == ["http_500"] * 3
    assert "lacks part(s): challenge" in rejects["b"]["reason"]
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "records.jsonl")] == ["c"]


def test_client_errors_are_not_retried(tmp_path):
    # concurrency 1: the good question completes first, so a later 401 rejects only its own question
    qs = [("good", "好:我想提升自信。"), ("bad401", "坏401:我害怕失败。"), ("bad400", "坏400:我很焦虑。")]
    plan = {"坏401:": ["401"], "坏400:": ["400"]}
    with FakeOpenAIServer(plan=plan) as srv:
        summary = run_synth_api(make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", qs), concurrency=1))
        assert len(srv.requests_for("坏401:")) == len(srv.requests_for("坏400:")) == 1
    assert (summary["ok"], summary["rejected"], summary["retried"]) == (1, 2, 0)
    rejects = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    assert rejects["bad401"].startswith("HTTP 401") and rejects["bad400"].startswith("HTTP 400")


def test_connection_errors_are_retried_then_the_run_stops_once(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    cfg = ApiSynthConfig(
        input=str(write_questions(tmp_path / "q.jsonl", numbered(10))),
        out_dir=str(out),
        base_url=f"http://127.0.0.1:{port}/v1",
        model="m",
        concurrency=1,
        max_retries=1,
        backoff_s=0.01,
    )
    with pytest.raises(ConfigError, match=r"cannot connect to .*is the server running\? check api.base_url"):
        run_synth_api(cfg)
    summary = json.loads((out / "summary.json").read_text())
    # the first question to exhaust its retries stops the run; the other one in backoff is not retried
    assert (summary["ok"], summary["rejected"], summary["not_attempted"]) == (0, 1, 9)
    assert summary["errors"] == {"connection": 3}
    rejects = read_jsonl(out / "rejects.jsonl")
    assert len(rejects) == 1 and "connection error" in rejects[0]["reason"]


def test_every_request_401_fails_once_and_early(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CBT_WRONG_KEY", "sk-wrong-4d1c0ffee")
    inp = write_questions(tmp_path / "q.jsonl", numbered(20))
    with FakeOpenAIServer(expected_key="sk-right") as srv:
        rc = cli_main(
            [
                "synth",
                "api",
                "--input",
                str(inp),
                "--out",
                str(tmp_path / "out"),
                "--base-url",
                srv.base_url,
                "--model",
                "m",
                "--concurrency",
                "2",
                "--api-key-env",
                "CBT_WRONG_KEY",
            ]
        )
        n_requests = len(srv.requests)
    err = capsys.readouterr().err
    assert rc == 2
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "HTTP 401" in error_lines[0] and "CBT_WRONG_KEY" in error_lines[0]
    assert n_requests <= 2  # the run stopped instead of sending 20 doomed requests
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ok"] == 0 and summary["rejected"] == n_requests
    assert summary["not_attempted"] == 20 - n_requests and "HTTP 401" in summary["aborted"]
    for f in (tmp_path / "out").iterdir():
        assert "sk-wrong-4d1c0ffee" not in f.read_text(encoding="utf-8")
    assert "sk-wrong-4d1c0ffee" not in err


def test_wrong_base_url_path_fails_once_with_a_hint(tmp_path):
    with FakeOpenAIServer() as srv:
        cfg = make_cfg(
            tmp_path,
            srv,
            write_questions(tmp_path / "q.jsonl", numbered(10)),
            concurrency=1,
            base_url=srv.base_url + "/oops",
        )
        with pytest.raises(ConfigError, match=r"HTTP 404 before any success; check api.base_url"):
            run_synth_api(cfg)
        assert len(srv.requests) == 1


def test_bad_input_entries_are_counted_and_quarantined(tmp_path):
    inp = tmp_path / "q.jsonl"
    write_questions(inp, numbered(3))
    with open(inp, "a", encoding="utf-8") as fh:
        fh.write('{"id": "no-question"}\n{broken\n')
    with FakeOpenAIServer() as srv:
        summary = run_synth_api(make_cfg(tmp_path, srv, inp))
        bad_cfg = make_cfg(tmp_path, srv, tmp_path / "bad.jsonl", out_dir=str(tmp_path / "out2"))
    assert (summary["total"], summary["ok"], summary["input_rejected"], summary["rejected"]) == (3, 3, 2, 0)
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert [(r["stage"], r["reason"].split(" (")[0]) for r in rejects] == [
        ("input", "missing 'question'"),
        ("input", "not valid JSON"),
    ]
    # an input with no usable question at all is almost certainly the wrong file: fail with one line
    (tmp_path / "bad.jsonl").write_text('{"text": "alpaca style"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="no valid question"):
        run_synth_api(bad_cfg)


@pytest.mark.timeout(60)
def test_writer_failure_stops_the_run_instead_of_hanging(tmp_path, monkeypatch):
    import data_pipeline.synth.client as synth_api

    def disk_full(obj):
        raise OSError("No space left on device")

    monkeypatch.setattr(synth_api, "dumps", disk_full)
    with FakeOpenAIServer() as srv:
        with pytest.raises(OSError, match="No space left"):
            run_synth_api(make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", numbered(40)), concurrency=2))


# ----------------------------------------------------------------------------------- concurrency, resume


def test_concurrency_bound_is_respected(tmp_path):
    with FakeOpenAIServer(delay_s=0.05) as srv:
        summary = run_synth_api(
            make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", numbered(24)), concurrency=3)
        )
        assert 2 <= srv.max_in_flight <= 3
    assert summary["ok"] == 24


def test_resume_skips_done_ids_and_never_duplicates(tmp_path):
    inp = write_questions(tmp_path / "q.jsonl", numbered(30))
    with FakeOpenAIServer() as srv:
        s1 = run_synth_api(make_cfg(tmp_path, srv, inp, limit=10))
        assert (s1["total"], s1["ok"], s1["skipped"]) == (10, 10, 0)
        s2 = run_synth_api(make_cfg(tmp_path, srv, inp))
        assert (s2["total"], s2["ok"], s2["skipped"]) == (30, 20, 10)
        s3 = run_synth_api(make_cfg(tmp_path, srv, inp))
        assert (s3["total"], s3["ok"], s3["skipped"], s3["requests"]) == (30, 0, 30, 0)
        assert len(srv.requests) == 30  # no question was asked twice
    ids = [r["id"] for r in read_jsonl(tmp_path / "out" / "records.jsonl")]
    assert len(ids) == len(set(ids)) == 30
    assert set(ids) == {i for i, _ in numbered(30)}


def test_rejected_ids_are_retried_on_rerun_and_old_rejects_rotated(tmp_path):
    qs = numbered(3) + [("flaky", "不稳定:我担心找不到工作。")]
    inp = write_questions(tmp_path / "q.jsonl", qs)
    out = tmp_path / "out"
    with FakeOpenAIServer(plan={"不稳定:": "always:503"}) as srv:
        s1 = run_synth_api(make_cfg(tmp_path, srv, inp, max_retries=1))
    assert (s1["ok"], s1["rejected"]) == (3, 1)
    with FakeOpenAIServer() as srv:
        s2 = run_synth_api(make_cfg(tmp_path, srv, inp, max_retries=1))
        assert [r["fault"] for r in srv.requests] == ["good"]  # only the rejected question was asked again
    assert (s2["ok"], s2["skipped"], s2["rejected"]) == (1, 3, 0)
    assert s2["previous_rejects"] == str(out / "rejects.1.jsonl")
    assert [r["id"] for r in read_jsonl(out / "rejects.1.jsonl")] == ["flaky"]
    assert (out / "rejects.jsonl").read_text() == ""
    ids = [r["id"] for r in read_jsonl(out / "records.jsonl")]
    assert sorted(ids) == sorted(i for i, _ in qs)


def test_truncated_last_line_from_a_crash_is_dropped_and_redone(tmp_path, capsys):
    inp = write_questions(tmp_path / "q.jsonl", numbered(5))
    records = tmp_path / "out" / "records.jsonl"
    with FakeOpenAIServer() as srv:
        run_synth_api(make_cfg(tmp_path, srv, inp))
        lines = records.read_bytes().splitlines(keepends=True)
        lost = json.loads(lines[-1])["id"]
        records.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # crash mid-write
        summary = run_synth_api(make_cfg(tmp_path, srv, inp))
        assert [r["user"] for r in srv.requests[5:]] == [
            build_messages(dict(numbered(5))[lost], "", ["情绪", "测试"], crisis=False)[1]["content"]
        ]
    assert (summary["truncated_lines_dropped"], summary["skipped"], summary["ok"]) == (1, 4, 1)
    assert "dropped a truncated last line" in capsys.readouterr().err
    recs = read_jsonl(records)
    assert sorted(r["id"] for r in recs) == sorted(i for i, _ in numbered(5))
    assert all(validate_record(r)[1] is None for r in recs)


def test_corrupt_middle_line_fails_loudly(tmp_path):
    inp = write_questions(tmp_path / "q.jsonl", numbered(3))
    records = tmp_path / "out" / "records.jsonl"
    with FakeOpenAIServer() as srv:
        run_synth_api(make_cfg(tmp_path, srv, inp))
        lines = records.read_text(encoding="utf-8").splitlines()
        records.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=r"records.jsonl:2: not a valid record line"):
            run_synth_api(make_cfg(tmp_path, srv, inp))


# --------------------------------------------------------------------------------------------- safety


def test_prompt_v1_is_frozen_and_v2_names_the_policy_hotline():
    # v1 is the text records were generated with; it keeps the older number. v2 takes the number from
    # cbt_llm/domain/crisis.py: a new number there is a new prompt version, so this expectation changes with it.
    v1 = build_messages("问题", "", [], crisis=True, version="v1")[1]["content"]
    assert v1.endswith("拨打心理援助热线(如全国心理援助热线 400-161-9995)或前往最近的医院急诊。")
    v2 = build_messages("问题", "", [], crisis=True)[1]["content"]
    assert v2.endswith("拨打心理援助热线(如全国统一心理援助热线 12356)或前往最近的医院急诊。")
    assert v1.replace("全国心理援助热线 400-161-9995", "全国统一心理援助热线 12356") == v2
    assert build_messages("问题", "", [], crisis=False, version="v1") == build_messages("问题", "", [], crisis=False)


def test_crisis_question_gets_support_sentence(tmp_path):
    qs = [
        ("crisis-plain", "危机甲:我觉得活着没意思,有时候想自杀。"),
        ("crisis-handled", "危机乙:压力太大了,我想伤害自己。"),
        ("calm", "平静:我想学会时间管理。"),
        ("no-pro", "无专业:我总是拖延。"),
    ]
    plan = {"危机乙:": ["good_crisis"], "无专业:": ["no_professional"]}
    with FakeOpenAIServer(plan=plan) as srv:
        summary = run_synth_api(make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", qs)))
        assert CRISIS_INSTRUCTION_MARK in srv.requests_for("危机甲:")[0]["user"]
        assert CRISIS_INSTRUCTION_MARK in srv.requests_for("危机乙:")[0]["user"]
        assert CRISIS_INSTRUCTION_MARK not in srv.requests_for("平静:")[0]["user"]
    assert summary["ok"] == 4
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "records.jsonl")}
    plain = recs["crisis-plain"]
    assert plain["meta"]["crisis"] is True and plain["meta"]["crisis_support_added"] is True
    assert plain["cbt"]["encouragement"].endswith(CRISIS_SUPPORT_SENTENCE)
    assert plain["answer"].endswith(CRISIS_SUPPORT_SENTENCE)
    handled = recs["crisis-handled"]
    assert handled["meta"]["crisis"] is True and handled["meta"]["crisis_support_added"] is False
    assert CRISIS_SUPPORT_SENTENCE not in handled["answer"] and has_crisis_support(handled["answer"])
    calm = recs["calm"]
    assert calm["meta"]["crisis"] is False and CRISIS_SUPPORT_SENTENCE not in calm["answer"]
    assert calm["meta"]["professional_help_added"] is False
    nopro = recs["no-pro"]
    assert nopro["meta"]["professional_help_added"] is True
    assert nopro["cbt"]["encouragement"].endswith(PROFESSIONAL_HELP_SENTENCE)


def test_api_key_never_reaches_any_output(tmp_path, monkeypatch, capsys):
    key = "sk-cbtllm-DISTINCTIVE-9f8e7d6c5b4a"
    monkeypatch.setenv("CBT_TEST_API_KEY", key)
    qs = numbered(4) + [("echo401", "回显:我和家人关系紧张。")]
    inp = write_questions(tmp_path / "q.jsonl", qs)
    out = tmp_path / "out"
    # concurrency 1 so the question whose 401 reply quotes the key comes after a success (no abort)
    with FakeOpenAIServer(plan={"回显:": ["401"]}) as srv:
        rc = cli_main(
            [
                "synth",
                "api",
                "--input",
                str(inp),
                "--out",
                str(out),
                "--base-url",
                srv.base_url,
                "--model",
                "fake-model",
                "--concurrency",
                "1",
                "--api-key-env",
                "CBT_TEST_API_KEY",
                "api.backoff_s=0.01",
            ]
        )
        assert len(srv.requests) == 5
        assert all(r["headers"].get("Authorization") == f"Bearer {key}" for r in srv.requests)
        rc_dry = cli_main(["synth", "api", "--input", str(inp), "--api-key-env", "CBT_TEST_API_KEY", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0 and rc_dry == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"records.jsonl", "rejects.jsonl", "summary.json"}
    for p in files:
        assert key not in p.read_text(encoding="utf-8"), p
    assert key not in captured.out and key not in captured.err
    assert "CBT_TEST_API_KEY" in json.loads((out / "summary.json").read_text())["config"]["api_key_env"]
    reject = read_jsonl(out / "rejects.jsonl")[0]
    assert reject["id"] == "echo401" and "Incorrect API key provided: ***" in reject["reason"]


def test_missing_key_warns_once_and_sends_no_authorization(tmp_path, capsys):
    with FakeOpenAIServer() as srv:
        summary = run_synth_api(make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", numbered(3))))
        assert all("Authorization" not in r["headers"] for r in srv.requests)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "$OPENAI_API_KEY is not set" in warnings[0]
    assert summary["ok"] == 3


# -------------------------------------------------------------------------------------------------- cli


def test_cli_end_to_end(tmp_path, capsys):
    inp = write_questions(tmp_path / "q.jsonl", numbered(6))
    out = tmp_path / "out"
    with FakeOpenAIServer(by_count={2: "429", 4: "not_json"}) as srv:
        rc = cli_main(
            [
                "synth",
                "api",
                "--input",
                str(inp),
                "--out",
                str(out),
                "--base-url",
                srv.base_url,
                "--model",
                "fake-model",
                "--concurrency",
                "2",
                "--max-retries",
                "2",
                "api.backoff_s=0.01",
                "api.temperature=0.2",
                "api.max_tokens=512",
            ]
        )
        body = srv.requests[0]["body"]
    assert rc == 0
    assert body["model"] == "fake-model" and body["temperature"] == 0.2 and body["max_tokens"] == 512
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "认知行为疗法" in body["messages"][0]["content"]
    stdout = capsys.readouterr().out
    assert "synth api: fake-model (v2)" in stdout and "| ok" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["retried"], summary["rejected"]) == (6, 2, 0)
    assert len(read_jsonl(out / "records.jsonl")) == 6


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--model", ""], "api.model is empty"),
        (["--input", "/nonexistent/psyqa.json"], "api.input: input '/nonexistent/psyqa.json' matches no file"),
        (["--base-url", "ftp://example.com/v1"], "api.base_url 'ftp://example.com/v1' is not an http(s) URL"),
        (["--base-url", "localhost:8000"], "is not an http(s) URL"),
        (["--api-key-env", "sk-live-abc123"], "api.api_key_env must be the NAME"),
        (["api.prompt_version=v9"], "unknown prompt version 'v9'"),
    ],
)
def test_bad_config_fails_early_with_one_line(tmp_path, capsys, args, expect):
    inp = write_questions(tmp_path / "q.jsonl", numbered(1))
    base = {"--input": str(inp), "--model": "m", "--base-url": "http://127.0.0.1:9/v1", "--out": str(tmp_path / "o")}
    argv = ["synth", "api"]
    for flag, value in base.items():
        if flag not in args:
            argv += [flag, value]
    rc = cli_main(argv + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expect in err
    assert "sk-live-abc123" not in err
    assert not (tmp_path / "o").exists()  # nothing was written before the check


def test_psyqa_sample_end_to_end(tmp_path):
    if not PSYQA_SAMPLE.is_file():
        pytest.skip(f"PsyQA sample not found at {PSYQA_SAMPLE} (not shipped: it needs the PsyQA user agreement)")
    raw = json.loads(PSYQA_SAMPLE.read_text(encoding="utf-8"))
    faults = {3: "429", 10: "500", 17: "malformed_body", 25: "not_json", 40: "503", 41: "empty_part"}
    with FakeOpenAIServer(by_count=faults) as srv:
        summary = run_synth_api(make_cfg(tmp_path, srv, PSYQA_SAMPLE, concurrency=8))
        assert summary["prompt_tokens"] == srv.usage_sent["prompt_tokens"]
    assert (summary["total"], summary["ok"], summary["rejected"], summary["input_rejected"]) == (100, 100, 0, 0)
    assert summary["retried"] == len(faults) and summary["requests"] == 100 + len(faults)
    recs = read_jsonl(tmp_path / "out" / "records.jsonl")
    assert len(recs) == 100
    assert {r["id"] for r in recs} == {f"psyqa-{e['questionID']}" for e in raw}
    assert all(validate_record(r)[1] is None for r in recs)
    crisis = [r for r in recs if r["meta"]["crisis"]]
    assert len(crisis) == 6  # the sample has six questions that mention suicide or self-harm
    assert all(r["meta"]["crisis_support_added"] and has_crisis_support(r["answer"]) for r in crisis)


# ------------------------------------------------------------------------------------------- unit parts


def test_parse_reply_variants():
    good = {
        "empathy": "理解你",
        "key_thought": "想法",
        "challenge": "反思",
        "strategy": "方法",
        "encouragement": "加油,可以寻求专业帮助",
        "distortions": ["labeling", "bogus", "labeling"],
    }
    text = json.dumps(good, ensure_ascii=False)
    cbt, known, unknown = parse_reply("```json\n" + text + "\n```")
    assert cbt["empathy"] == "理解你" and known == ["labeling"] and unknown == ["bogus"]
    assert parse_reply("好的:\n" + text + "\n以上。")[0] == cbt
    for bad, reason in [
        ("", "empty"),
        ("就是一句话", "not JSON"),
        ("[1, 2]", "not an object"),
        (json.dumps({**good, "challenge": 3}), "not a string"),
        (json.dumps({k: v for k, v in good.items() if k != "strategy"}), "lacks part(s): strategy"),
        (json.dumps({**good, "empathy": "OK"}), "no Chinese"),
    ]:
        with pytest.raises(ReplyError, match=re.escape(reason)):
            parse_reply(bad)


def test_backoff_is_exponential_with_jitter_and_honours_retry_after():
    rng = random.Random(0)
    for attempt in range(6):
        step = min(10.0, 0.5 * 2**attempt)
        d = backoff_delay(attempt, 0.5, 10.0, None, rng)
        assert step / 2 <= d <= step
    assert backoff_delay(3, 0.5, 10.0, 0.0, rng) == 0.0
    assert backoff_delay(0, 0.5, 10.0, 7.0, rng) == 7.0
    assert backoff_delay(0, 0.5, 10.0, 3600.0, rng) == 10.0  # capped
    assert _parse_retry_after("2") == 2.0 and _parse_retry_after("soon") is None
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
