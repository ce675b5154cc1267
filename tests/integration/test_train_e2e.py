"""End-to-end trainer tests: 2 CPU ranks (gloo) through the real CLI under torchrun and the deepspeed launcher.

Tiny Qwen2-architecture model (2 layers, hidden 64) on fixture shards, fp32, ZeRO-3. Five launches in all:
full fine-tune (A, with a generation eval at its last step: train.gen_eval_every, checked against `cbt-llm eval`
on its checkpoint), the same run killed with SIGKILL inside a checkpoint save (B) and resumed (C), LoRA under
the deepspeed launcher (D), and SIGTERM to one rank (E).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from data_pipeline.synth.template import iter_records
from tests.fixtures.eval import write_chat_tokenizer
from tests.fixtures.paths import ROOT
from tests.fixtures.train import free_port, make_shards
from train.data import collate, load_manifest, read_rows
from train.export import run_export
from train.model import masked_ce_sum

BIN = Path(sys.executable).parent
BASE = [
    "model.init=random",
    "train.max_steps=6",
    "train.grad_accum=2",
    "train.log_every=1",
    "train.lr=1e-2",
    "train.save_every=1",
    "train.keep_last=2",
    "train.eval_every=3",
    "train.record_order=true",
    "train.seed=1",
    "model.lora.dropout=0.0",
]
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _env(**extra) -> dict:
    env = dict(
        os.environ,
        WANDB_MODE="disabled",
        TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        WANDB_SILENT="true",
    )
    env.pop("CBT_LLM_FAULT", None)
    env.update(extra)
    return env


def torchrun_cmd(args: list[str]) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "cbt_llm.cli", "train", *args]


def deepspeed_cmd(args: list[str]) -> list[str]:
    """The documented form: `deepspeed --num_gpus N --no_local_rank $(which cbt-llm) train ...` (CPU: gloo)."""
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--no_local_rank",
        str(BIN / "cbt-llm"),
        "train",
        *args,
    ]


def run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=300)
    p.log = p.stdout[-3000:] + p.stderr[-6000:]  # type: ignore[attr-defined]
    return p


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def by_step(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if r.get(key) is not None}


def hf_eval_loss(model, data_dir: Path) -> float:
    """The engine's validation loss recomputed in one process: sum over label tokens / their count."""
    m = load_manifest(data_dir)
    rows = read_rows(data_dir, m["splits"]["validation"]["shards"], m["pad_token_id"])
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            b = collate(rows, [i], m["pad_token_id"])
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
            s, c = masked_ce_sum(logits, b["labels"], b["position_ids"])
            total, count = total + s.item(), count + c
    return total / count


def read_wandb_history(wandb_file: Path) -> list[dict]:
    """Decode the history records of an offline .wandb file (W&B's block log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, out = wandb_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk, pos = data[pos : pos + length], pos + length
        if kind in (1, 4):  # full record / last fragment
            rec = pb.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                out.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind in (2, 3):
            buf = chunk if kind == 2 else buf + chunk
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # recorded with a chat tokenizer: `cbt-llm launch` checks for a chat template before it starts a job
    root = tmp_path_factory.mktemp("train_data")
    return make_shards(root, tokenizer_dir=write_chat_tokenizer(root / "chat_tokenizer"))


# the generation eval of run A (train.gen_eval_every, issue 11): 5 questions, 12 new tokens, a batch budget that
# makes 5 generation batches, so rank 0 generates three times and rank 1 twice plus a lockstep filler: ZeRO-3's
# collective forwards must not hang on the uneven split
GEN = ["eval.limit=5", "eval.max_new_tokens=12", "eval.batch_tokens=150", "eval.check_overlap=false"]


def _gen_questions(path: Path) -> Path:
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
def full_run(data, tmp_path_factory) -> Path:
    """A: uninterrupted full fine-tune, torchrun, W&B offline; a generation eval at its last step (6), after
    that step's loss is logged, so the other runs' comparisons with A are untouched."""
    root = tmp_path_factory.mktemp("full")
    run_dir = root / "run"
    gen = ["train.gen_eval_every=6", f"eval.questions={_gen_questions(root / 'questions.jsonl')}", *GEN]
    p = run(torchrun_cmd(BASE + [f"train.data_dir={data}", f"train.run_dir={run_dir}", *gen]), WANDB_MODE="offline")
    assert p.returncode == 0, p.log
    return run_dir


@pytest.fixture(scope="module")
def resumed_run(data, tmp_path_factory) -> tuple[Path, str, int]:
    """B + C: rank 0 SIGKILLed inside the step-3 save (after DeepSpeed wrote its files, before `latest`), then
    the same command again (train.resume: auto)."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    args = BASE + [f"train.data_dir={data}", f"train.run_dir={run_dir}"]
    t0 = time.monotonic()
    killed = run(torchrun_cmd(args), CBT_LLM_FAULT="in_save@3:0", WANDB_MODE="offline")
    died_after = time.monotonic() - t0
    assert killed.returncode != 0, killed.log
    latest_after_crash = (run_dir / "checkpoints" / "latest").read_text()
    resumed = run(torchrun_cmd(args), WANDB_MODE="offline")
    assert resumed.returncode == 0, resumed.log
    return run_dir, latest_after_crash, died_after


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory) -> Path:
    """D: LoRA (with gradient checkpointing) under the deepspeed launcher, as users start it on one node:
    `cbt-llm launch deepspeed --gpus-per-node 2` (its script runs `deepspeed --num_gpus 2 ... cbt-llm train`)."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    args = [
        "model.init=random",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "model.lora.dropout=0.0",
        "model.gradient_checkpointing=true",
        "train.max_steps=4",
        "train.log_every=1",
        "train.lr=2e-2",
        f"train.data_dir={data}",
        f"train.run_dir={run_dir}",
    ]
    launch = [str(BIN / "cbt-llm"), "launch", "deepspeed", "--gpus-per-node", "2", "launch.cpu=true"]
    p = run([*launch, f"launch.master_port={free_port()}", *args], PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    assert p.returncode == 0, p.log
    return run_dir


def test_full_run_loss_falls_and_metrics_are_complete(full_run):
    rows = metrics(full_run)
    loss, ev = by_step(rows, "train/loss"), by_step(rows, "eval/loss")
    assert sorted(loss) == [1, 2, 3, 4, 5, 6] and sorted(ev) == [3, 6]
    assert loss[6] < 0.8 * loss[1] and ev[6] < ev[3]
    last = [r for r in rows if r["step"] == 6 and "train/loss" in r][0]
    assert last["perf/mfu"] is None  # CPU: no peak FLOPs in the table, so no made-up MFU
    assert last["perf/tokens_per_s"] > 0 and last["perf/tokens_per_s_per_device"] == pytest.approx(
        last["perf/tokens_per_s"] / 2
    )
    assert 0 < last["perf/packing_efficiency"] <= 1 and last["train/grad_norm"] > 0 and last["mem/peak_gib"] > 0
    lrs = by_step(rows, "train/lr")
    assert lrs[1] == pytest.approx(1e-2) and all(lrs[i + 1] < lrs[i] for i in range(1, 6))  # cosine, no warmup
    summary = json.loads((full_run / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["eval_loss"] == pytest.approx(ev[6])
    assert (full_run / "loss.png").stat().st_size > 1000


def test_wandb_offline_run_holds_the_logged_metrics(full_run):
    run_id = (full_run / "wandb_run_id").read_text().strip()
    files = list((full_run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    hist = read_wandb_history(files[0])
    logged = {h["_step"]: h for h in hist if "train/loss" in h}
    mine = by_step(metrics(full_run), "train/loss")
    assert sorted(logged) == sorted(mine)
    for step, value in mine.items():
        assert logged[step]["train/loss"] == pytest.approx(value, rel=1e-12)
    assert {h["_step"] for h in hist if "eval/loss" in h} == {3, 6}


def test_checkpoints_keep_newest_k_and_record_state(full_run):
    ck = full_run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step-0000005", "step-0000006"]
    assert (ck / "latest").read_text() == "step-0000006"
    state = json.loads((ck / "step-0000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["loader"] == {"epoch": 1, "step_in_epoch": 2} and state["world_size"] == 2
    assert state["wandb_run_id"] == (full_run / "wandb_run_id").read_text().strip()
    assert {f.name for f in (ck / "step-0000006").glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}


def test_full_export_reloads_with_transformers_and_gives_the_engine_eval_loss(full_run, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.export import run_export

    out = tmp_path / "export"
    assert run_export(full_run, out)["kind"] == "full"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == model.config.vocab_size == 600 and (out / "model.safetensors").exists()
    engine_eval = by_step(metrics(full_run), "eval/loss")[6]
    assert hf_eval_loss(model, data) == pytest.approx(engine_eval, rel=1e-5)


def test_crash_in_save_keeps_previous_checkpoint_and_resume_reproduces_the_run(full_run, resumed_run):
    run_dir, latest_after_crash, died_after = resumed_run
    assert latest_after_crash == "step-0000002"  # the half-written step-3 folder never became `latest`
    assert died_after < 120  # the surviving rank did not hang on the dead one
    ref, got = by_step(metrics(full_run), "train/loss"), by_step(metrics(run_dir), "train/loss")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(3, 7):  # computed after the resume: must equal the uninterrupted run
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (step, got[step], ref[step])
    assert by_step(metrics(run_dir), "eval/loss")[6] == pytest.approx(
        by_step(metrics(full_run), "eval/loss")[6], abs=1e-5
    )
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["resumed_from"] == "step-0000002"


def test_resumed_run_continues_the_same_wandb_run(resumed_run):
    run_dir, _, _ = resumed_run
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # the killed attempt and the resumed one, under one W&B run id
    second = {h["_step"]: h["train/loss"] for h in read_wandb_history(files[1]) if "train/loss" in h}
    assert sorted(second) == [3, 4, 5, 6]
    assert second == {k: v for k, v in by_step(metrics(run_dir), "train/loss").items() if k >= 3}


def test_each_example_seen_exactly_once_per_epoch_across_the_resume(resumed_run, full_run, data):
    run_dir, _, _ = resumed_run
    seen: dict[int, dict[int, list[str]]] = {}  # step -> rank -> rows (a replayed step keeps its last record)
    for rank in (0, 1):
        for line in (run_dir / "order" / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            seen.setdefault(rec["step"], {})[rank] = rec["rows"]
    m = load_manifest(data)
    all_rows = sorted(f"{s['path']}:{i}" for s in m["splits"]["train"]["shards"] for i in range(s["rows"]))
    epoch0 = sorted(r for step in (1, 2, 3, 4) for rank in (0, 1) for r in seen[step][rank])
    assert epoch0 == all_rows  # 16 rows, each exactly once
    epoch1 = [r for step in (5, 6) for rank in (0, 1) for r in seen[step][rank]]
    assert len(set(epoch1)) == len(epoch1) == 8
    ref = [json.loads(ln) for ln in (full_run / "order" / "rank1.jsonl").read_text().splitlines()]
    assert [seen[r["step"]][1] for r in ref] == [r["rows"] for r in ref]  # same order as the uninterrupted run


def test_launch_deepspeed_records_the_single_node_launch(lora_run):
    launched = json.loads((lora_run / "launch" / "deepspeed.json").read_text())
    assert launched["exit_code"] == 0 and launched["world_size"] == 2 and launched["launcher"] == "deepspeed"
    assert "--num_gpus 2" in (lora_run / "launch" / "deepspeed.sh").read_text()
    summary = json.loads((lora_run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert (lora_run / "checkpoints" / "latest").read_text().strip() == "step-0000004"


def test_lora_changes_only_adapter_weights(lora_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    sd = get_fp32_state_dict_from_zero_checkpoint(str(lora_run / "checkpoints"), tag="step-0000004")
    base = load_file(lora_run / "base_model" / "model.safetensors")
    adapters = {k: v for k, v in sd.items() if ".lora_" in k}
    frozen = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in sd.items() if ".lora_" not in k
    }
    assert set(frozen) == set(base) and adapters
    for k, v in frozen.items():
        assert torch.equal(v, base[k]), k
    assert all(v.abs().max() > 0 for k, v in adapters.items() if ".lora_B." in k)  # B starts at zero: it trained
    losses = by_step(metrics(lora_run), "train/loss")
    assert losses[4] < losses[1]


def test_lora_exports_reload_with_peft_and_transformers(lora_run, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.export import run_export

    engine_eval = by_step(metrics(lora_run), "eval/loss")[4]
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert run_export(lora_run, adapter)["kind"] == "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "model.safetensors").exists()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    base_loss = hf_eval_loss(base.eval(), data)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    assert hf_eval_loss(peft_model, data) == pytest.approx(engine_eval, rel=1e-5)
    assert run_export(lora_run, merged, merge_lora=True)["kind"] == "merged"
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert hf_eval_loss(merged_model, data) == pytest.approx(engine_eval, rel=1e-4)
    assert base_loss - engine_eval > 1e-3  # the adapter really changed the model


def test_sigterm_to_one_rank_checkpoints_all_and_exits_with_requeue_code(data, tmp_path):
    """E: SIGTERM reaches rank 1 only; both ranks stop at the same step, save, and the launcher exits 85."""
    run_dir = tmp_path / "run"
    args = [
        "model.init=random",
        "train.max_steps=100000",
        "train.log_every=1",
        f"train.data_dir={data}",
        f"train.run_dir={run_dir}",
    ]
    proc = subprocess.Popen(
        deepspeed_cmd(args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            mf = run_dir / "metrics.jsonl"
            if mf.exists() and len(mf.read_text().splitlines()) >= 2:
                break
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.2)
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "cbt-llm" in " ".join(c.cmdline())]
        rank1 = [w for w in workers if w.environ().get("RANK") == "1"]
        assert len(rank1) == 1, [w.cmdline() for w in workers]
        rank1[0].send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 85, out[-4000:]
    requeue = json.loads((run_dir / "requeue.json").read_text())
    tag = (run_dir / "checkpoints" / "latest").read_text()
    state = json.loads((run_dir / "checkpoints" / tag / "trainer_state.json").read_text())
    assert requeue["signal"] == "SIGTERM" and requeue["exit_code"] == 85
    assert state["stopped_by_signal"] == "SIGTERM" and state["step"] == requeue["step"] >= 2
    assert tag == f"step-{requeue['step']:07d}"
    assert {f.name for f in (run_dir / "checkpoints" / tag).glob("zero_pp_rank_*_model_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
    }


def test_step_loss_and_grad_norm_are_global_sum_over_global_label_count(full_run, data):
    """Step 1 of the 2-rank, 2-micro-batch run equals one process computing sum(CE) / count over the same 4 rows:
    the count is global (ranks x accumulation) and DeepSpeed's averaging over ranks is undone."""
    from transformers import AutoModelForCausalLM

    from train.data import rank_shards

    model = AutoModelForCausalLM.from_pretrained(full_run / "base_model", dtype=torch.float32)
    m = load_manifest(data)
    total, count = torch.zeros(()), 0
    for rank in (0, 1):
        rows = read_rows(data, rank_shards(m, "train", rank, 2), 0)
        first = json.loads((full_run / "order" / f"rank{rank}.jsonl").read_text().splitlines()[0])
        assert first["step"] == 1 and len(first["rows"]) == 2
        for key in first["rows"]:
            b = collate(rows, [rows.keys.index(key)], 0)
            s, c = masked_ce_sum(
                model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits,
                b["labels"],
                b["position_ids"],
            )
            total, count = total + s, count + c
    loss = total / count
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    step1 = [r for r in metrics(full_run) if r["step"] == 1][0]
    assert step1["train/loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert step1["train/grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)  # before clipping


def test_run_names_its_optimizer_and_zero3_keeps_partitioned_fp32_master_weights(full_run):
    """ZeRO-3 with the torch AdamW handed in as a client optimizer: the optimizer steps this rank's fp32
    partition (about half of the weights on each of 2 ranks), not a full copy; the summary says what ran."""
    s = json.loads((full_run / "train_summary.json").read_text())
    assert s["optimizer"].startswith("torch AdamW (foreach)") and s["master_weights_dtype"] == "float32"
    half = s["params_trainable"] / 2
    assert half <= s["master_weights_numel_rank0"] < half * 1.05  # partitions are padded to the world size
    assert s["loss_chunk_tokens"] == 1024 and s["activation_checkpointing"] == "off"


# ---- the generation eval during training (issue 11): run A's step-6 metrics against `cbt-llm eval` ----------


@pytest.fixture(scope="module")
def trained(full_run, data, tmp_path_factory) -> dict:
    """`cbt-llm eval` on run A's exported step-6 checkpoint with the same questions and generation settings."""
    root = tmp_path_factory.mktemp("gen_eval")
    export = root / "export"
    run_export(full_run, export)
    questions = full_run.parent / "questions.jsonl"
    out = root / "eval"
    cli = [str(BIN / "cbt-llm"), "eval", "--model", str(export), "--questions", str(questions), "--out", str(out)]
    e = run([*cli, *GEN, "eval.bootstrap_resamples=0", "eval.safety_probes=false", f"eval.data_dir={data}"])
    assert e.returncode == 0, e.log
    return {"run": full_run, "eval": out}


def test_logged_generation_metrics_equal_cbt_llm_eval_on_the_checkpoint(trained):
    results = json.loads((trained["eval"] / "results.json").read_text())
    (model,) = results["models"].values()
    expected = {f"gen/{k}": m["score"] for k, m in model["metrics"].items() if m.get("score") is not None}
    rows = metrics(trained["run"])
    logged = {k: by_step(rows, k)[6] for k in expected}
    assert {"gen/bleu-4", "gen/rouge-l", "gen/structure-coverage", "gen/distinct-2"} <= set(expected), expected
    assert logged == pytest.approx(expected, abs=1e-9)
    assert by_step(rows, "gen/new_tokens")[6] == model["generation"]["new_tokens"] > 0
    assert model["generation"]["batches"] == 5  # the same plan in training: rank 0 runs 3, rank 1 2 + a filler


def test_the_answers_are_the_same_text_and_written_per_step(trained):
    during = [json.loads(ln) for ln in (trained["run"] / "gen_eval" / "step_0000006.jsonl").read_text().splitlines()]
    after = [json.loads(ln) for ln in (trained["eval"] / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in during] == ["q0", "q1", "q2", "q3", "q4"]
    assert [r["output"] for r in during] == [r["output"] for r in after]
    assert all(r["structure"]["coverage"] == a["structure"]["coverage"] for r, a in zip(during, after))


def test_gen_eval_every_without_the_cli_hook_fails_with_one_line(tmp_path):
    from cbt_llm.core.config import load_config
    from cbt_llm.core.errors import ConfigError
    from train.recipe import _check_gen_eval

    cfg = load_config(None, ["train.gen_eval_every=5"])
    with pytest.raises(ConfigError, match=r"^train.gen_eval_every: .* set train.gen_eval_every=0 here$"):
        _check_gen_eval(cfg, None)
    assert _check_gen_eval(load_config(None, []), None) is None


def test_ray_jobs_refuse_gen_eval_every_before_any_work():
    from cbt_llm.core.config import load_config
    from cbt_llm.core.errors import ConfigError
    from launch.preflight import preflight

    cfg = load_config(None, ["train.gen_eval_every=5", "model.init=random"])
    with pytest.raises(ConfigError, match=r"^train.gen_eval_every: not available in Ray jobs"):
        preflight(cfg, "ray")


def test_samples_table_in_metrics_jsonl_and_wandb(trained):
    (line,) = [r for r in metrics(trained["run"]) if "gen/samples" in r]
    during = [json.loads(ln) for ln in (trained["run"] / "gen_eval" / "step_0000006.jsonl").read_text().splitlines()]
    assert line["step"] == 6 and [s["id"] for s in line["gen/samples"]] == ["q0", "q1", "q2"]  # eval.examples=3
    assert [s["answer"] for s in line["gen/samples"]] == [r["output"] for r in during[:3]]
    run_id = (trained["run"] / "wandb_run_id").read_text().strip()
    (wandb_file,) = (trained["run"] / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history = [h for h in read_wandb_history(wandb_file) if "gen/samples/_type" in h]  # nested keys come flattened
    assert history and history[0]["gen/samples/_type"] == "table-file" and history[0]["gen/samples/nrows"] == 3
    assert history[0]["gen/rouge-l"] == pytest.approx(line["gen/rouge-l"])
