"""`cbt-llm synth api --agents` against the local fake server (tests/fixtures/fake_openai_server.py): its critic_climb
critic scores the cbt rubric 6, 11, 15, 18 as the drafts are revised, critic_junk replies with no JSON."""

from __future__ import annotations

import hashlib
import json

import pytest
from test_synth_api import CRISIS_INSTRUCTION_MARK, make_cfg, numbered, read_jsonl, write_questions  # noqa: E402

from cbt_llm.cli import main as cli_main  # noqa: E402
from cbt_llm.core.config import ApiSynthConfig, load_config  # noqa: E402
from cbt_llm.core.errors import ConfigError  # noqa: E402
from cbt_llm.domain.crisis import has_crisis_support  # noqa: E402
from cbt_llm.domain.prompts import REVISE_PROMPTS, build_revise_messages  # noqa: E402
from cbt_llm.domain.record import validate_record  # noqa: E402
from cbt_llm.domain.rubrics import RUBRICS, RubricCritic  # noqa: E402
from data_pipeline.synth.agents import AgentLoop, _Round, critic_endpoint, run_synth_api_agents  # noqa: E402
from data_pipeline.synth.api import run_synth_api  # noqa: E402
from data_pipeline.synth.client import Endpoint  # noqa: E402
from tests.fixtures.fake_openai_server import REVISION_MARK, FakeOpenAIServer  # noqa: E402

CRITIC = RubricCritic(RUBRICS["cbt"])
CLIMB = [6, 11, 15, 18]  # critic_climb's totals after 0, 1, 2, 3 revisions
# revise-v1 is frozen once records carry it (meta.agents.revise_prompt): new wording is a new version
FROZEN_REVISE_V1 = "46d01ba37779c29e"
# critic_climb's per-criterion scores after two revisions (lowest + 3, capped at each criterion's highest)
AFTER_TWO = {"empathy": 2, "key_thought": 3, "challenge": 3, "strategy": 3, "encouragement": 1, "relevance": 3}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def agents_cfg(tmp_path, srv, questions, threshold=15.0, max_rounds=3, **kw):
    cfg = make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", questions), **kw)
    cfg.agents = cfg.agents.model_copy(update={"enabled": True, "threshold": threshold, "max_rounds": max_rounds})
    return cfg


def revise_requests(srv: FakeOpenAIServer, needle: str) -> list[dict]:
    return [r for r in srv.requests_for(needle) if any(m["role"] == "assistant" for m in r["body"]["messages"])]


def weak_keys(feedback: str) -> set[str]:
    return {k for k in AFTER_TWO if f'- "{k}"' in feedback or f"整体({k})" in feedback}


def test_rounds_stop_at_the_threshold_and_meta_keeps_every_round(tmp_path):
    qs = numbered(2) + [("crisis", "危机:我最近总想自杀,觉得活着没有意义。")]
    with FakeOpenAIServer(critic="critic_climb") as srv:
        summary = run_synth_api_agents(agents_cfg(tmp_path, srv, qs), CRITIC)
        crisis_revisions = revise_requests(srv, "危机:")
        q0 = [r for r in srv.requests_for("第0号问题") if not srv.is_critic(r)]
        critic_q0 = [r for r in srv.requests if srv.is_critic(r) and "第0号问题" in r["user"]]
    records = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "records.jsonl")}
    assert set(records) == {"q000", "q001", "crisis"} and summary["rejected"] == 0
    for r in records.values():
        assert validate_record(r)[1] is None
        a = r["meta"]["agents"]
        assert (a["rounds"], a["scores"], a["kept"], a["stopped"]) == (3, CLIMB[:3], 3, "threshold")
        assert a["criteria"] == AFTER_TWO and a["requests"] == 6  # draft, 3 critiques, 2 revisions
        assert (a["rubric"], a["critic"], a["revise_prompt"]) == ("cbt-v1", "fake-model", "revise-v1")
        assert r["meta"]["judge"] == {"total": 15, "rubric": "cbt-v1", "model": "fake-model"}
        assert r["answer"].count(REVISION_MARK) == 2  # the kept draft is the second revision
    assert has_crisis_support(records["crisis"]["answer"])
    # each revision carries the draft it revises and feedback naming the criteria below their maxima
    first, second = q0[1]["body"]["messages"], q0[2]["body"]["messages"]
    assert first[2]["role"] == "assistant" and json.loads(first[2]["content"])["strategy"].count(REVISION_MARK) == 0
    assert json.loads(second[2]["content"])["strategy"].count(REVISION_MARK) == 1
    assert weak_keys(first[3]["content"]) == set(AFTER_TWO) - {"encouragement"}  # 1/1 is full marks
    assert weak_keys(second[3]["content"]) == {"key_thought", "challenge", "strategy", "relevance"}
    assert (
        '- "key_thought"(识别关键思维或信念):1/4 分' in first[3]["content"]
        and "6 分(满分 18 分)" in first[3]["content"]
    )
    assert all(CRISIS_INSTRUCTION_MARK in r["body"]["messages"][-1]["content"] for r in crisis_revisions)
    # the critic is asked as `cbt-llm eval`'s judge asks: greedy, the question's title and the answer scored
    assert all(r["body"]["temperature"] == 0.0 for r in critic_q0)
    assert records["q000"]["answer"] in critic_q0[-1]["user"]
    ag = summary["agents"]
    assert ag["stopped"] == {"threshold": 3, "max_rounds": 0, "critic_failed": 0, "revise_failed": 0}
    assert (ag["rounds"], ag["mean_first_total"], ag["mean_final_total"]) == ({"3": 3}, 6, 15)
    assert ag["requests_per_record"] == 6 and summary["requests"] == 18
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["agents"] == ag


@pytest.mark.parametrize(("max_rounds", "scores", "requests"), [(1, [6], 2), (3, [6, 11, 15], 6)])
def test_rounds_stop_at_max_rounds(tmp_path, max_rounds, scores, requests):
    with FakeOpenAIServer(critic="critic_climb") as srv:
        summary = run_synth_api_agents(agents_cfg(tmp_path, srv, numbered(2), 18, max_rounds), CRITIC)
        # the last round that misses the threshold is not followed by a revision nobody would score
        assert len(srv.requests) == 2 * requests
    for r in read_jsonl(tmp_path / "out" / "records.jsonl"):
        a = r["meta"]["agents"]
        assert (a["rounds"], a["scores"], a["stopped"], a["requests"]) == (max_rounds, scores, "max_rounds", requests)
        assert r["meta"]["judge"]["total"] == scores[-1]
    assert summary["agents"]["stopped"]["max_rounds"] == 2


def test_the_best_round_is_kept_when_a_revision_scores_lower():
    loop = AgentLoop(ApiSynthConfig(), CRITIC, Endpoint("http://127.0.0.1:1/v1/chat/completions", "m", None, "K"))
    rounds = [_Round({"meta": {}, "n": i}, {"empathy": t}, t) for i, t in enumerate([9, 12, 10, 12])]
    record = loop._finish(rounds, "max_rounds", 8)
    assert record["n"] == 3 and record["meta"]["agents"]["kept"] == 4  # the later of the two 12s
    assert record["meta"]["judge"]["total"] == 12 and record["meta"]["agents"]["scores"] == [9, 12, 10, 12]


def test_critic_and_revision_failures_then_a_rerun_asks_only_the_rejected(tmp_path):
    qs = [("junk", "垃圾:我总担心考试。"), ("late", "迟坏:我和室友闹矛盾。"), ("http", "五百:我睡不着。")]
    qs += [("revise", "改坏:我害怕开会发言。"), ("fine", "正常:我工作压力大。")]
    critic_plan = {
        "垃圾:": "always:critic_junk",
        "迟坏:": ["critic_climb", "critic_junk", "critic_junk"],
        "五百:": "always:500",
    }
    plan = {"改坏:": ["good", "not_json", "not_json", "not_json"]}
    with FakeOpenAIServer(critic="critic_climb", critic_plan=critic_plan, plan=plan) as srv:
        summary = run_synth_api_agents(agents_cfg(tmp_path, srv, qs, max_retries=2), CRITIC)
        junk_critic = [r for r in srv.requests_for("垃圾:") if srv.is_critic(r)]
    out = tmp_path / "out"
    rejects = {r["id"]: r for r in read_jsonl(out / "rejects.jsonl")}
    assert set(rejects) == {"junk", "http"}
    assert rejects["junk"]["stage"] == "critic" and rejects["junk"]["attempts"] == 2 == len(junk_critic)
    assert "critic reply unusable: not JSON" in rejects["junk"]["reason"]
    assert rejects["http"]["stage"] == "critic" and "HTTP 500" in rejects["http"]["reason"]
    assert rejects["http"]["attempts"] == 3  # max_retries 2
    records = {r["id"]: r["meta"]["agents"] for r in read_jsonl(out / "records.jsonl")}
    assert (records["late"]["stopped"], records["late"]["scores"]) == ("critic_failed", [6])
    assert records["late"]["error"].startswith("critic, round 2: critic reply unusable")
    assert (records["revise"]["stopped"], records["revise"]["scores"]) == ("revise_failed", [6])
    assert records["revise"]["error"].startswith("revision 1: reply content is not JSON")
    assert records["revise"]["requests"] == 5  # draft, critique, 3 failed revisions
    assert records["fine"]["stopped"] == "threshold"
    ag = summary["agents"]
    assert (ag["critic_failures"], ag["revise_failures"], summary["rejected"]) == (3, 1, 2)
    assert summary["errors"]["critic_invalid"] == 4  # every unusable critic reply: two each for junk and late

    with FakeOpenAIServer(critic="critic_climb") as srv:
        rerun = run_synth_api_agents(agents_cfg(tmp_path, srv, qs), CRITIC)
        asked = {q for q in ("垃圾:", "迟坏:", "五百:", "改坏:", "正常:") if srv.requests_for(q)}
    assert asked == {"垃圾:", "五百:"} and (rerun["skipped"], rerun["ok"], rerun["rejected"]) == (3, 2, 0)
    assert len(read_jsonl(out / "records.jsonl")) == 5


def test_separate_critic_endpoint_keys_never_reach_outputs(tmp_path, monkeypatch, capsys):
    draft_key, critic_key = "sk-draft-DISTINCT-1a2b3c", "sk-critic-DISTINCT-4d5e6f"
    monkeypatch.setenv("DRAFT_KEY", draft_key)
    monkeypatch.setenv("CRITIC_KEY", critic_key)
    qs = numbered(2) + [("echo", "回显:我和家人关系紧张。")]
    inp, out = write_questions(tmp_path / "q.jsonl", qs), tmp_path / "out"
    drafter = FakeOpenAIServer(expected_key=draft_key)
    # concurrency 1: the critic's 401 that quotes its key comes after a success, so it rejects one question
    with drafter, FakeOpenAIServer(critic="critic_climb", critic_plan={"回显:": ["401"]}) as critic:
        args = ["synth", "api", "--agents", "--input", str(inp), "--out", str(out), "--base-url", drafter.base_url]
        args += ["--model", "drafter-m", "--api-key-env", "DRAFT_KEY", "--concurrency", "1", "api.backoff_s=0.01"]
        args += [f"api.agents.critic_base_url={critic.base_url}", "api.agents.critic_api_key_env=CRITIC_KEY"]
        args += ["api.agents.critic_model=judge-m", "api.agents.threshold=11"]
        rc = cli_main(args)
        assert cli_main([*args, "--dry-run"]) == 0
        assert drafter.requests and all(
            r["headers"]["Authorization"] == f"Bearer {draft_key}" for r in drafter.requests
        )
        assert all(r["headers"]["Authorization"] == f"Bearer {critic_key}" for r in critic.requests)
        assert {r["body"]["model"] for r in critic.requests} == {"judge-m"}
        assert all(critic.is_critic(r) for r in critic.requests) and not any(map(critic.is_critic, drafter.requests))
    captured = capsys.readouterr()
    assert rc == 0
    for p in [p for p in out.rglob("*") if p.is_file()]:
        assert draft_key not in p.read_text(encoding="utf-8") and critic_key not in p.read_text(encoding="utf-8")
    for text in (captured.out, captured.err):
        assert draft_key not in text and critic_key not in text
    reject = read_jsonl(out / "rejects.jsonl")[0]
    assert reject["id"] == "echo" and "Incorrect API key provided: ***" in reject["reason"]
    records = read_jsonl(out / "records.jsonl")
    assert [r["meta"]["judge"]["model"] for r in records] == ["judge-m", "judge-m"]
    assert [r["meta"]["agents"]["scores"] for r in records] == [[6, 11], [6, 11]]


def test_a_critic_refusing_its_first_requests_stops_the_run_naming_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CRITIC_KEY", "sk-wrong")
    with FakeOpenAIServer() as drafter, FakeOpenAIServer(critic="critic_climb", expected_key="sk-right") as critic:
        cfg = agents_cfg(tmp_path, drafter, numbered(3))
        cfg.agents = cfg.agents.model_copy(
            update={"critic_base_url": critic.base_url, "critic_api_key_env": "CRITIC_KEY"}
        )
        with pytest.raises(ConfigError, match=r"refused the request with HTTP 401.*api\.agents\.critic_api_key_env"):
            run_synth_api_agents(cfg, CRITIC)
    assert read_jsonl(tmp_path / "out" / "records.jsonl") == []


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["api.agents.threshold=19"], "api.agents.threshold: 19 is outside the cbt-v1 rubric's total 0-18"),
        (["api.agents.threshold=0"], "api.agents.threshold: 0 is outside"),
        (["--sessions"], "api.agents.enabled: the critic scores single answers, not sessions"),
        (["api.agents.revise_prompt_version=revise-v9"], "api.agents.revise_prompt_version: unknown version"),
        (["api.agents.critic_api_key_env=sk-live-123"], "api.agents.critic_api_key_env must be the NAME"),
    ],
)
def test_bad_agents_config_fails_early_with_one_line(tmp_path, capsys, extra, expect):
    inp = write_questions(tmp_path / "q.jsonl", numbered(1))
    rc = cli_main(
        ["synth", "api", "--agents", "--input", str(inp), "--out", str(tmp_path / "o"), "--model", "m", *extra]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expect in err and len(err.splitlines()) == 1


def test_one_folder_holds_one_kind_of_record(tmp_path):
    with FakeOpenAIServer(critic="critic_climb") as srv:
        run_synth_api(make_cfg(tmp_path, srv, write_questions(tmp_path / "q.jsonl", numbered(1))))
        with pytest.raises(ConfigError, match="holds records made without api.agents"):
            run_synth_api_agents(agents_cfg(tmp_path, srv, numbered(1)), CRITIC)
        plain = make_cfg(tmp_path, srv, tmp_path / "q.jsonl", out_dir=str(tmp_path / "agents"))
        agents = plain.model_copy(update={"agents": plain.agents.model_copy(update={"enabled": True})})
        run_synth_api_agents(agents, CRITIC)
        with pytest.raises(ConfigError, match="holds records made with api.agents"):
            run_synth_api(plain)
        with pytest.raises(ConfigError, match="api.agents.enabled: the agents loop runs from"):
            run_synth_api(agents.model_copy(update={"out_dir": str(tmp_path / "new")}))
    assert load_config(None, ["api.agents.enabled=true"]).api.out_dir.endswith("/corpus-api-agents")


def test_revise_prompt_is_frozen_and_keeps_the_crisis_instruction():
    p = REVISE_PROMPTS["revise-v1"]
    digest = hashlib.sha256((p.feedback_template + p.weak_line).encode()).hexdigest()[:16]
    assert digest == FROZEN_REVISE_V1
    weak = [("strategy", 1, 4, "是否给出具体可行的方法"), ("relevance", 2, 4, "是否紧扣处境")]
    draft = {"empathy": "我理解你。", "distortions": []}
    msgs = build_revise_messages("我想自杀", "", [], crisis=True, draft=draft, weak=weak, total=9, maximum=18)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert json.loads(msgs[2]["content"]) == draft
    assert '- "strategy"(提供策略或见解):1/4 分。评分标准:是否给出具体可行的方法' in msgs[3]["content"]
    assert "- 整体(relevance):2/4 分" in msgs[3]["content"] and CRISIS_INSTRUCTION_MARK in msgs[3]["content"]
    calm = build_revise_messages("我很焦虑", "", [], crisis=False, draft=draft, weak=weak, total=9, maximum=18)
    assert CRISIS_INSTRUCTION_MARK not in calm[3]["content"]


def test_shared_endpoint_critic_uses_the_drafter_key_without_a_second_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-shared")
    with FakeOpenAIServer() as srv:
        cfg = agents_cfg(tmp_path, srv, numbered(1))
    ep = critic_endpoint(cfg)
    assert (ep.key, ep.model, ep.url) == ("sk-shared", "fake-model", cfg.base_url + "/chat/completions")
    assert capsys.readouterr().err == ""
