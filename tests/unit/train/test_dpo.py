"""Preference optimisation (train.objective=dpo), in process: the packed loss and gradients equal the unpacked ones
for every loss type, the LoRA reference is the adapter-off model (the SFT model with model.lora.init_adapter), the
full fine-tuning reference store holds a direct computation and is reused or recomputed by hash, and the configs
and shards a preference run refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cbt_llm.core.config import load_config
from cbt_llm.core.config.train import DpoConfig
from cbt_llm.core.errors import ConfigError
from tests.fixtures.tiny import make_preference_shards
from train.data import PAIR_COLUMNS, collate, load_manifest, read_rows, sequence_spans
from train.dpo import Preference, check_objective, pair_losses, sequence_logps
from train.model import random_model_config

LOSSES = ["sigmoid", "ipo", "simpo", "orpo"]


class Engine:
    """What train.dpo needs of a DeepSpeed engine (device, module, forward) around a plain model."""

    def __init__(self, model):
        self.module, self.device = model, torch.device("cpu")

    def __call__(self, **kw):
        return self.module(**kw)

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_preference_shards(tmp_path_factory.mktemp("pref"), rows_per_shard=3, train_shards=2, val_rows=2)


def _model(seed: int = 0, attn: str = "sdpa_varlen"):
    from transformers import AutoModelForCausalLM

    from train.attention import register

    register()
    torch.manual_seed(seed)
    cfg = random_model_config(load_config().model, 96, 64, 0, 0)
    cfg.initializer_range = 0.2  # logits far enough from uniform that packing mistakes would show
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)


def _sequences(rows, idx) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, labels) of every sequence of the rows, in order: cut from the rows, each to be run on its own."""
    out = []
    for i in idx:
        ids, labels, _ = rows.row(i)
        out += [(ids[a:b], labels[a:b]) for a, b in sequence_spans(rows, i)]
    return out


def _alone(model, seqs) -> torch.Tensor:
    """logp(s) of each sequence run alone (no packing, no padding): a direct log_softmax over its logits."""
    out = []
    for ids, labels in seqs:
        logits = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], use_cache=False).logits[0, :-1]
        target = torch.from_numpy(labels[1:].astype(np.int64))
        keep = target != -100
        out.append(torch.log_softmax(logits.float(), -1)[keep].gather(1, target[keep][:, None]).sum())
    return torch.stack(out)


def _trl_loss(logp, n, ref, dc) -> torch.Tensor:
    """TRL's definitions (README, train.objective dpo), written out again, per pair."""
    lc, lr, nc, nr = logp[0::2].double(), logp[1::2].double(), n[0::2], n[1::2]
    ac, ar = lc / nc, lr / nr
    if dc.loss == "sigmoid":
        h = dc.beta * ((lc - ref[0::2, 0]) - (lr - ref[1::2, 0]))
        return -(1 - dc.label_smoothing) * F.logsigmoid(h) - dc.label_smoothing * F.logsigmoid(-h)
    if dc.loss == "ipo":
        h = (ac - ref[0::2, 0] / nc) - (ar - ref[1::2, 0] / nr)
        return (h - 1 / (2 * dc.beta)) ** 2
    if dc.loss == "simpo":
        return -F.logsigmoid(dc.beta * (ac - ar) - dc.simpo_gamma)
    odds = (ac - torch.log1p(-torch.exp(ac))) - (ar - torch.log1p(-torch.exp(ar)))
    return -ac - dc.orpo_lambda * F.logsigmoid(odds)


@pytest.mark.parametrize("loss", LOSSES)
def test_packed_loss_and_gradients_equal_the_unpacked_ones(data, loss):
    """Two packed rows (several pairs each, padded to one width) through the chunked-loss path, against every
    sequence run alone with TRL's formula: the same loss and the same gradient of every weight (1e-5)."""
    m = load_manifest(data)
    rows = read_rows(data, m["splits"]["train"]["shards"], 0, PAIR_COLUMNS)
    idx = [0, 3]
    assert rows.pairs[idx].sum() >= 4 and len(rows.row(0)[0]) != len(rows.row(3)[0])
    extra = {"label_smoothing": 0.1} if loss == "sigmoid" else {}
    dc = DpoConfig(loss=loss, beta=0.5, **extra)
    model, ref_model = _model(0), _model(1)
    seqs = _sequences(rows, idx)
    n = torch.tensor([float((lab[1:] != -100).sum()) for _, lab in seqs], dtype=torch.float64)
    with torch.no_grad():
        ref_logp = _alone(ref_model, seqs).double()
    ref = torch.stack([ref_logp, ref_logp / n], 1)

    batch = collate(rows, idx, 0)
    assert batch["pairs"] == len(seqs) // 2 and torch.equal(batch["seq_tokens"], n)
    engine = Engine(model)
    packed, _ = pair_losses(sequence_logps(engine, batch, chunk_tokens=16, chunk_positions=128), n, ref, dc)
    (packed.sum() / batch["pairs"]).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    alone = _trl_loss(_alone(model, seqs), n, ref, dc)
    (alone.sum() / len(alone)).backward()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, atol=1e-5, rtol=1e-5, msg=k)
    assert max(g.abs().max() for g in grads.values()) > 1e-3  # a real gradient, not zeros on both sides


def test_full_logits_path_and_unpacked_shards_agree(tmp_path):
    """The full-logits path (train.loss_chunk_tokens=0) on data.packing=false shards (one pair per padded row)."""
    out = make_preference_shards(tmp_path / "padded", packing=False, rows_per_shard=2, train_shards=1, val_rows=1)
    rows = read_rows(out, load_manifest(out)["splits"]["train"]["shards"], 0, PAIR_COLUMNS)
    assert list(rows.pairs) == [1, 1] and all(len(rows.row(i)[0]) == 64 for i in range(2))
    model = _model(2)
    seqs = _sequences(rows, [0, 1])
    with torch.no_grad():
        got = sequence_logps(Engine(model), collate(rows, [0, 1], 0))
        torch.testing.assert_close(got, _alone(model, seqs), atol=1e-5, rtol=1e-5)


def test_metrics_are_trl_s(data):
    """rewards = beta x (logp - ref) for sigmoid; accuracies count chosen rewards above rejected."""
    logp = torch.tensor([-10.0, -12.0, -8.0, -7.0])
    n = torch.tensor([5.0, 6.0, 4.0, 7.0])
    ref = torch.tensor([[-11.0, 0], [-11.0, 0], [-8.0, 0], [-8.0, 0]])
    loss, m = pair_losses(logp, n, ref, DpoConfig(beta=0.1))
    assert m["rewards/chosen"].tolist() == pytest.approx([0.1, 0.0])
    assert m["rewards/rejected"].tolist() == pytest.approx([-0.1, 0.1])
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0] and m["logps/chosen"].tolist() == [-10.0, -8.0]
    assert loss.tolist() == pytest.approx([-math.log(1 / (1 + math.exp(-0.2))), -math.log(1 / (1 + math.exp(0.1)))])


# ---- the LoRA reference ---------------------------------------------------------------------------------------


def _perturbed_lora(model, seed: int, r: int = 4):
    """A LoRA model whose adapters change the output (lora_B set away from its zero init)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm


def test_lora_reference_is_the_adapter_off_model_and_with_init_adapter_the_sft_model(data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.model import write_merged_base

    rows = read_rows(data, load_manifest(data)["splits"]["validation"]["shards"], 0, PAIR_COLUMNS)
    batch = collate(rows, [0, 1], 0)
    pref = Preference(DpoConfig(loss="sigmoid"), lora=True)
    assert pref.reference == "adapters_off"

    def logps(model):
        with torch.no_grad():
            return sequence_logps(Engine(model), batch)

    # a plain base with LoRA on top: the reference is the base, not the adapted model
    base_dir = tmp_path / "base"
    _model(3).save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_logps = logps(base)
    adapted = _perturbed_lora(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), 0).eval()
    ref = pref.reference_of(Engine(adapted), batch, 0, 0)
    torch.testing.assert_close(ref[:, 0], base_logps.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ref[:, 1], base_logps.double() / batch["seq_tokens"], atol=1e-6, rtol=1e-6)
    assert (logps(adapted) - base_logps).abs().max() > 1e-2

    # model.lora.init_adapter: an SFT adapter merged into the base, a fresh adapter trained on top
    sft_dir = tmp_path / "sft_adapter"
    adapted.save_pretrained(sft_dir)
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), sft_dir)
    sft_logps = logps(sft.eval())
    merged_dir = write_merged_base(
        str(base_dir), str(sft_dir), tmp_path / "merged", dtype=torch.float32, trust_remote_code=False
    )
    stamp = (merged_dir / "model.safetensors").stat().st_mtime_ns
    write_merged_base(str(base_dir), str(sft_dir), merged_dir, dtype=torch.float32, trust_remote_code=False)
    assert (merged_dir / "model.safetensors").stat().st_mtime_ns == stamp  # kept: same base, same adapter
    fresh = _perturbed_lora(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32), 1).eval()
    ref = pref.reference_of(Engine(fresh), batch, 0, 0)
    torch.testing.assert_close(ref[:, 0], sft_logps.double(), atol=1e-5, rtol=1e-5)  # the SFT model...
    assert (ref[:, 0] - base_logps.double()).abs().max() > 1e-2  # ...never the bare base
    assert (logps(fresh) - sft_logps).abs().max() > 1e-2  # and the policy is not its reference


# ---- the full fine-tuning reference store ----------------------------------------------------------------------


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_reference_store_is_a_direct_computation_reused_and_recomputed_by_hash(data, tmp_path, one_rank):
    import shutil

    import pyarrow.parquet as pq

    from train.reference import REFERENCE_DIR, ensure_reference

    d = tmp_path / "data"
    shutil.copytree(data, d)
    man = load_manifest(d)
    rows = read_rows(d, man["splits"]["train"]["shards"], 0, PAIR_COLUMNS)
    val = read_rows(d, man["splits"]["validation"]["shards"], 0, PAIR_COLUMNS)
    model_dir = tmp_path / "model"
    model = _model(4)
    model.save_pretrained(model_dir)
    engine = Engine(model)
    calls = []

    def logps(batch):
        calls.append(1)
        return sequence_logps(engine, batch, chunk_tokens=16, chunk_positions=128)

    kw = dict(data_dir=d, manifest=man, dtype="float32", rank=0, world=1, micro_batch_size=2, pad_token_id=0)
    folder, reused = ensure_reference(engine, rows, val, model=str(model_dir), logps=logps, say=lambda *a: None, **kw)
    assert not reused and calls and folder.parent == d / REFERENCE_DIR
    meta = json.loads((folder / "reference.json").read_text())
    assert (
        meta["model"] == str(model_dir)
        and len(meta["model_hash"]) == 64
        and set(meta["shards"])
        == {s["path"] for split in ("train", "validation") for s in man["splits"][split]["shards"]}
    )
    # the stored values are each sequence run alone through the model, row for row
    for part, r in ((rows, rows), (val, val)):
        seqs = _sequences(r, range(len(r)))
        with torch.no_grad():
            direct = _alone(model, seqs).double().numpy()
        n = np.array([(lab[1:] != -100).sum() for _, lab in seqs])
        np.testing.assert_allclose(part.ref[:, 0], direct, atol=1e-4, rtol=1e-6)
        np.testing.assert_allclose(part.ref[:, 1], direct / n, atol=1e-5, rtol=1e-6)
    first = man["splits"]["train"]["shards"][0]["path"]
    t = pq.read_table(folder / first)
    assert t.column_names == ["ref_logps", "ref_avg"] and t.num_rows == 3
    assert len(t["ref_logps"][0].as_py()) == 2 * rows.pairs[0]

    # the same model again (a resume, another run): reused, nothing computed
    calls.clear()
    rows2 = read_rows(d, man["splits"]["train"]["shards"], 0, PAIR_COLUMNS)
    folder2, reused = ensure_reference(engine, rows2, val, model=str(model_dir), logps=logps, say=lambda *a: None, **kw)
    assert reused and folder2 == folder and not calls and np.array_equal(rows2.ref, rows.ref)

    # another starting model: its own key, computed again; the first stays
    other_dir = tmp_path / "other"
    _model(5).save_pretrained(other_dir)
    folder3, reused = ensure_reference(engine, rows2, val, model=str(other_dir), logps=logps, say=lambda *a: None, **kw)
    assert not reused and calls and folder3 != folder and (folder / "reference.json").is_file()

    # a store whose record no longer matches (edited, or half-written by a killed run) is computed again
    meta["model_hash"] = "0" * 64
    (folder / "reference.json").write_text(json.dumps(meta))
    calls.clear()
    _, reused = ensure_reference(engine, rows2, val, model=str(model_dir), logps=logps, say=lambda *a: None, **kw)
    assert not reused and calls
    assert not list((d / REFERENCE_DIR).glob(".*.partial"))


# ---- what a preference run refuses ------------------------------------------------------------------------------


def test_objective_and_shards_must_match(data, tmp_path, capsys):
    from cbt_llm.cli import main as cli_main
    from tests.fixtures.train import make_shards

    with pytest.raises(ConfigError, match=r"^train.objective=dpo needs preference shards, .* set train.objective=sft$"):
        check_objective("dpo", {"format": "cbt"}, "runs/x/data")
    with pytest.raises(ConfigError, match=r"^train.objective=sft needs sft shards"):
        check_objective("sft", load_manifest(data), data)
    check_objective("dpo", load_manifest(data), data)
    sft = make_shards(tmp_path / "sft", rows_per_shard=2, train_shards=2, val_rows=1)
    assert cli_main(["train", f"train.data_dir={sft}", "train.objective=dpo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.objective=dpo" in err and str(sft) in err
    assert cli_main(["train", f"train.data_dir={data}", "train.objective=dpo", "model.lora.init_adapter=/x"]) == 2
    assert "set model.lora.enabled=true" in capsys.readouterr().err
    from launch.preflight import preflight

    with pytest.raises(ConfigError, match=r"^train.objective=dpo needs preference shards"):  # before any job queues
        preflight(load_config(None, [f"train.data_dir={sft}", "train.objective=dpo", "model.init=random"]), "slurm")
    with pytest.raises(ValueError, match="label_smoothing applies to loss=sigmoid only"):
        DpoConfig(loss="ipo", label_smoothing=0.1)
    # SFT rows read as pairs: one line naming the row
    with pytest.raises(ConfigError, match="not consecutive '<id>/chosen', '<id>/rejected' pairs"):
        read_rows(sft, load_manifest(sft)["splits"]["train"]["shards"], 0, PAIR_COLUMNS)


def test_trainer_state_records_the_objective_and_old_checkpoints_resume():
    """Checkpoints written before model.lora.init_adapter existed carry the model section's hash without it."""
    import hashlib

    from train.recipe import _model_hashes

    cfg = load_config(None, ["model.init=random"])
    obj = cfg.model.model_dump(mode="json")
    obj["lora"].pop("init_adapter")
    old = hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    assert _model_hashes(cfg) == {cfg.hash("model"), old}
    assert _model_hashes(load_config(None, ["model.lora.init_adapter=/a"])) == {
        load_config(None, ["model.lora.init_adapter=/a"]).hash("model")
    }
