"""Attention over packed rows without a block mask: `sdpa_varlen`.

A packed row holds several examples; each must attend only to itself. transformers' `sdpa` does that by
building a (rows x seq x seq) block-diagonal mask from the restarted position_ids, which costs seq^2 per row and
keeps torch's SDPA off its fast kernels (flash attention takes no mask). flash-attn's varlen kernel avoids both,
but it is a CUDA build that is not always installed. `sdpa_varlen` runs the same cut with what torch ships:

- CUDA: torch's own varlen flash kernel (`torch.nn.attention.varlen.varlen_attn`) over the flattened batch,
  cut at the example boundaries (cu_seqlens), like flash-attn's varlen;
- elsewhere (CPU), or where that kernel is missing: one causal SDPA call per example, so the work is
  sum(len_i^2) instead of seq^2 and no mask is built.

The boundaries come from position_ids (each example restarts at 0; padding after the last example restarts
too and forms its own segment, whose labels are ignored). The training loop computes them once per batch on
the host (`boundaries`) and passes them as `cu_seq_lens_q/k`, `max_length_q/k` (the keyword names transformers
already uses for flash-attn), so no layer has to synchronise with the GPU to find them; a forward pass that
passes only position_ids (evaluation probes, users' code) gets them computed here.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


def boundaries(position_ids: torch.Tensor) -> dict:
    """cu_seqlens over the flattened (rows x seq) batch, cut wherever a position restarts at 0, and the longest
    segment. Call it on the host copy of position_ids (no device sync)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0, as_tuple=True)[0]
    width = position_ids.shape[-1]
    # each row starts a segment even if its first position is not 0 (a row must never continue another)
    row_starts = torch.arange(0, flat.numel(), width, device=flat.device)
    starts = torch.unique(torch.cat([starts, row_starts]))
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _torch_varlen():
    """torch's varlen flash entry point and how this torch version spells causal / GQA / scale, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, {
        "is_causal": "is_causal" in params,
        "window": "window_size" in params,
        "gqa": "enable_gqa" in params,
        "scale": "scale" in params,
    }


_VARLEN = _torch_varlen()
_cuda_kernel_broken: str | None = None  # set once if the CUDA kernel refused this model's shapes


def _segments_sdpa(q, k, v, cu, scaling, gqa: bool) -> torch.Tensor:
    """(heads, tokens, dim) in, one causal SDPA per segment, (tokens, heads, dim) out."""
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        outs.append(
            F.scaled_dot_product_attention(
                q[None, :, a:b], k[None, :, a:b], v[None, :, a:b], is_causal=True, scale=scaling, enable_gqa=gqa
            )[0]
        )
    return torch.cat(outs, dim=1).transpose(0, 1)


def _cuda_varlen(q, k, v, cu, longest: int, scaling) -> torch.Tensor:
    """(tokens, heads, dim) in and out, through torch's varlen flash kernel."""
    fn, has = _VARLEN
    if k.shape[1] != q.shape[1] and not has["gqa"]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kw = {}
    if has["gqa"] and k.shape[1] != q.shape[1]:
        kw["enable_gqa"] = True
    if has["is_causal"]:
        kw["is_causal"] = True
    elif has["window"]:
        kw["window_size"] = (-1, 0)
    else:
        raise RuntimeError("this torch's varlen_attn has no causal option")
    if has["scale"]:
        kw["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
        raise RuntimeError("this torch's varlen_attn takes no scale and the model's is not 1/sqrt(head_dim)")
    cu = cu.to(q.device, non_blocking=True)
    return fn(q, k, v, cu, cu, longest, longest, **kw)


def sdpa_varlen_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: (rows, heads, seq, dim) q/k/v in, (rows, seq, heads, dim) out."""
    global _cuda_kernel_broken
    if attention_mask is not None:
        raise ValueError(f"{NAME}: an attention mask was passed; packed rows carry position_ids only")
    if kwargs.get("sliding_window"):
        raise ValueError(f"{NAME}: sliding-window attention is not supported; use model.attn=sdpa (masked SDPA)")
    if dropout and module.training:
        raise ValueError(f"{NAME}: attention dropout is not supported; set the model's attention_dropout to 0")
    rows, heads, seq, dim = query.shape
    if kwargs.get("cu_seq_lens_q") is not None:
        cu, longest = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    else:
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(seq).expand(rows, seq)
        b = boundaries(pos.detach().to("cpu"))
        cu, longest = b["cu_seq_lens_q"], b["max_length_q"]
    gqa = key.shape[1] != heads
    if query.is_cuda and _VARLEN is not None and _cuda_kernel_broken is None:
        # (rows, heads, seq, dim) -> (rows*seq, heads, dim)
        q = query.transpose(1, 2).reshape(rows * seq, heads, dim)
        k = key.transpose(1, 2).reshape(rows * seq, key.shape[1], dim)
        v = value.transpose(1, 2).reshape(rows * seq, value.shape[1], dim)
        try:
            out = _cuda_varlen(q, k, v, cu, longest, scaling)
            return out.reshape(rows, seq, heads, dim), None
        except torch.OutOfMemoryError:  # a RuntimeError too, but not the kernel refusing: never hide it
            raise
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a head size or dtype the kernel lacks
            _cuda_kernel_broken = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    q = query.transpose(0, 1).reshape(heads, rows * seq, dim)
    k = key.transpose(0, 1).reshape(key.shape[1], rows * seq, dim)
    v = value.transpose(0, 1).reshape(value.shape[1], rows * seq, dim)
    out = _segments_sdpa(q, k, v, cu.to("cpu"), scaling, gqa)
    return out.reshape(rows, seq, heads, dim), None


def kernel_in_use(device_type: str) -> str:
    """What `sdpa_varlen` runs on this device, for the log."""
    if device_type == "cuda" and _VARLEN is not None and _cuda_kernel_broken is None:
        return "torch varlen flash kernel"
    if device_type == "cuda" and _cuda_kernel_broken:
        return f"one SDPA call per example (torch varlen kernel refused: {_cuda_kernel_broken})"
    return "one SDPA call per example"


def register() -> None:
    """Make `sdpa_varlen` a valid attn_implementation (no mask function: transformers then builds no mask)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, sdpa_varlen_forward)
