"""`cbt-llm eval` end to end: predictions files, endpoint models over real HTTP, bad input, 2 ranks == 1 rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbt_llm.cli import main
from tests.fixtures.eval import tiny_chat_model  # noqa: E402
from tests.fixtures.fake_openai_server import FakeOpenAIServer, good_parts  # noqa: E402
from tests.fixtures.paths import ROOT

QUESTIONS = [
    ("q1", "我总觉得自己做什么都不够好,怎么办?", "工作上一点小错就睡不着。"),
    ("q2", "和室友关系紧张,每天回宿舍都很焦虑。", ""),
    ("q3", "考试失败以后觉得人生没有希望了。", "我已经复读一年了。"),
    ("q4", "父母总拿我和别人比较,我很压抑。", "从小到大都是这样。"),
]


def _cbt_answer(question: str) -> str:
    return "\n".join(good_parts(question).values())


def write_questions(path: Path, extra_lines: tuple[str, ...] = ()) -> Path:
    """A heldout.jsonl-like question file whose references are CBT answers, plus any raw (bad) lines."""
    lines = [
        json.dumps({"id": i, "question": q, "description": d, "reference": _cbt_answer(q)}, ensure_ascii=False)
        for i, q, d in QUESTIONS
    ]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(["eval", *args])
    return rc, capsys.readouterr().err


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(ROOT)  # the structure scorer artifact (runs/structure_scorer.npz) is shared by the tests


def test_predictions_scores_a_file_without_a_model(tmp_path, capsys):
    qfile = write_questions(tmp_path / "questions.jsonl")
    preds = tmp_path / "sys.jsonl"
    good = [{"id": i, "output": _cbt_answer(q)} for i, q, _ in QUESTIONS[:3]]
    good.append({"id": "q4", "output": "多休息。", "reference": "多休息。"})  # its own reference wins
    bad = ["{not json", json.dumps({"id": "q9", "output": 3}), json.dumps({"output": "x"}), json.dumps(good[0])]
    preds.write_text("\n".join([json.dumps(g, ensure_ascii=False) for g in good] + bad) + "\n", encoding="utf-8")
    out = tmp_path / "eval"
    rc, err = run_cli(
        ["--predictions", str(preds), "--questions", str(qfile), "--out", str(out), "eval.check_overlap=false"], capsys
    )
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    m = res["models"]["sys"]
    assert m["kind"] == "predictions" and m["generation"] is None
    # every output equals its reference: BLEU-4 and ROUGE are 100, distinct and structure are computed
    assert m["metrics"]["bleu-4"]["score"] == pytest.approx(100.0)
    assert m["metrics"]["rouge-l"]["score"] == pytest.approx(100.0)
    assert m["metrics"]["bleu-4"]["n"] == 4
    lo, hi = m["metrics"]["structure-coverage"]["ci95"]
    assert lo <= m["metrics"]["structure-coverage"]["score"] <= hi
    assert m["metrics"]["structure-coverage"]["score"] >= 3.0  # three of four answers are five-part CBT answers
    assert m["metrics"]["bertscore-f1"]["score"] is None and "not computed" in m["metrics"]["bertscore-f1"]["note"]
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = " | ".join(r["reason"] for r in rejects)
    assert len(rejects) == 4, reasons
    assert "not valid JSON" in reasons and "'output' must be a string" in reasons and "duplicate id q1" in reasons
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["id"] for g in gens] == ["q1", "q2", "q3", "q4"]
    assert gens[0]["structure"]["coverage"] >= 4 and gens[0]["safety"]["professional_help"] is True
    assert "sys" in (out / "report.md").read_text()
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_endpoint_model_over_http_with_faults(tmp_path, capsys, monkeypatch):
    """An OpenAI-compatible endpoint answers; a 429 is retried by the client, a question that keeps failing is a
    counted failure with its reason (not a 0 score), and the API key is written nowhere."""
    qfile = write_questions(tmp_path / "questions.jsonl")
    monkeypatch.setenv("EVAL_TEST_KEY", "sk-secret-eval-key")
    plan = {QUESTIONS[1][1]: ["429"], QUESTIONS[2][1]: "always:500"}
    with FakeOpenAIServer(plan=plan, default="good_text", expected_key="sk-secret-eval-key") as srv:
        cfg = tmp_path / "eval.yaml"
        cfg.write_text(
            "eval:\n  models:\n    - name: api\n"
            f"      endpoint: {srv.base_url}\n      model: fake\n      api_key_env: EVAL_TEST_KEY\n"
            "  max_retries: 1\n  check_overlap: false\n",
            encoding="utf-8",
        )
        out = tmp_path / "eval"
        rc, err = run_cli(["--config", str(cfg), "--questions", str(qfile), "--out", str(out)], capsys)
        assert rc == 0, err
        assert len(srv.requests_for(QUESTIONS[1][1])) == 2  # 429 then answered
        assert len(srv.requests_for(QUESTIONS[2][1])) == 2  # 500, one retry, still 500: a failure
    m = json.loads((out / "results.json").read_text())["models"]["api"]
    assert m["failed"] == 1 and m["generation"]["failed"] == 1
    assert m["metrics"]["structure-coverage"]["n"] == 3
    assert m["metrics"]["structure-coverage"]["score"] >= 4.0
    gens = {g["id"]: g for g in map(json.loads, (out / "generations.jsonl").read_text().splitlines())}
    assert gens["q3"]["finish"] == "error" and "500" in gens["q3"]["error"] and "structure" not in gens["q3"]
    for f in out.rglob("*"):
        if f.is_file():
            assert b"sk-secret-eval-key" not in f.read_bytes(), f


def test_endpoint_unreachable_fails_with_one_line(tmp_path, capsys):
    qfile = write_questions(tmp_path / "questions.jsonl")
    rc, err = run_cli(
        [
            "--questions",
            str(qfile),
            "--out",
            str(tmp_path / "e"),
            "eval.check_overlap=false",
            "eval.max_retries=0",
            'eval.models=[{"name": "api", "endpoint": "http://127.0.0.1:9/v1"}]',
        ],
        capsys,
    )
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: eval.models[0].endpoint: http://127.0.0.1:9/v1 answered none of 4 questions")


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--model", "no/such/model"], "eval.models[0].path: 'no/such/model' not found"),
        (["--model", "{tmp}", "--adapter", "{tmp}"], "eval.models[0].adapter: "),
        (["--model", "{q}"], "is not a model folder (no config.json)"),
        (["--model", "{tmp}", "eval.metrics=[bleu9]"], "eval.metrics: unknown metric(s) ['bleu9']"),
        (["--model", "{tmp}", "eval.bertscore.model_path=/no/encoder"], "eval.bertscore"),
        (["--predictions", "/no/file.jsonl"], "eval.predictions (--predictions): '/no/file.jsonl' not found"),
        (
            ["--model", "{tmp}", "--questions", "/no/q.jsonl", "eval.check_overlap=false"],
            "eval.questions: '/no/q.jsonl'",
        ),
        (["--model", "{tmp}", "--questions", "{q}"], "eval.data_dir: "),
        ([], "eval.models: no model to evaluate"),
    ],
)
def test_bad_input_fails_before_generation_with_one_line(tmp_path, capsys, args, expect):
    qfile = write_questions(tmp_path / "q.jsonl")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # a model folder as far as the checks before loading go
    args = [a.replace("{tmp}", str(tmp_path / "model")).replace("{q}", str(qfile)) for a in args]
    rc, err = run_cli(["--out", str(tmp_path / "out"), *args, f"eval.data_dir={tmp_path / 'nodata'}"], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert not (tmp_path / "out" / "generations.jsonl").exists()


def _torchrun_eval(n: int, model: Path, qfile: Path, out: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    cmd += ["-m", "cbt_llm.cli", "eval", "--model", str(model), "--questions", str(qfile), "--out", str(out)]
    cmd += ["eval.check_overlap=false", "eval.max_new_tokens=12", "eval.batch_tokens=150", "wandb.mode=disabled"]
    cmd += list(extra)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_ranks_answer_exactly_as_one(tmp_path):
    """`cbt-llm eval` under torchrun on CPU (gloo), 1 and 2 ranks side by side: every rank answers its share of
    batches that do not depend on the number of ranks, rank 0 writes all in question order; same answers, and the
    same pref-accuracy log-probabilities (scored data parallel the same way)."""
    model = tiny_chat_model(tmp_path / "tiny")
    qfile = write_questions(tmp_path / "q.jsonl")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"id": i, "messages": [{"role": "user", "content": q}], "chosen": _cbt_answer(q),
                        "rejected": f"{d}别想太多。"}, ensure_ascii=False) + "\n"
            for i, q, d in QUESTIONS
        ), encoding="utf-8",
    )  # fmt: skip
    extra = (f"eval.pairs={pairs}", "eval.logprob_batch_tokens=300")
    procs = {n: _torchrun_eval(n, model, qfile, tmp_path / f"out{n}", extra) for n in (1, 2)}
    for proc in procs.values():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-3000:]
    rows = {
        n: [json.loads(x) for x in (tmp_path / f"out{n}" / "generations.jsonl").read_text().splitlines()]
        for n in (1, 2)
    }
    assert [r["id"] for r in rows[2]] == ["q1", "q2", "q3", "q4"]
    keep = ("id", "output", "new_tokens", "prompt_tokens", "finish")
    assert [{k: r[k] for k in keep} for r in rows[1]] == [{k: r[k] for k in keep} for r in rows[2]]
    (model_result,) = json.loads((tmp_path / "out2" / "results.json").read_text())["models"].values()
    gen = model_result["generation"]
    assert gen["batches"] >= 2 and gen["new_tokens"] == sum(r["new_tokens"] for r in rows[2])
    pref = {
        n: [json.loads(x) for x in (tmp_path / f"out{n}" / "preference.jsonl").read_text().splitlines()] for n in (1, 2)
    }
    assert [r["id"] for r in pref[2]] == ["q1", "q2", "q3", "q4"]
    for a, b in zip(pref[1], pref[2]):
        assert a["chosen_mean"] == pytest.approx(b["chosen_mean"], abs=1e-6) and a["correct"] == b["correct"]
    assert model_result["metrics"]["pref-accuracy"]["n"] == 4
