"""`cbt-llm synth api --sessions` against the local fake server's counsellor and client simulators
(tests/fixtures/fake_openai_server.py): the dialogue, its end, retries, validation and rejects, resume after a kill,
crisis handling and keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cbt_llm.cli import main as cli_main  # noqa: E402
from cbt_llm.core.config import ApiSynthConfig  # noqa: E402
from cbt_llm.core.errors import ConfigError  # noqa: E402
from cbt_llm.domain.crisis import CRISIS_SUPPORT_SENTENCE  # noqa: E402
from cbt_llm.domain.prompts import (
    CLIENT_CRISIS,
    COUNSELLOR_PROMPT,
    END_MARKER,
    KICKOFF,
    SESSION_SYSTEM_PROMPT,  # noqa: E402
    client_prompt,
)
from data_pipeline.synth.api_sessions import run_synth_api_sessions, validate_session
from data_pipeline.synth.sessions import intake_at  # noqa: E402
from tests.fixtures.fake_openai_server import FakeOpenAIServer, client_turn, counsellor_turn  # noqa: E402
from tests.fixtures.paths import ROOT

TURNS = 9  # the fake counsellor closes its 5th turn: 5 counsellor + 4 client turns


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def make_cfg(tmp_path: Path, srv: FakeOpenAIServer, **kw) -> ApiSynthConfig:
    base = dict(
        sessions=True,
        out_dir=str(tmp_path / "out"),
        base_url=srv.base_url,
        model="fake-counsellor",
        num_sessions=4,
        seed=7,
        concurrency=2,
        timeout_s=30.0,
        max_retries=3,
        backoff_s=0.01,
        max_backoff_s=0.05,
    )
    base.update(kw)
    return ApiSynthConfig(**base)


def write_questions(path: Path, questions: list[tuple[str, str]]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": i, "question": q, "description": "", "keywords": "情绪"}, ensure_ascii=False) + "\n"
            for i, q in questions
        ),
        encoding="utf-8",
    )
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def expected_turns(n_counsellor: int, closes: bool) -> list[dict]:
    """The fake simulators' session: counsellor first, the end marker stripped from a closing turn."""
    out = []
    for k in range(1, n_counsellor + 1):
        text = counsellor_turn(k, closes and k == n_counsellor).replace(END_MARKER, "")
        out.append({"role": "assistant", "content": text})
        if k < n_counsellor:
            out.append({"role": "user", "content": client_turn(k)})
    return out


# ------------------------------------------------------------------------------------------- the dialogue


def test_two_endpoints_talk_until_the_end_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("CBT_CLIENT_KEY", "sk-client-1")
    with (
        FakeOpenAIServer(default="counsellor") as counsellor,
        FakeOpenAIServer(default="client", expected_key="sk-client-1") as client,
    ):
        cfg = make_cfg(
            tmp_path,
            counsellor,
            client_base_url=client.base_url,
            client_model="fake-client",
            client_api_key_env="CBT_CLIENT_KEY",
        )
        summary = run_synth_api_sessions(cfg)
        c_reqs, u_reqs = counsellor.requests, client.requests
    assert (summary["total"], summary["ok"], summary["rejected"], summary["retried"]) == (4, 4, 0, 0)
    assert summary["ended"] == {"end_marker": 4, "max_turns": 0} and summary["mean_turns"] == TURNS
    # each endpoint plays only its own part, under its own model name, and sees the dialogue from its side
    assert len(c_reqs) == 4 * 5 and len(u_reqs) == 4 * 4
    assert {r["body"]["model"] for r in c_reqs} == {"fake-counsellor"}
    assert {r["body"]["model"] for r in u_reqs} == {"fake-client"}
    assert all(r["system"] == COUNSELLOR_PROMPT and r["user"] == KICKOFF for r in c_reqs)
    assert all("Authorization" not in r["headers"] for r in c_reqs)
    first_client = next(r for r in u_reqs if len(r["body"]["messages"]) == 2)["body"]["messages"]
    assert first_client[1] == {"role": "user", "content": counsellor_turn(1, False)}

    records = read_jsonl(tmp_path / "out" / "records.jsonl")
    assert sorted(r["id"] for r in records) == [f"api-session-7-{i:06d}" for i in range(4)]
    for r in records:
        index = int(r["id"].rsplit("-", 1)[1])
        intake, who = intake_at(7, index, cfg.crisis_fraction)
        assert r["messages"] == [{"role": "system", "content": SESSION_SYSTEM_PROMPT}, *expected_turns(5, closes=True)]
        assert END_MARKER not in json.dumps(r, ensure_ascii=False)
        meta = r["meta"]
        assert meta["intake"] == intake and meta["seed"] == 7
        assert (meta["turns"], meta["ended"], meta["source"], meta["requests"]) == (TURNS, "end_marker", "api", TURNS)
        assert meta["models"] == {"counsellor": "fake-counsellor", "client": "fake-client"}
        assert validate_session(r, cfg.min_turns, cfg.max_turns) is None
        # the client simulator was built from this session's intake
        assert any(q["system"] == client_prompt(intake, who) for q in u_reqs)
        assert intake["presenting_problem"] in client_prompt(intake, who)


@pytest.mark.parametrize("max_turns", [7, 8])
def test_turn_limit_ends_on_a_counsellor_turn(tmp_path, max_turns):
    with FakeOpenAIServer(default="session", session_turns=100) as srv:
        summary = run_synth_api_sessions(make_cfg(tmp_path, srv, num_sessions=3, min_turns=6, max_turns=max_turns))
        assert len(srv.requests) == 3 * 7
    assert (summary["ok"], summary["ended"]) == (3, {"end_marker": 0, "max_turns": 3})
    for r in read_jsonl(tmp_path / "out" / "records.jsonl"):
        # an even limit leaves no room for a client turn that the counsellor could still answer
        assert r["messages"][1:] == expected_turns(4, closes=False)
        assert (r["meta"]["turns"], r["meta"]["ended"]) == (7, "max_turns")


def test_http_faults_and_slow_replies_are_retried(tmp_path):
    faults = {2: "429", 5: "500", 7: "503", 11: "slow"}
    with FakeOpenAIServer(default="session", by_count=faults, slow_s=2.0) as srv:
        summary = run_synth_api_sessions(make_cfg(tmp_path, srv, num_sessions=3, timeout_s=0.5))
        assert [srv.requests[n - 1]["fault"] for n in faults] == list(faults.values())
    assert (summary["ok"], summary["rejected"], summary["retried"]) == (3, 0, 4)
    assert summary["errors"] == {"http_429": 1, "http_500": 1, "http_503": 1, "timeout": 1}
    assert summary["requests"] == 3 * TURNS + 4
    records = read_jsonl(tmp_path / "out" / "records.jsonl")
    assert [r["messages"][1:] for r in records] == [expected_turns(5, closes=True)] * 3
    assert sum(r["meta"]["requests"] for r in records) == 3 * TURNS + 4


# ----------------------------------------------------------------------------------- validation, rejects


def test_leaking_client_is_rejected_with_its_reason(tmp_path):
    qs = [
        ("ok1", "正常一:我最近总是很焦虑。"),
        ("leak", "泄露:我和室友相处不好。"),
        ("english", "英文:我睡不着觉。"),
        ("once", "偶尔:我害怕考试。"),
        ("ok2", "正常二:我不想上班。"),
    ]
    plan = {"泄露:": "always:client_leak", "英文:": "always:client_english", "偶尔:": ["client_leak"]}
    with FakeOpenAIServer(default="session", system_plan=plan) as srv:
        cfg = make_cfg(tmp_path, srv, input=str(write_questions(tmp_path / "q.jsonl", qs)), max_retries=2)
        summary = run_synth_api_sessions(cfg)
        # the leaking client was asked its first turn three times (two retries), then the session stopped
        assert [r["fault"] for r in srv.requests if "泄露:" in r["system"]] == ["client_leak"] * 3
    assert (summary["ok"], summary["rejected"], summary["retried"]) == (3, 2, 5)
    assert summary["errors"] == {"invalid_turn": 3 + 3 + 1}  # every attempt that failed, first ones included
    rejects = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    assert set(rejects) == {"session-leak", "session-english"}
    leak = rejects["session-leak"]
    assert leak["stage"] == "api" and leak["errors"] == ["invalid_turn"] * 3
    assert leak["reason"] == (
        "client turn 2: client turn 2 writes the counsellor's part ('咨询师：') (gave up after 3 attempts)"
    )
    assert "is not Chinese (0 Chinese characters" in rejects["session-english"]["reason"]
    records = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "records.jsonl")}
    assert set(records) == {"session-ok1", "session-once", "session-ok2"}
    # one leak, asked again, and the session went on whole
    assert records["session-once"]["messages"][1:] == expected_turns(5, closes=True)
    assert records["session-once"]["meta"]["intake"]["presenting_problem"] == "偶尔:我害怕考试。"


def _session(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": "system", "content": "系统"}, *({"role": r, "content": c} for r, c in turns)]}


def test_validate_session_names_each_problem():
    a, u = "assistant", "user"
    good = [(a, "你好，今天想谈点什么？"), (u, "我最近睡不好。"), (a, "我们一起看看，下次见。")]
    assert validate_session(_session(*good), 3, 9) is None
    cases = [
        (good[:2], 2, "ends on client turn 2 (left unanswered)"),
        (good, 5, "has 3 turns, outside api.min_turns..api.max_turns (5..9)"),
        ([good[1], good[0], good[2]], 3, "turn 1 is 'user' where 'assistant' belongs"),
        ([good[0], (u, "   "), good[2]], 3, "client turn 2 is empty"),
        ([good[0], (u, "I cannot sleep well at night."), good[2]], 3, "client turn 2 is not Chinese"),
        (
            [(a, "你好。\n来访者：我很难过。"), good[1], good[2]],
            3,
            "counsellor turn 1 writes the client's part ('来访者：')",
        ),
        ([good[0], (u, "作为你的咨询师，我建议你早点睡。"), good[2]], 3, "client turn 2 speaks as the counsellor"),
        ([good[0], (u, "我想过自杀。"), good[2]], 3, "client turn 2 discloses a crisis and the counsellor's next"),
        ([good[0], good[1], (a, "别去看医生，没用的。")], 3, "counsellor turn 3 is unsafe (secrecy_discourages_help)"),
    ]
    for turns, min_turns, reason in cases:
        assert reason in (validate_session(_session(*turns), min_turns, 9) or ""), reason
    answered = [good[0], (u, "我想过自杀。"), (a, "谢谢你告诉我。" + CRISIS_SUPPORT_SENTENCE)]
    assert validate_session(_session(*answered), 3, 9) is None
    # talking about the other part is not speaking as it
    about = [(a, "作为来访者，你可以随时叫停。"), (u, "作为咨询师你应该懂我吧？"), good[2]]
    assert validate_session(_session(*about), 3, 9) is None


def test_crisis_disclosure_is_answered_with_support(tmp_path):
    qs = [("c", "危机:压力太大，我觉得不想活了。"), ("calm", "平静:我想学会时间管理。")]
    with FakeOpenAIServer(default="session", system_plan={"危机:": ["client_crisis"]}) as srv:
        summary = run_synth_api_sessions(make_cfg(tmp_path, srv, input=str(write_questions(tmp_path / "q.jsonl", qs))))
        crisis_systems = {r["system"] for r in srv.requests if "危机:" in r["system"]}
        calm_systems = {r["system"] for r in srv.requests if "平静:" in r["system"]}
    assert summary["ok"] == 2
    # a crisis intake asks the client simulator to disclose; a calm one does not
    assert all(CLIENT_CRISIS in s for s in crisis_systems) and not any(CLIENT_CRISIS in s for s in calm_systems)
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "records.jsonl")}
    crisis, calm = recs["session-c"], recs["session-calm"]
    assert crisis["messages"][2]["content"].endswith("我想过自杀。")
    # the fake counsellor ignored the disclosure: its next turn got the support sentence, and the session went on
    assert crisis["messages"][3]["content"] == counsellor_turn(2, False) + CRISIS_SUPPORT_SENTENCE
    assert crisis["meta"]["crisis"] is True
    assert (crisis["meta"]["crisis_turns"], crisis["meta"]["crisis_support_added"]) == ([2], [3])
    assert (calm["meta"]["crisis"], calm["meta"]["crisis_support_added"]) == (False, [])
    assert CRISIS_SUPPORT_SENTENCE not in json.dumps(calm, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------- resume


def test_kill_mid_run_then_rerun_writes_each_session_once(tmp_path):
    n = 10
    out = tmp_path / "out"
    records = out / "records.jsonl"
    with FakeOpenAIServer(default="session", delay_s=0.03) as srv:
        argv = [sys.executable, "-m", "cbt_llm.cli", "synth", "api", "--sessions", "--out", str(out)]
        argv += ["--base-url", srv.base_url, "--model", "m", "--num-sessions", str(n), "--concurrency", "2"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (records.exists() and records.read_bytes().count(b"\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = len(srv.requests)
        done = set()
        for line in records.read_bytes().splitlines():
            try:
                done.add(json.loads(line)["id"])
            except ValueError:
                pass  # a line cut by the kill: that session is not done
        assert 3 <= len(done) < n
        summary = run_synth_api_sessions(make_cfg(tmp_path, srv, model="m", num_sessions=n, seed=0))
        rerun = srv.requests[killed_at:]
    ids = [r["id"] for r in read_jsonl(records)]
    assert sorted(ids) == [f"api-session-0-{i:06d}" for i in range(n)]  # each exactly once
    assert (summary["skipped"], summary["ok"]) == (len(done), n - len(done))
    # the rerun asked nothing for a finished session, and redid each unfinished one whole
    assert len(rerun) == (n - len(done)) * TURNS
    prompts = {client_prompt(*intake_at(0, i, 0.02)): f"api-session-0-{i:06d}" for i in range(n)}
    asked = {prompts[r["system"]] for r in rerun if r["system"] != COUNSELLOR_PROMPT}
    assert asked == set(ids) - done


# -------------------------------------------------------------------------------------------- keys, config


def test_keys_reach_no_output_file(tmp_path, monkeypatch, capsys):
    keys = {"CBT_C_KEY": "sk-counsellor-DISTINCT-11aa", "CBT_U_KEY": "sk-client-DISTINCT-22bb"}
    for k, v in keys.items():
        monkeypatch.setenv(k, v)
    qs = [("a", "甲:我很焦虑。"), ("b", "乙:我很孤独。"), ("echo", "回显:我和家人关系紧张。")]
    out = tmp_path / "out"
    # concurrency 1: the client's 401 that quotes its key comes after the endpoint's first success (no abort)
    with (
        FakeOpenAIServer(default="counsellor") as c_srv,
        FakeOpenAIServer(default="client", system_plan={"回显:": ["401"]}) as u_srv,
    ):
        rc = cli_main(
            ["synth", "api", "--sessions", "--input", str(write_questions(tmp_path / "q.jsonl", qs)), "--out", str(out)]
            + ["--base-url", c_srv.base_url, "--model", "c", "--api-key-env", "CBT_C_KEY", "--concurrency", "1"]
            + [f"api.client_base_url={u_srv.base_url}", "api.client_api_key_env=CBT_U_KEY", "api.backoff_s=0.01"]
        )
        assert {r["headers"]["Authorization"] for r in c_srv.requests} == {f"Bearer {keys['CBT_C_KEY']}"}
        assert {r["headers"]["Authorization"] for r in u_srv.requests} == {f"Bearer {keys['CBT_U_KEY']}"}
    captured = capsys.readouterr()
    assert rc == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"records.jsonl", "rejects.jsonl", "summary.json"}
    for p in files:
        text = p.read_text(encoding="utf-8")
        assert not any(v in text for v in keys.values()), p
    assert not any(v in captured.out + captured.err for v in keys.values())
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["rejected"]) == (2, 1)
    assert (summary["config"]["api_key_env"], summary["config"]["client_api_key_env"]) == ("CBT_C_KEY", "CBT_U_KEY")
    reject = read_jsonl(out / "rejects.jsonl")[0]
    assert reject["id"] == "session-echo" and "Incorrect API key provided: ***" in reject["reason"]


def test_client_endpoint_refusing_every_request_stops_once_naming_its_fields(tmp_path):
    with FakeOpenAIServer(default="counsellor") as c_srv, FakeOpenAIServer(expected_key="sk-x") as u_srv:
        cfg = make_cfg(tmp_path, c_srv, client_base_url=u_srv.base_url, concurrency=1)
        with pytest.raises(ConfigError, match=r"HTTP 401 .*check the key in \$OPENAI_API_KEY \(api.client_api_key_env"):
            run_synth_api_sessions(cfg)
        assert len(u_srv.requests) == 1
    assert (tmp_path / "out" / "records.jsonl").read_text() == ""


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--model", ""], "api.model is empty"),
        (["api.client_base_url=ftp://example.com/v1"], "api.client_base_url 'ftp://example.com/v1' is not an http(s)"),
        (["api.client_api_key_env=sk-live-abc123"], "api.client_api_key_env must be the NAME"),
        (["api.min_turns=10", "api.max_turns=10"], "api.min_turns (10) is more than the longest session"),
        (["api.max_turns=1"], "config field 'api.max_turns'"),
        (["--input", "/nonexistent/psyqa.json"], "api.input: input '/nonexistent/psyqa.json' matches no file"),
    ],
)
def test_bad_config_fails_early_with_one_line(tmp_path, capsys, args, expect):
    out = tmp_path / "o"
    argv = ["synth", "api", "--sessions", "--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--out", str(out)]
    rc = cli_main(argv + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expect in err, err
    assert "sk-live-abc123" not in err
    assert not out.exists()  # nothing was written before the check


def test_sessions_and_single_answers_never_share_a_records_file(tmp_path, capsys):
    from cbt_llm.core.config import load_config

    assert load_config(overrides=["api.sessions=true"]).api.out_dir.endswith("/corpus-api-sessions")
    assert load_config().api.out_dir.endswith("/corpus-api")
    single, sessions = tmp_path / "single", tmp_path / "sessions"
    for folder, line in ((single, '{"id": "q1", "question": "问题"}'), (sessions, '{"id": "s1", "messages": []}')):
        folder.mkdir()
        (folder / "records.jsonl").write_text(line + "\n", encoding="utf-8")
    questions = write_questions(tmp_path / "q.jsonl", [("q1", "问题:我很焦虑。")])
    base = ["--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--input", str(questions)]
    assert cli_main(["synth", "api", "--sessions", "--out", str(single), *base]) == 2
    assert cli_main(["synth", "api", "--out", str(sessions), *base]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "holds single-answer records from `synth api`; pass another --out for sessions" in err[0]
    assert "holds sessions from `synth api --sessions`; pass another --out" in err[1]
    assert [p.name for p in single.iterdir()] == [p.name for p in sessions.iterdir()] == ["records.jsonl"]
