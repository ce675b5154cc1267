"""train.gen_eval_every under torchrun, 2 ranks, ZeRO-3 (issue 11): the generation metrics logged during training
equal `cbt-llm eval` on the checkpoint of that step and the same held-out questions, answer for answer.

One short run (2 optimizer steps, 5 questions, 12 new tokens) on the trainer tests' fixture shards, recorded with a
chat tokenizer so the model can be prompted. The batch budget makes 5 generation batches, so rank 0 generates
three times and rank 1 twice plus a lockstep filler: ZeRO-3's collective forwards must not hang on the uneven split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from data_pipeline.synth_template import iter_records
from tests.eval_fixtures import write_chat_tokenizer
from tests.test_train_e2e import by_step, metrics, read_wandb_history, run, torchrun_cmd
from tests.train_fixtures import make_shards
from train.export import run_export

BIN = Path(sys.executable).parent
GEN = ["eval.limit=5", "eval.max_new_tokens=12", "eval.batch_tokens=150", "eval.check_overlap=false"]
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _questions(path: Path) -> Path:
    rows = [
        {
            "id": f"q{i}",
            "question": r["question"][: 10 + 7 * i],
            "description": r["description"][:12],
            "reference": r["answer"][:160],
        }
        for i, r in enumerate(iter_records(7, 0, 6))
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gen_eval")
    data = make_shards(root / "data", tokenizer_dir=write_chat_tokenizer(root / "tokenizer"))
    questions = _questions(root / "questions.jsonl")
    run_dir = root / "run"
    args = [
        "model.init=random",
        "train.max_steps=2",
        "train.log_every=1",
        "train.lr=1e-2",
        "train.eval_every=0",
        "train.save_every=0",
        "train.gen_eval_every=2",
        f"train.data_dir={data}",
        f"train.run_dir={run_dir}",
        f"eval.questions={questions}",
        *GEN,
    ]
    p = run(torchrun_cmd(args), WANDB_MODE="offline")
    assert p.returncode == 0, p.log
    export = root / "export"
    run_export(run_dir, export)
    out = root / "eval"
    cli = [str(BIN / "cbt-llm"), "eval", "--model", str(export), "--questions", str(questions), "--out", str(out)]
    e = run([*cli, *GEN, "eval.bootstrap_resamples=0", f"eval.data_dir={data}"])
    assert e.returncode == 0, e.log
    return {"run": run_dir, "eval": out, "train_log": p.log}


def test_logged_generation_metrics_equal_cbt_llm_eval_on_the_checkpoint(trained):
    results = json.loads((trained["eval"] / "results.json").read_text())
    (model,) = results["models"].values()
    expected = {f"gen/{k}": m["score"] for k, m in model["metrics"].items() if m.get("score") is not None}
    rows = metrics(trained["run"])
    logged = {k: by_step(rows, k)[2] for k in expected}
    assert {"gen/bleu-4", "gen/rouge-l", "gen/structure-coverage", "gen/distinct-2"} <= set(expected), expected
    assert logged == pytest.approx(expected, abs=1e-9)
    assert by_step(rows, "gen/new_tokens")[2] == model["generation"]["new_tokens"] > 0
    assert model["generation"]["batches"] == 5  # the same plan in training: rank 0 runs 3, rank 1 2 + a filler


def test_the_answers_are_the_same_text_and_written_per_step(trained):
    during = [json.loads(ln) for ln in (trained["run"] / "gen_eval" / "step_0000002.jsonl").read_text().splitlines()]
    after = [json.loads(ln) for ln in (trained["eval"] / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in during] == ["q0", "q1", "q2", "q3", "q4"]
    assert [r["output"] for r in during] == [r["output"] for r in after]
    assert all(r["structure"]["coverage"] == a["structure"]["coverage"] for r, a in zip(during, after))


def test_gen_eval_every_without_the_cli_hook_fails_with_one_line(tmp_path):
    from cbt_llm.config import ConfigError, load_config
    from train.recipe import _check_gen_eval

    cfg = load_config(None, ["train.gen_eval_every=5"])
    with pytest.raises(ConfigError, match=r"^train.gen_eval_every: .* set train.gen_eval_every=0 here$"):
        _check_gen_eval(cfg, None)
    assert _check_gen_eval(load_config(None, []), None) is None


def test_ray_jobs_refuse_gen_eval_every_before_any_work():
    from cbt_llm.config import ConfigError, load_config
    from launch.preflight import preflight

    cfg = load_config(None, ["train.gen_eval_every=5", "model.init=random"])
    with pytest.raises(ConfigError, match=r"^train.gen_eval_every: not available in Ray jobs"):
        preflight(cfg, "ray")


def test_samples_table_in_metrics_jsonl_and_wandb(trained):
    (line,) = [r for r in metrics(trained["run"]) if "gen/samples" in r]
    during = [json.loads(ln) for ln in (trained["run"] / "gen_eval" / "step_0000002.jsonl").read_text().splitlines()]
    assert line["step"] == 2 and [s["id"] for s in line["gen/samples"]] == ["q0", "q1", "q2"]  # eval.examples=3
    assert [s["answer"] for s in line["gen/samples"]] == [r["output"] for r in during[:3]]
    run_id = (trained["run"] / "wandb_run_id").read_text().strip()
    (wandb_file,) = (trained["run"] / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history = [h for h in read_wandb_history(wandb_file) if "gen/samples/_type" in h]  # nested keys come flattened
    assert history and history[0]["gen/samples/_type"] == "table-file" and history[0]["gen/samples/nrows"] == 3
    assert history[0]["gen/rouge-l"] == pytest.approx(line["gen/rouge-l"])
