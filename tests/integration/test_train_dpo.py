"""Preference optimisation end to end (train.objective=dpo): 2 CPU ranks (gloo) under ZeRO-3 through the real CLI.

Tiny preference shards (tests/fixtures/tiny.py make_preference_shards: 2 train shards of 2 packed rows, so under
2 ranks x 2 micro-batches, or 1 rank x 4, every optimizer step sees every row: the two runs must agree). Five
launches: A full fine-tune, sigmoid, 2 ranks under torchrun (it computes the reference store); B the same on 1 rank
(reuses it); C = A killed with SIGKILL after step 2 and resumed; D LoRA, ipo, from an SFT adapter
(model.lora.init_adapter) under `cbt-llm launch deepspeed`. Exports of A (a model) and D (a non-empty adapter, and
merged) reload with transformers/peft and give the logged eval log-probabilities.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_e2e import BIN, by_step, metrics, run, torchrun_cmd  # noqa: E402  (tests/integration on sys.path)

from tests.fixtures.tiny import make_preference_shards, write_chat_tokenizer, write_tiny_qwen2
from tests.fixtures.train import free_port
from train.data import PAIR_COLUMNS, collate, load_manifest, rank_shards, read_rows, sequence_spans
from train.export import run_export

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

DPO = [
    "model.init=random",
    "train.objective=dpo",
    "train.dpo.beta=0.5",
    "train.max_steps=4",
    "train.log_every=1",
    "train.lr=1e-2",
    "train.save_every=1",
    "train.keep_last=2",
    "train.eval_every=2",
    "train.record_order=true",
    "train.seed=1",
]
REWARDS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # recorded with a chat tokenizer (its vocabulary covers the fixture's ids): `cbt-llm launch` wants a template
    root = tmp_path_factory.mktemp("dpo_data")
    tok = write_chat_tokenizer(root / "chat_tokenizer")
    return make_preference_shards(root / "data", rows_per_shard=2, train_shards=2, val_rows=2, tokenizer_dir=tok)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "train_summary.json").read_text())


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory) -> Path:
    """A: 2 ranks x 2 micro-batches, ZeRO-3, full fine-tuning, sigmoid (the reference store is computed here)."""
    run_dir = tmp_path_factory.mktemp("dpo_full") / "run"
    p = run(torchrun_cmd(DPO + ["train.grad_accum=2", f"train.data_dir={data}", f"train.run_dir={run_dir}"]))
    assert p.returncode == 0, p.log
    return run_dir


@pytest.fixture(scope="module")
def one_rank_run(data, full_run, tmp_path_factory) -> Path:
    """B: the same steps on 1 rank x 4 micro-batches (after A: the reference store is there)."""
    run_dir = tmp_path_factory.mktemp("dpo_one") / "run"
    cmd = torchrun_cmd(DPO + ["train.grad_accum=4", f"train.data_dir={data}", f"train.run_dir={run_dir}"])
    cmd[cmd.index("--nproc_per_node") + 1] = "1"
    p = run(cmd)
    assert p.returncode == 0, p.log
    return run_dir


@pytest.fixture(scope="module")
def resumed_run(data, full_run, tmp_path_factory) -> tuple[Path, str]:
    """C: rank 1 SIGKILLed after step 2 (before that step's save), then the same command again."""
    run_dir = tmp_path_factory.mktemp("dpo_resume") / "run"
    args = DPO + ["train.grad_accum=2", f"train.data_dir={data}", f"train.run_dir={run_dir}"]
    killed = run(torchrun_cmd(args), CBT_LLM_FAULT="after_step@2:1")
    assert killed.returncode != 0, killed.log
    latest = (run_dir / "checkpoints" / "latest").read_text()
    resumed = run(torchrun_cmd(args))
    assert resumed.returncode == 0, resumed.log
    return run_dir, latest


def test_dpo_run_logs_trl_metrics_and_learns(full_run):
    rows = metrics(full_run)
    loss = by_step(rows, "train/loss")
    assert sorted(loss) == [1, 2, 3, 4] and loss[1] == pytest.approx(np.log(2), abs=1e-6)  # policy = reference
    step1 = [r for r in rows if r["step"] == 1][0]
    assert step1["rewards/chosen"] == pytest.approx(0, abs=1e-6) and step1["rewards/margins"] == pytest.approx(
        0, abs=1e-6
    )
    last = [r for r in rows if r["step"] == 4][0]
    assert set(REWARDS) <= set(last) and last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > 0.5
    assert loss[4] < 0.6 * loss[1] and last["logps/chosen"] > step1["logps/chosen"]
    assert last["perf/tokens_per_s"] > 0 and last["perf/mfu"] is None and 0 < last["perf/packing_efficiency"] <= 1
    assert sorted(by_step(rows, "eval/rewards/accuracies")) == [2, 4]
    assert {f"eval/{k}" for k in REWARDS} <= set(last) and last["eval/loss"] < by_step(rows, "eval/loss")[2]
    s = _summary(full_run)
    assert s["objective"] == "dpo" and s["dpo_loss"] == "sigmoid" and s["reference"] == "precomputed"
    assert s["reference_reused"] is False and s["last_rewards_accuracies"] == 1.0
    assert s["eval_rewards_accuracies"] == last["eval/rewards/accuracies"]
    state = json.loads((full_run / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["objective"] == "dpo"


def test_two_ranks_under_zero3_equal_one_rank(full_run, one_rank_run):
    """Loss, gradient norm, rewards and eval of every step: the pair count is global over ranks and micro-batches."""
    a, b = metrics(full_run), metrics(one_rank_run)
    for key in ["train/loss", "train/grad_norm", *REWARDS, "eval/loss", "eval/rewards/margins"]:
        ra, rb = by_step(a, key), by_step(b, key)
        assert sorted(ra) == sorted(rb) and ra, key
        for step in ra:
            assert rb[step] == pytest.approx(ra[step], abs=1e-5, rel=1e-5), (key, step, ra[step], rb[step])
    assert _summary(one_rank_run)["world_size"] == 1
    assert _summary(one_rank_run)["reference_reused"] is True  # the same starting model: A's store


def _direct_logps(model, rows, idx) -> list[tuple[float, float]]:
    """(logp, avg) of each sequence of the rows, each run alone through `model`."""
    out = []
    with torch.no_grad():
        for i in idx:
            ids, labels, _ = rows.row(i)
            for a, b in sequence_spans(rows, i):
                x = torch.from_numpy(ids[a:b].astype(np.int64))[None]
                logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
                t = torch.from_numpy(labels[a + 1 : b].astype(np.int64))
                keep = t != -100
                lp = torch.log_softmax(logits, -1)[keep].gather(1, t[keep][:, None]).sum().item()
                out.append((lp, lp / int(keep.sum())))
    return out


def test_reference_store_holds_the_starting_model_s_log_probs(full_run, data):
    """The distributed pass (2 ranks, ZeRO-3) wrote every train and validation sequence's reference, equal to a
    direct computation with the starting model; reference.json names that model and its hash."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    folder = Path(_summary(full_run)["reference_store"])
    meta = json.loads((folder / "reference.json").read_text())
    assert folder.parent == data / "reference" and meta["model"] == str(full_run / "base_model")
    model = AutoModelForCausalLM.from_pretrained(full_run / "base_model", dtype=torch.float32).eval()
    m = load_manifest(data)
    for split in ("train", "validation"):
        for shard in m["splits"][split]["shards"]:
            rows = read_rows(data, [shard], 0, PAIR_COLUMNS)
            want = _direct_logps(model, rows, range(len(rows)))
            t = pq.read_table(folder / shard["path"])
            got = [v for r in range(t.num_rows) for v in zip(t["ref_logps"][r].as_py(), t["ref_avg"][r].as_py())]
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_kill_9_mid_run_resumes_to_the_same_losses(full_run, resumed_run):
    run_dir, latest_after_crash = resumed_run
    assert latest_after_crash == "step-0000001"
    ref, got = metrics(full_run), metrics(run_dir)
    for key in ["train/loss", *REWARDS]:
        a, b = by_step(ref, key), by_step(got, key)
        assert sorted(b) == [1, 2, 3, 4]
        for step in (2, 3, 4):  # computed after the resume
            assert b[step] == pytest.approx(a[step], abs=1e-5), (key, step, b[step], a[step])
    s = _summary(run_dir)
    assert s["resumed_from"] == "step-0000001" and s["reference_reused"] is True
    assert s["eval_loss"] == pytest.approx(_summary(full_run)["eval_loss"], abs=1e-5)


def _eval_logps(model, data) -> float:
    """The mean over validation pairs of logp(chosen), each sequence alone (the sigmoid run's eval/logps/chosen)."""
    m = load_manifest(data)
    rows = read_rows(data, m["splits"]["validation"]["shards"], 0, PAIR_COLUMNS)
    vals = _direct_logps(model, rows, range(len(rows)))
    return float(np.mean([lp for lp, _ in vals[0::2]]))


def test_full_dpo_export_is_a_model_with_the_logged_eval(full_run, data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    assert run_export(full_run, out)["kind"] == "full"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    logged = by_step(metrics(full_run), "eval/logps/chosen")[4]
    assert _eval_logps(model, data) == pytest.approx(logged, abs=1e-4)
    assert "Preference optimisation (train.objective dpo, loss sigmoid" in (out / "README.md").read_text()


# ---- LoRA from an SFT adapter, under the deepspeed launcher ---------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory) -> dict:
    """D: a tiny base, an "SFT" adapter on it (lora_B set away from zero), then LoRA ipo DPO from that adapter
    (`cbt-llm launch deepspeed --gpus-per-node 2`, ZeRO-3)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("dpo_lora")
    base = write_tiny_qwen2(root / "base", load_manifest(data)["tokenizer"]["name_or_path"], hidden=32, init_std=0.2)
    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, p in sft.named_parameters():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    sft.save_pretrained(root / "sft_adapter")
    run_dir = root / "run"
    args = [
        "model.init=pretrained",
        f"model.name_or_path={base}",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "model.lora.dropout=0.0",
        f"model.lora.init_adapter={root / 'sft_adapter'}",
        "train.objective=dpo",
        "train.dpo.loss=ipo",
        "train.max_steps=3",
        "train.log_every=1",
        "train.lr=5e-2",
        "train.record_order=true",
        f"train.data_dir={data}",
        f"train.run_dir={run_dir}",
    ]
    launch = [str(BIN / "cbt-llm"), "launch", "deepspeed", "--gpus-per-node", "2", "launch.cpu=true"]
    import os

    p = run([*launch, f"launch.master_port={free_port()}", *args], PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    assert p.returncode == 0, p.log
    return {"run": run_dir, "base": base, "sft": root / "sft_adapter"}


def _step_rows(run_dir: Path, data: Path, step: int):
    """The rows each rank trained on at `step` (train.record_order), with their PackedRows."""
    m = load_manifest(data)
    out = []
    for rank in (0, 1):
        rows = read_rows(data, rank_shards(m, "train", rank, 2), 0, PAIR_COLUMNS)
        rec = [json.loads(ln) for ln in (run_dir / "order" / f"rank{rank}.jsonl").read_text().splitlines()]
        keys = [r for r in rec if r["step"] == step][0]["rows"]
        out.append((rows, [rows.keys.index(k) for k in keys]))
    return out


def test_lora_reference_is_the_sft_model_not_the_base(lora_run, data):
    """At step 1 the fresh adapter is zero, so the policy is its reference: rewards 0. logps/chosen (ipo: per-token
    means) is then the SFT model's (base + SFT adapter) on that step's rows, not the bare base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = metrics(lora_run["run"])
    step1 = [r for r in rows if r["step"] == 1][0]
    assert step1["rewards/chosen"] == pytest.approx(0, abs=1e-6) == step1["rewards/rejected"]
    assert step1["train/loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-6)  # ipo at h = 0, beta 0.1
    base = AutoModelForCausalLM.from_pretrained(lora_run["base"], dtype=torch.float32).eval()
    sft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(lora_run["base"], dtype=torch.float32), lora_run["sft"]
    ).eval()

    def chosen_avg(model) -> float:
        vals = [v for rows_, idx in _step_rows(lora_run["run"], data, 1) for v in _direct_logps(model, rows_, idx)]
        return float(np.mean([avg for _, avg in vals[0::2]]))

    assert step1["logps/chosen"] == pytest.approx(chosen_avg(sft), abs=1e-5)
    assert abs(step1["logps/chosen"] - chosen_avg(base)) > 1e-2
    s = _summary(lora_run["run"])
    assert s["reference"] == "adapters_off" and s["reference_store"] is None and s["lora"] is True
    last = by_step(rows, "rewards/margins")
    assert last[3] > 0  # it learned to prefer the chosen answers
    launched = json.loads((lora_run["run"] / "launch" / "deepspeed.json").read_text())
    assert launched["exit_code"] == 0 and launched["world_size"] == 2


def test_lora_dpo_exports_a_non_empty_adapter_and_a_merged_model(lora_run, data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    summary = run_export(lora_run["run"], adapter)
    assert summary["kind"] == "adapter" and Path(summary["base_model"]) == (lora_run["run"] / "base_merged").resolve()
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32), adapter
    ).eval()
    m = load_manifest(data)
    val = read_rows(data, m["splits"]["validation"]["shards"], 0, PAIR_COLUMNS)
    logged = by_step(metrics(lora_run["run"]), "eval/logps/chosen")[3]
    avg = [a for _, a in _direct_logps(peft_model, val, range(len(val)))[0::2]]
    assert float(np.mean(avg)) == pytest.approx(logged, abs=1e-5)
    assert run_export(lora_run["run"], merged, merge_lora=True)["kind"] == "merged"
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    avg = [a for _, a in _direct_logps(merged_model, val, range(len(val)))[0::2]]
    assert float(np.mean(avg)) == pytest.approx(logged, abs=1e-4)
    _ = collate  # (collate is what the engine used; the direct computation above is independent of it)
