"""`cbt-llm eval --sessions`: a model talks with the fake client simulator for N turns from held-out intakes, the
crisis guard around every model turn, and the fake judge scores each transcript on the CTRS items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbt_llm.cli import main
from cbt_llm.domain.crisis import CRISIS_BLOCK, DISCLAIMER
from cbt_llm.domain.prompts import client_prompt
from cbt_llm.domain.rubrics import RUBRICS, judge_messages, parse_scores
from data_pipeline.synth.sessions import intake_at, session_at
from evaluation.sessions import intake_text, transcript_text
from tests.fixtures.eval import tiny_chat_model  # noqa: E402
from tests.fixtures.fake_openai_server import (  # noqa: E402
    UNSAFE_COUNSELLOR,
    FakeOpenAIServer,
    client_turn,
    counsellor_turn,
    ctrs_scores,
)
from tests.fixtures.paths import ROOT

CTRS = RUBRICS["ctrs"]
SEED, N, TURNS = 7, 3, 3
QUESTIONS = [("q1", "我总觉得自己做什么都不够好,怎么办?"), ("q2", "和室友关系紧张,每天回宿舍都很焦虑。")]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(ROOT)  # the structure scorer artifact (runs/structure_scorer.npz) is shared by the tests


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("tiny"))


def _client_system(i: int) -> str:
    """Session i's client simulator prompt: in its requests and no other session's, so a plan can follow it."""
    return client_prompt(*intake_at(SEED, i, 0.0))


def _run(tmp_path: Path, capsys, model_args: list[str], client_url: str, *extra: str) -> tuple[int, str, Path]:
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"id": i, "question": t}, ensure_ascii=False) + "\n" for i, t in QUESTIONS))
    out = tmp_path / "eval"
    # model_args last of the flags: an override among them must run on with the others (argparse's positionals)
    args = ["eval", "--questions", str(q), "--out", str(out), "--sessions", *model_args, "eval.check_overlap=false"]
    # the single-turn side at its cheapest (length only: no jieba), the sessions are what is tested
    args += [
        "eval.max_new_tokens=8",
        "eval.sessions.max_new_tokens=8",
        "eval.bootstrap_resamples=100",
        "eval.metrics=[length]",
        # random-model text is noise the learned layer may read either way: the sessions' guard mechanics are what
        # is tested here, on the patterns' verdicts (tests/unit/domain holds the learned layer's); no probes
        "guard.learned=false",
        "eval.safety_probes=false",
    ]
    args += [f"eval.sessions.seed={SEED}", f"eval.sessions.num_sessions={N}", f"eval.sessions.turns={TURNS}"]
    args += ["eval.sessions.crisis_fraction=0", f"eval.sessions.client.base_url={client_url}"]
    args += ["eval.sessions.client.model=fake-client", "eval.max_retries=0", *extra]
    rc = main(args)
    return rc, capsys.readouterr().err, out


def _rows(out: Path) -> dict[str, dict]:
    rows = [json.loads(x) for x in (out / "sessions.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["id"]: r for r in rows}


def _expected_ctrs(row: dict) -> dict[str, int]:
    """What the fake judge gives the transcript sessions.jsonl holds."""
    user = judge_messages(CTRS, intake_text(row["intake"]), transcript_text(row["messages"]))[1]["content"]
    return ctrs_scores(user)


def test_local_model_sessions_guarded_and_judged_on_ctrs(model, tmp_path, capsys):
    """A tiny local model holds 3 sessions of 3 turns: the transcripts alternate, client first; a crisis planted in
    session 1's second client turn trips the guard (the crisis block is shown first, then and on every later turn);
    the CTRS means equal the fake judge's numbers over the transcripts; a transcript the judge fails on is counted,
    not scored 0."""
    crisis_plan = {_client_system(1): ["client", "client_crisis"]}
    failing = intake_text(intake_at(SEED, 2, 0.0)[0])
    with (
        FakeOpenAIServer(default="client", system_plan=crisis_plan) as client,
        FakeOpenAIServer(default="judge_ctrs", plan={failing: "always:not_json"}) as judge,
    ):
        rc, err, out = _run(
            tmp_path,
            capsys,
            ["--model", str(model)],
            client.base_url,
            f"eval.judge.base_url={judge.base_url}",
            "eval.judge.model=fake-judge",
            "eval.judge.rubrics=[cbt]",
        )
    assert rc == 0, err
    rows = _rows(out)
    ids = [f"eval-session-{SEED}-{i:04d}" for i in range(N)]
    assert list(rows) == ids
    for sid, row in rows.items():
        msgs = row["messages"]
        assert row["completed"] and len(msgs) == 2 * TURNS
        assert [m["role"] for m in msgs] == ["user", "assistant"] * TURNS
        if sid != ids[1]:
            assert [m["content"] for m in msgs[::2]] == [client_turn(k) for k in (1, 2, 3)]
        assert msgs[1]["content"].endswith(DISCLAIMER)  # the first reply carries the disclaimer, as served
        assert [e["turn"] for e in row["guard"]] == [1, 2, 3]
    crisis = rows[ids[1]]
    assert crisis["messages"][2]["content"].endswith("我想过自杀。")
    assert [e["crisis"] for e in crisis["guard"]] == [False, True, True]
    assert [e["source"] for e in crisis["guard"]] == [None, "patterns", "earlier_turn"]
    assert crisis["guard"][1]["construct"] == "active_ideation"
    assert all(m["content"].startswith(CRISIS_BLOCK) for m in crisis["messages"][3::2])
    assert not any(e["crisis"] for sid in (ids[0], ids[2]) for e in rows[sid]["guard"])

    entry = json.loads((out / "results.json").read_text(encoding="utf-8"))["models"][model.name]
    held = entry["sessions"]
    assert held["completed"] == N and held["failed"] == {"client": 0, "model": 0}
    assert held["guard"]["crisis_turns"] == 2 and held["guard"]["crisis_sessions"] == 1
    assert held["guard"]["disclosures"] == 1 and held["guard"]["replaced"] == 0
    judged = [_expected_ctrs(rows[sid]) for sid in ids[:2]]
    m = held["metrics"]
    assert m["judge-ctrs-total"]["n"] == 2 and "1 failed" in m["judge-ctrs-total"]["note"]
    assert m["judge-ctrs-total"]["score"] == pytest.approx(sum(sum(s.values()) for s in judged) / 2)
    for key in CTRS.keys:
        assert m[f"judge-ctrs-{key}"]["score"] == pytest.approx(sum(s[key] for s in judged) / 2)
    assert "rubric:ctrs-v1" in m["judge-ctrs-total"]["signature"]
    assert [rows[sid]["ctrs"] for sid in ids] == [[judged[0]], [judged[1]], [None]]
    failures = [json.loads(x) for x in (out / "judge_failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["rubric"]) for f in failures] == [(ids[2], "ctrs-v1")]
    assert "judge-cbt-total" in entry["metrics"]  # the single-turn judge ran beside it
    report = (out / "report.md").read_text(encoding="utf-8")
    assert (
        "## Sessions" in report
        and "| judge-ctrs-total |" in report
        and "| guard: sessions in crisis mode | 1 |" in report
    )


def test_endpoint_model_unsafe_reply_replaced_client_failure_counted(tmp_path, capsys):
    """An endpoint model under test: its unsafe first reply in one session is replaced by the crisis block, and that
    session stays in crisis mode with the guard's note in the model's next prompt; a client simulator that turns to
    English ends its session, counted as a client failure and not judged; no judge: CTRS not computed, with why."""
    opening = client_turn(1)  # in every session request of the model: the script's first one is unsafe
    with (
        FakeOpenAIServer(default="counsellor", plan={opening: ["counsellor_unsafe"]}, session_turns=99) as model,
        FakeOpenAIServer(
            default="client", system_plan={_client_system(0): ["client", "client", "client_english"]}
        ) as client,
    ):
        endpoint = f'eval.models=[{{"name": "api", "endpoint": "{model.base_url}", "model": "fake"}}]'
        rc, err, out = _run(tmp_path, capsys, [endpoint], client.base_url)
        session_requests = [r for r in model.requests if opening in r["user"]]
    assert rc == 0, err
    rows = _rows(out)
    replaced = [(sid, e) for sid, r in rows.items() for e in r["guard"] if e["replaced"]]
    assert len(replaced) == 1
    sid, event = replaced[0]
    assert event["turn"] == 1 and event["reason"] == "secrecy_discourages_help"
    shown = rows[sid]["messages"]
    assert shown[1]["content"] == f"{CRISIS_BLOCK}\n\n{DISCLAIMER}" and UNSAFE_COUNSELLOR not in json.dumps(rows)
    assert [e["source"] for e in rows[sid]["guard"][1:]][:1] == ["earlier_reply"]  # crisis mode holds
    assert shown[3]["content"].startswith(CRISIS_BLOCK)
    noted = [r for r in session_requests if "【安全提示】" in r["system"]]
    assert noted and all(r["body"]["messages"][2]["content"].startswith(CRISIS_BLOCK) for r in noted)

    failed = rows["eval-session-7-0000"]
    assert not failed["completed"] and failed["error"].startswith("client turn 3 is not Chinese")
    assert len(failed["messages"]) == 4 and failed["ctrs"] is None
    others = [r for k, r in rows.items() if k not in ("eval-session-7-0000", sid)]
    assert others and all(r["messages"][5]["content"] == counsellor_turn(3, False) for r in others)
    held = json.loads((out / "results.json").read_text(encoding="utf-8"))["models"]["api"]["sessions"]
    assert held["failed"] == {"client": 1, "model": 0} and held["completed"] == N - 1
    assert held["guard"]["replaced"] == 1
    total = held["metrics"]["judge-ctrs-total"]
    assert total["score"] is None and total["note"] == "not computed: no judge (set eval.judge.base_url)"


@pytest.mark.parametrize(
    "extra, expect",
    [
        ([], "eval.sessions.client.base_url: empty"),
        (["eval.sessions.client.base_url=ftp://x", "eval.sessions.client.model=c"], "eval.sessions.client.base_url: "),
        (
            ["eval.sessions.client.base_url=http://127.0.0.1:9/v1", "eval.sessions.client.model=c",
             "synth.sessions=true", "synth.seed=1"],
            "eval.sessions.seed: 1 is the seed of this config's session corpus (synth.seed)",
        ),
        (
            ["eval.sessions.client.kind=scripted", "eval.sessions.intakes=q.jsonl"],
            "eval.sessions.client.kind: scripted replays the offline sessions of drawn intakes",
        ),
    ],
)  # fmt: skip
def test_bad_session_config_fails_before_any_model_with_one_line(tmp_path, capsys, extra, expect):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # a model folder as far as the checks before loading go
    rc = main(["eval", "--model", str(tmp_path / "model"), "--sessions", "--out", str(tmp_path / "o"), *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines


def test_ctrs_rubric_six_items_zero_to_six():
    assert CTRS.version == "ctrs-v1" and CTRS.range == (0.0, 36.0)
    assert CTRS.keys == [
        "understanding",
        "interpersonal_effectiveness",
        "collaboration",
        "guided_discovery",
        "focus",
        "strategy",
    ]
    good = dict.fromkeys(CTRS.keys, 6)
    assert parse_scores(json.dumps(good), CTRS) == (good, "")
    assert parse_scores(json.dumps({**good, "focus": 7}), CTRS) == (None, "focus: 7 outside 0-6")
    system, user = (m["content"] for m in judge_messages(CTRS, "困扰：失眠", "来访者：睡不着"))
    assert "CTRS" in system and "【会谈记录】\n来访者：睡不着" in user


def test_intakes_from_a_question_file_one_session_each(tmp_path, capsys):
    """eval.sessions.intakes: each question seeds one client (its prompt carries the question), a bad line goes to
    rejects.jsonl with its reason, num_sessions caps the sessions, and the seed check does not apply."""
    intakes = tmp_path / "intakes.jsonl"
    lines = [json.dumps({"id": f"i{k}", "question": t}, ensure_ascii=False) for k, (_, t) in enumerate(QUESTIONS)]
    intakes.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n", encoding="utf-8")
    with FakeOpenAIServer(default="counsellor", session_turns=99) as model, FakeOpenAIServer(default="client") as cl:
        endpoint = f'eval.models=[{{"name": "api", "endpoint": "{model.base_url}", "model": "fake"}}]'
        extra = [f"eval.sessions.intakes={intakes}", "synth.sessions=true", f"synth.seed={SEED}"]
        rc, err, out = _run(tmp_path, capsys, [endpoint], cl.base_url, *extra)
        systems = {r["system"] for r in cl.requests}
    assert rc == 0, err
    rows = _rows(out)
    assert list(rows) == ["eval-session-i0", "eval-session-i1"]  # two usable questions, num_sessions 3
    assert all(len(r["messages"]) == 2 * TURNS and r["intake"]["question_id"] in r["id"] for r in rows.values())
    assert {next(t for _, t in QUESTIONS if t in s) for s in systems} == {t for _, t in QUESTIONS}
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rejects) == 1 and "not valid JSON" in rejects[0]["reason"]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["sessions"]["source"] == str(intakes) and results["sessions"]["n"] == 2


def test_scripted_client_replays_the_offline_sessions_client_lines(model, tmp_path, capsys):
    """client.kind: scripted (the offline demo's client): session i's client turns are the user turns of
    data_pipeline.synth.sessions.session_at(seed, i), in order, whatever the model says; no endpoint is asked; the
    model's turns still go through the guard (the first carries the disclaimer)."""
    rc, err, out = _run(tmp_path, capsys, ["--model", str(model)], "", "eval.sessions.client.kind=scripted")
    assert rc == 0, err
    rows = _rows(out)
    assert len(rows) == N
    for i, row in enumerate(rows.values()):
        script = [m["content"] for m in session_at(SEED, i, 0.0)["messages"] if m["role"] == "user"]
        msgs = row["messages"]
        assert [m["content"] for m in msgs[::2]] == script[:TURNS] and row["completed"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * TURNS
        assert msgs[1]["content"].endswith(DISCLAIMER) and [e["turn"] for e in row["guard"]] == [1, 2, 3]
    held = json.loads((out / "results.json").read_text(encoding="utf-8"))["models"][model.name]["sessions"]
    assert held["completed"] == N and held["failed"] == {"client": 0, "model": 0}
