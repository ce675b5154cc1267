"""The LLM judge (evaluation/judge.py) against a real local OpenAI-compatible server with scripted faults."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cbt_llm.cli import main
from cbt_llm.core.config import JudgeConfig
from cbt_llm.domain.rubrics import RUBRICS, parse_scores
from evaluation.judge import Judge
from tests.fixtures.fake_openai_server import PROMPT_TOKENS, FakeOpenAIServer, judge_scores  # noqa: E402
from tests.fixtures.paths import ROOT

KEY = "sk-judge-secret-key"
# answers of different lengths, so the fake judge gives them different scores
ITEMS = [
    ("q1", "最近总是失眠,怎么办?", "听起来你很累。"),
    ("q2", "和室友相处很紧张。", "我能理解你回宿舍时的紧张。你可能在想:室友不喜欢我。可以试着记录这些想法。"),
    ("q3", "考试失败了。", "失败一次并不代表你是失败的人。" * 4),
    ("q4", "父母总拿我和别人比。", "被比较的感觉很压抑。你也许会觉得自己永远不够好,我们可以一起找找反面的证据。" * 3),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    monkeypatch.chdir(ROOT)  # the structure scorer artifact is shared by the tests


def _total(rubric: str, answer: str, **kw) -> float:
    from cbt_llm.domain.rubrics import judge_messages

    user = judge_messages(RUBRICS[rubric], "", answer)[1]["content"]
    return RUBRICS[rubric].combine(judge_scores(user, **kw))


def _files(tmp_path: Path) -> tuple[Path, Path]:
    q = tmp_path / "questions.jsonl"
    q.write_text("".join(json.dumps({"id": i, "question": t}, ensure_ascii=False) + "\n" for i, t, _ in ITEMS))
    p = tmp_path / "sys.jsonl"
    p.write_text("".join(json.dumps({"id": i, "output": a}, ensure_ascii=False) + "\n" for i, _, a in ITEMS))
    return q, p


def _cli(tmp_path: Path, base_url: str, capsys, *extra: str) -> tuple[int, str, Path]:
    q, p = _files(tmp_path)
    out = tmp_path / "eval"
    args = ["eval", "--predictions", str(p), "--questions", str(q), "--out", str(out), "eval.check_overlap=false"]
    args += [f"eval.judge.base_url={base_url}", "eval.judge.model=fake-judge", "eval.judge.api_key_env=JUDGE_TEST_KEY"]
    args += ["eval.judge.max_retries=2", "eval.bootstrap_resamples=200", *extra]
    rc = main(args)
    return rc, capsys.readouterr().err, out


def _no_key_anywhere(out: Path) -> None:
    for f in out.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


def test_judge_through_cli_scores_retries_and_keeps_failures(tmp_path, capsys):
    """cbt rubric via `cbt-llm eval --predictions`: 429 and 500 retried by the client, a non-JSON reply asked again
    once and then scored, an answer whose replies stay unusable is a failure with its raw text (not a 0); n, CI,
    usage, report and plot; the key is nowhere in the outputs; a rerun asks again only for the failed answer."""
    plan = {ITEMS[1][2]: ["429", "500"], ITEMS[2][2]: ["not_json", "judge_fenced"], ITEMS[3][2]: "always:not_json"}
    with FakeOpenAIServer(plan=plan, default="judge", expected_key=KEY) as srv:
        rc, err, out = _cli(tmp_path, srv.base_url, capsys, "eval.judge.rubrics=[cbt]")
        assert rc == 0, err
        assert len(srv.requests_for(ITEMS[1][2])) == 3  # 429, 500, answered
        assert len(srv.requests_for(ITEMS[2][2])) == 2  # not JSON, asked again once
        assert len(srv.requests_for(ITEMS[3][2])) == 2  # not JSON twice: a failure
        assert all(r["body"]["model"] == "fake-judge" for r in srv.requests)
    res = json.loads((out / "results.json").read_text())
    m = res["models"]["sys"]
    total = m["metrics"]["judge-cbt-total"]
    want = [_total("cbt", a) for _, _, a in ITEMS[:3]]
    assert total["n"] == 3 and total["score"] == pytest.approx(sum(want) / 3)
    assert len(set(want)) == 3  # the answers' lengths give three different totals
    lo, hi = total["ci95"]
    assert lo <= total["score"] <= hi and lo < hi
    assert "1 failed" in total["note"] and "fake-judge" in total["signature"] and "cbt-v1" in total["signature"]
    assert m["metrics"]["judge-cbt-empathy"]["n"] == 3 and "judge-counselling-mean" not in m["metrics"]
    j = m["judge"]
    assert j["failures"] == 1 and j["usage"]["requests"] == 6  # 1 + 1 + 2 + 2 replies
    assert j["usage"]["prompt_tokens"] == 6 * PROMPT_TOKENS and j["usage"]["cached"] == 0
    (fail,) = [json.loads(x) for x in (out / "judge_failures.jsonl").read_text().splitlines()]
    assert fail["id"] == "q4" and len(fail["replies"]) == 2 and fail["replies"][0]["why"] == "not JSON"
    assert "多休息" in fail["replies"][0]["raw"]
    report = (out / "report.md").read_text()
    assert "judge-cbt-total" in report and "fake-judge" in report and "`cbt-v1`" in report
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    _no_key_anywhere(out)
    # rerun: the three judged answers come from the cache, only the failed one is asked again
    with FakeOpenAIServer(default="judge", expected_key=KEY) as srv:
        rc, err, out = _cli(tmp_path, srv.base_url, capsys, "eval.judge.rubrics=[cbt]")
        assert rc == 0, err
        assert len(srv.requests) == 1 and ITEMS[3][2] in srv.requests[0]["user"]
    m = json.loads((out / "results.json").read_text())["models"]["sys"]
    assert m["metrics"]["judge-cbt-total"]["n"] == 4 and m["judge"]["usage"]["cached"] == 3
    assert not (out / "judge_failures.jsonl").exists()


def _judge(tmp_path: Path, base_url: str, **kw) -> Judge:
    jc = JudgeConfig(base_url=base_url, model="fake-judge", api_key_env="JUDGE_TEST_KEY", max_retries=0, **kw)
    return Judge(jc, tmp_path / "out")


def test_repeats_agree_and_a_second_run_makes_no_request(tmp_path):
    with FakeOpenAIServer(default="judge") as srv:
        judged, _ = _judge(tmp_path, srv.base_url, repeats=2).judge("m", ITEMS)
        assert len(srv.requests) == 2 * 2 * len(ITEMS)
        assert {r["body"]["seed"] for r in srv.requests} == {0, 1}
        for name in ("cbt", "counselling"):
            a = judged["info"]["agreement"][name]
            assert a["n"] == 4 and a["pearson"] == pytest.approx(1.0) and a["mean_abs_diff"] == 0.0
            assert set(a["exact"].values()) == {1.0}
        again, _ = _judge(tmp_path, srv.base_url, repeats=2).judge("m", ITEMS)
        assert len(srv.requests) == 16  # nothing asked twice
    assert again["scores"] == judged["scores"] and again["info"]["usage"]["requests"] == 0
    assert again["info"]["usage"]["cached"] == 16
    assert KEY.encode() not in (tmp_path / "out" / "judge_cache.jsonl").read_bytes()


def test_a_disagreeing_second_judgement_lowers_agreement(tmp_path):
    with FakeOpenAIServer(default="judge_noisy") as srv:
        judged, _ = _judge(tmp_path, srv.base_url, repeats=2, rubrics=["cbt"]).judge("m", ITEMS)
    a = judged["info"]["agreement"]["cbt"]
    assert a["n"] == 4 and a["pearson"] < 0.5 and a["mean_abs_diff"] > 1.0
    assert min(a["exact"].values()) < 1.0


def test_unreachable_judge_ends_with_one_line_and_a_rerun_resumes(tmp_path, capsys):
    plan = {ITEMS[2][2]: "always:500"}
    with FakeOpenAIServer(plan=plan, default="judge") as srv:
        rc, err, out = _cli(tmp_path, srv.base_url, capsys, "eval.judge.max_retries=0")
        assert rc == 0, err  # some requests failed, not all: counted, the run goes on
    m = json.loads((out / "results.json").read_text())["models"]["sys"]
    assert m["metrics"]["judge-counselling-mean"]["n"] == 3 and m["judge"]["http_errors"] == 2
    cached = (out / "judge_cache.jsonl").read_text().splitlines()
    assert len(cached) == 6  # 3 answers x 2 rubrics
    (out / "generations.jsonl").unlink()
    rc, err, out = _cli(tmp_path, "http://127.0.0.1:9/v1", capsys, "eval.judge.max_retries=0")
    assert rc == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: eval.judge.base_url: http://127.0.0.1:9/v1 answered none of 2"), err
    assert (out / "judge_cache.jsonl").read_text().splitlines() == cached
    assert len((out / "generations.jsonl").read_text().splitlines()) == 4  # the answers are kept too
    with FakeOpenAIServer(default="judge") as srv:
        rc, err, out = _cli(tmp_path, srv.base_url, capsys)
        assert rc == 0, err
        assert len(srv.requests) == 2  # only what was missing
    m = json.loads((out / "results.json").read_text())["models"]["sys"]
    assert m["metrics"]["judge-cbt-total"]["n"] == 4 and m["metrics"]["judge-counselling-mean"]["n"] == 4
    want = sum(_total("counselling", a) for _, _, a in ITEMS) / 4
    assert m["metrics"]["judge-counselling-mean"]["score"] == pytest.approx(want)


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["eval.judge.base_url=ftp://x"], "eval.judge.base_url: 'ftp://x' is not an http(s) URL"),
        (["eval.judge.base_url=http://127.0.0.1:9/v1", "eval.judge.model="], "eval.judge.model: "),
        (
            ["eval.judge.base_url=http://127.0.0.1:9/v1", "eval.judge.api_key_env=NO_SUCH_KEY_VAR"],
            "eval.judge.api_key_env",
        ),
    ],
)
def test_bad_judge_config_fails_before_any_work(tmp_path, capsys, extra, expect):
    rc, err, out = _cli(tmp_path, "http://127.0.0.1:9/v1", capsys, *extra)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert not (out / "generations.jsonl").exists()


def test_parse_scores():
    cbt = RUBRICS["cbt"]
    good = {"empathy": 2, "key_thought": 3, "challenge": 1, "strategy": 4, "encouragement": 1, "relevance": 0}
    assert parse_scores("```json\n" + json.dumps(good) + "\n```", cbt) == (good, "")
    assert parse_scores(json.dumps({**good, "empathy": 2.0}), cbt)[0] == good
    assert parse_scores(json.dumps({**good, "empathy": 3}), cbt) == (None, "empathy: 3 outside 0-2")
    assert parse_scores(json.dumps({**good, "encouragement": True}), cbt)[0] is None
    assert parse_scores("[1, 2]", cbt) == (None, "not a JSON object")
    assert cbt.range == (0.0, 18.0) and RUBRICS["counselling"].range == (1.0, 10.0)


def test_report_names_the_judge_and_its_agreement(tmp_path, capsys):
    with FakeOpenAIServer(default="judge") as srv:
        rc, err, out = _cli(tmp_path, srv.base_url, capsys, "eval.judge.repeats=2", "eval.judge.rubrics=[counselling]")
        assert rc == 0, err
    report = (out / "report.md").read_text()
    assert "judge `fake-judge`, rubrics `counselling-v1`, repeats 2" in report
    assert "agreement counselling (repeat 1 vs 2, n=4): Pearson r 1.000, mean |difference| 0.00" in report
    agreement = json.loads((out / "results.json").read_text())["models"]["sys"]["judge"]["agreement"]
    assert agreement["counselling"]["pearson"] == pytest.approx(1.0)


def test_slow_and_out_of_range_replies_then_a_kill_and_a_resume_without_repeats(tmp_path):
    """`cbt-llm eval` in a subprocess, one request in flight: q1's first reply is out of range (asked again later),
    q2's first reply is slower than the client's timeout (retried by the client, then answered), q3 is answered,
    q4's replies never come in time, and the process is SIGKILLed while the client retries q4. The rerun asks for
    q1 (its out-of-range reply again, then a good one) and q4, never for the cached q2 and q3."""
    import os
    import signal
    import subprocess
    import time

    q, p = _files(tmp_path)
    out = tmp_path / "eval"
    cmd = [str(Path(sys.executable).parent / "cbt-llm"), "eval", "--predictions", str(p), "--questions", str(q)]
    cmd += ["--out", str(out), "eval.check_overlap=false", "eval.judge.model=fake-judge", "eval.judge.rubrics=[cbt]"]
    cmd += ["eval.judge.api_key_env=JUDGE_TEST_KEY", "eval.judge.concurrency=1", "eval.judge.timeout_s=2"]
    env = {**os.environ, "JUDGE_TEST_KEY": KEY, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    plan = {ITEMS[0][2]: ["judge_out_of_range"], ITEMS[1][2]: ["slow"], ITEMS[3][2]: "always:slow"}
    cache = out / "judge_cache.jsonl"
    with FakeOpenAIServer(plan=plan, default="judge", expected_key=KEY, slow_s=5.0) as srv:
        proc = subprocess.Popen(
            [*cmd, f"eval.judge.base_url={srv.base_url}", "eval.judge.max_retries=50"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 240
        while not (cache.is_file() and len(cache.read_text().splitlines()) == 2 and srv.requests_for(ITEMS[3][2])):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert [r["fault"] for r in srv.requests_for(ITEMS[1][2])][:2] == ["slow", "judge"]  # timed out, retried
    cached = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(cached) == 2 and all(set(r["scores"]) for r in cached)  # q2 and q3, whole lines
    with FakeOpenAIServer(plan={ITEMS[0][2]: ["judge_out_of_range"]}, default="judge", expected_key=KEY) as srv:
        done = subprocess.run([*cmd, f"eval.judge.base_url={srv.base_url}"], cwd=ROOT, env=env, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        assert not srv.requests_for(ITEMS[1][2]) and not srv.requests_for(ITEMS[2][2])  # cached: not asked again
        assert [r["fault"] for r in srv.requests_for(ITEMS[0][2])] == ["judge_out_of_range", "judge"]
        assert len(srv.requests_for(ITEMS[3][2])) == 1
    m = json.loads((out / "results.json").read_text())["models"]["sys"]
    assert m["metrics"]["judge-cbt-total"]["n"] == 4 and m["judge"]["usage"]["cached"] == 2
    want = [_total("cbt", a) for _, _, a in ITEMS]
    assert m["metrics"]["judge-cbt-total"]["score"] == pytest.approx(sum(want) / 4)  # q1 from its in-range reply
    assert not (out / "judge_failures.jsonl").exists()
    _no_key_anywhere(out)
