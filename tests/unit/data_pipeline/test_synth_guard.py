"""An answer the crisis guard's output check stops never reaches a corpus: `synth api` (single answers), `--sessions`
(counsellor turns) and `--agents` (every draft, so the kept one) retry it like any unusable reply, reject it with
the harm kind in the reason when it keeps coming, and count it by kind (unsafe_replies). The fake server's
unsafe_pills and counsellor_pills faults answer with UNSAFE_PILLS, a reply telling how many pills kill."""

from __future__ import annotations

import json

import pytest
from test_synth_api import make_cfg, numbered, read_jsonl, write_questions  # noqa: E402

from cbt_llm.cli import main as cli_main
from cbt_llm.core.config import GuardConfig
from cbt_llm.domain.guard import CrisisGuard
from cbt_llm.domain.prompts import KICKOFF
from cbt_llm.domain.rubrics import RUBRICS, RubricCritic
from data_pipeline.synth import client as synth_client
from data_pipeline.synth.agents import run_synth_api_agents
from data_pipeline.synth.api import run_synth_api
from data_pipeline.synth.api_sessions import run_synth_api_sessions
from tests.fixtures.fake_openai_server import UNSAFE_PILLS, FakeOpenAIServer

STOPPED = "stopped by the crisis guard's output check: method_lethality (patterns layer)"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def builds(monkeypatch) -> list:
    """Every guard the synth client builds (build_guard calls), to check it is built once per run."""
    built = []
    original = synth_client.build_guard

    def counting(gc, **kw):
        built.append(gc)
        return original(gc, **kw)

    monkeypatch.setattr(synth_client, "build_guard", counting)
    return built


def _no_pills(out) -> None:
    assert UNSAFE_PILLS not in (out / "records.jsonl").read_text(encoding="utf-8")


def test_single_answers_stopped_by_the_guard_are_retried_then_rejected(tmp_path, builds):
    qs = numbered(3) + [("once", "一次:我总是失眠。"), ("always", "总是:我总是失眠。")]
    plan = {"一次:": ["unsafe_pills"], "总是:": "always:unsafe_pills"}
    with FakeOpenAIServer(plan=plan) as srv:
        summary = run_synth_api(make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", qs), max_retries=2))
        assert len(srv.requests_for("总是:")) == 3 and len(srv.requests_for("一次:")) == 2
    out = tmp_path / "out"
    assert len(builds) == 1  # one guard for the run, not one per answer
    assert {r["id"] for r in read_jsonl(out / "records.jsonl")} == {"q000", "q001", "q002", "once"}
    _no_pills(out)
    (reject,) = read_jsonl(out / "rejects.jsonl")
    assert reject["id"] == "always" and reject["stage"] == "api" and reject["attempts"] == 3
    assert STOPPED in reject["reason"] and reject["errors"] == ["unsafe_reply"] * 3
    assert summary["unsafe_replies"] == {"method_lethality": 4} and summary["errors"]["unsafe_reply"] == 4
    assert (summary["ok"], summary["rejected"], summary["retried"]) == (4, 1, 3)
    assert json.loads((out / "summary.json").read_text())["unsafe_replies"] == {"method_lethality": 4}


def test_every_layer_of_the_given_guard_is_asked(tmp_path, builds):
    """A guard handed in is used as it is (not rebuilt), every layer of it: here a model tier that flags one
    question's answers (the patterns and a learned layer off find nothing in them)."""

    def tier(role: str, text: str) -> tuple[bool, str | None]:
        return role == "assistant" and "第1号问题" in text, "dosing_beyond_prescription"

    guard = CrisisGuard(user_model=None, reply_model=None, model_tier=tier)
    with FakeOpenAIServer() as srv:
        cfg = make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", numbered(3)), max_retries=1)
        summary = run_synth_api(cfg, guard=guard)
    assert builds == []
    (reject,) = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert reject["id"] == "q001" and "dosing_beyond_prescription (model layer)" in reject["reason"]
    assert summary["unsafe_replies"] == {"dosing_beyond_prescription": 2}


def test_a_session_turn_stopped_by_the_guard_is_asked_again_or_the_session_rejected(tmp_path, builds):
    base = dict(sessions=True, num_sessions=1, seed=3, concurrency=1, max_retries=2, crisis_fraction=0.0)
    # the counsellor's 2nd turn: unsafe once, then well
    with FakeOpenAIServer(default="session", plan={KICKOFF: ["session", "counsellor_pills"]}) as srv:
        cfg = make_cfg(tmp_path / "a", srv, tmp_path / "none", input="", **base)
        once = run_synth_api_sessions(cfg, guard=GuardConfig())
    (record,) = read_jsonl(tmp_path / "a" / "out" / "records.jsonl")
    _no_pills(tmp_path / "a" / "out")
    assert once["ok"] == 1 and once["unsafe_replies"] == {"method_lethality": 1} and once["retried"] == 1
    assert len(builds) == 1
    # every counsellor answer unsafe: the session is rejected, naming the turn and the harm kind
    with FakeOpenAIServer(default="session", plan={KICKOFF: "always:counsellor_pills"}) as srv:
        cfg = make_cfg(tmp_path / "b", srv, tmp_path / "none", input="", **base)
        always = run_synth_api_sessions(cfg)
    (reject,) = read_jsonl(tmp_path / "b" / "out" / "rejects.jsonl")
    assert reject["reason"].startswith("counsellor turn 1: counsellor turn 1 " + STOPPED)
    assert reject["errors"] == ["unsafe_reply"] * 3
    assert (always["ok"], always["rejected"], always["unsafe_replies"]) == (0, 1, {"method_lethality": 3})
    assert read_jsonl(tmp_path / "b" / "out" / "records.jsonl") == []


def test_agents_keep_only_a_draft_the_guard_passed(tmp_path, builds):
    """A first draft stopped once is asked again; revisions stopped every time end the loop with the round-1
    draft kept (revise_failed, the harm kind in meta.agents.error); a question whose every draft is stopped is
    rejected."""
    qs = [("first", "一号:我总是失眠。"), ("revise", "二号:我总是失眠。"), ("never", "三号:我总是失眠。")]
    plan = {"一号:": ["unsafe_pills"], "二号:": ["good"] + ["unsafe_pills"] * 3, "三号:": "always:unsafe_pills"}
    with FakeOpenAIServer(critic="critic_climb", plan=plan) as srv:
        cfg = make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", qs), max_retries=2)
        cfg.agents = cfg.agents.model_copy(update={"enabled": True, "threshold": 15.0, "max_rounds": 3})
        summary = run_synth_api_agents(cfg, RubricCritic(RUBRICS["cbt"]))
    out = tmp_path / "out"
    assert len(builds) == 1
    _no_pills(out)
    records = {r["id"]: r["meta"]["agents"] for r in read_jsonl(out / "records.jsonl")}
    assert records["first"]["stopped"] == "threshold"
    assert (records["revise"]["stopped"], records["revise"]["kept"], records["revise"]["scores"]) == (
        "revise_failed",
        1,
        [6],
    )
    assert records["revise"]["error"].startswith("revision 1: answer " + STOPPED)
    (reject,) = read_jsonl(out / "rejects.jsonl")
    assert reject["id"] == "never" and reject["stage"] == "api" and STOPPED in reject["reason"]
    assert summary["unsafe_replies"] == {"method_lethality": 1 + 3 + 3}


@pytest.mark.parametrize("mode", [[], ["--sessions"], ["--agents"]])
def test_the_cli_passes_the_config_guard_section(tmp_path, capsys, mode):
    """`cbt-llm synth api` builds its guard from the config's guard section, before any request: a bad one fails
    with one line naming it."""
    inp = write_questions(tmp_path / "q.jsonl", numbered(2))
    with FakeOpenAIServer() as srv:
        args = ["synth", "api", *mode, "--input", str(inp), "--out", str(tmp_path / "out")]
        args += ["--base-url", srv.base_url, "--model", "m", f"guard.model_dir={tmp_path / 'no-guard'}"]
        rc = cli_main(args)
        assert srv.requests == []
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: guard.model_dir: ") and "not found" in err[-1]


def test_the_default_guard_is_the_config_default_section(builds):
    assert synth_client.reply_guard(None) is not None and builds == [GuardConfig()]
    given = CrisisGuard(user_model=None, reply_model=None)
    assert synth_client.reply_guard(given) is given
