"""sdpa_varlen (train/attention.py): packed rows cut at example boundaries, equal to transformers' masked SDPA.

The CPU tests check the per-example SDPA path; the `gpu` tests (skipped without CUDA) check torch's varlen
flash kernel against the masked reference in bf16, run by bench/gpu_checks.sh on a lent GPU.
"""

from __future__ import annotations

import pytest
import torch

from cbt_llm.core.config import load_config
from cbt_llm.core.errors import ConfigError
from train import attention
from train.model import random_model_config, select_attn

CUDA = torch.cuda.is_available()


def _pair(device="cpu", dtype=torch.float32, **over):
    """The same random tiny Qwen2 twice: transformers' sdpa (block mask) and ours."""
    from transformers import AutoModelForCausalLM

    attention.register()
    mc = load_config(None, [f"model.{k}={v}" for k, v in over.items()]).model
    cfg = random_model_config(mc, 96, 256, 0, 0)
    out = []
    for attn in ("sdpa", attention.NAME):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn).to(device)
        m.config.use_cache = False
        out.append(m)
    return out


def _packed(lengths_per_row: list[list[int]], width: int, device="cpu"):
    """Rows of packed examples, each padded at the end with a restarting position run (as train.data.collate)."""
    pos = []
    for lengths in lengths_per_row:
        parts = [torch.arange(n) for n in lengths]
        pad = width - sum(lengths)
        if pad:
            parts.append(torch.arange(pad))
        pos.append(torch.cat(parts))
    pos = torch.stack(pos)
    torch.manual_seed(1)
    return torch.randint(3, 96, pos.shape).to(device), pos.to(device)


def test_boundaries_cut_at_restarts_and_row_starts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])  # row 2 starts mid-example: still its own segment
    b = attention.boundaries(pos)
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8, 12] and b["cu_seq_lens_q"].dtype == torch.int32
    assert b["max_length_q"] == 4 and b["cu_seq_lens_k"] is b["cu_seq_lens_q"]


@pytest.mark.parametrize("pass_boundaries", [True, False])
def test_varlen_equals_masked_sdpa_logits_and_grads(pass_boundaries):
    """Two packed rows (GQA 4:2 heads, a padded tail): same logits and gradients as the block-mask reference."""
    ref, ours = _pair()
    ids, pos = _packed([[9, 17, 5], [30, 12]], 48)
    kw = attention.boundaries(pos) if pass_boundaries else {}
    out_ref = ref(input_ids=ids, position_ids=pos).logits
    out = ours(input_ids=ids, position_ids=pos, **kw).logits
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-4)
    out_ref.square().mean().backward()
    out.square().mean().backward()
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=2e-5, rtol=1e-3, msg=name)


def test_varlen_keeps_examples_apart():
    """An example's logits inside a packed row equal running it alone; a plain causal row differs."""
    _, ours = _pair()
    ids, pos = _packed([[11, 13]], 24)
    with torch.no_grad():
        packed = ours(input_ids=ids, position_ids=pos).logits
        alone = ours(input_ids=ids[:, 11:], position_ids=torch.arange(13)[None]).logits
        causal = ours(input_ids=ids, position_ids=torch.arange(24)[None]).logits
    torch.testing.assert_close(packed[:, 11:], alone, atol=1e-5, rtol=1e-5)
    assert (causal[:, 11:] - alone).abs().max() > 1e-3


def test_varlen_refuses_a_mask_and_sliding_window():
    class M:
        training = False

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention mask"):
        attention.sdpa_varlen_forward(M, q, q, q, torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="sliding-window"):
        attention.sdpa_varlen_forward(M, q, q, q, None, sliding_window=2)


def test_select_attn():
    mc = load_config(None, []).model
    assert select_attn(mc, "cpu") == "sdpa_varlen"  # auto without flash-attn
    assert select_attn(mc.model_copy(update={"trust_remote_code": True}), "cpu") == "sdpa"
    assert select_attn(mc.model_copy(update={"attn": "sdpa"}), "cpu") == "sdpa"
    with pytest.raises(ConfigError, match="model.attn=sdpa"):
        select_attn(mc.model_copy(update={"attn": "sdpa_varlen", "trust_remote_code": True}), "cpu")
    assert attention.kernel_in_use("cpu") == "one SDPA call per example"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cuda_varlen_kernel_matches_masked_sdpa_bf16(kv_heads):
    """On CUDA: torch's varlen flash kernel is used (not the fallback) and agrees with the masked reference in
    bf16 (relative error of logits and of a gradient under 2e-2)."""
    ref, ours = _pair(
        "cuda", torch.bfloat16, hidden_size=256, num_heads=4, num_kv_heads=kv_heads, intermediate_size=512
    )
    ids, pos = _packed([[100, 60, 90], [200, 40]], 256, "cuda")
    out_ref = ref(input_ids=ids, position_ids=pos).logits.float()
    out = ours(input_ids=ids, position_ids=pos, **attention.boundaries(pos.cpu())).logits.float()
    assert attention.kernel_in_use("cuda") == "torch varlen flash kernel", attention.kernel_in_use("cuda")
    rel = ((out - out_ref).norm() / out_ref.norm()).item()
    assert rel < 2e-2, rel
    out_ref.square().mean().backward()
    out.square().mean().backward()
    g_ref = ref.model.layers[0].self_attn.q_proj.weight.grad.float()
    g = ours.model.layers[0].self_attn.q_proj.weight.grad.float()
    rel_g = ((g - g_ref).norm() / g_ref.norm()).item()
    assert rel_g < 2e-2, rel_g
