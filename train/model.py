"""Model build: a Hugging Face causal LM (or a small random one), its attention kernel, precision and LoRA."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from cbt_llm.core.config import LoraConfig, ModelConfig
from cbt_llm.core.errors import ConfigError
from train.data import IGNORE


def resolve_dtype(mcfg: ModelConfig, device_type: str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless the config says otherwise (fp16 is not offered: bf16 needs no loss scaling)."""
    if mcfg.precision == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return torch.bfloat16 if mcfg.precision == "bf16" else torch.float32


def select_attn(mcfg: ModelConfig, device_type: str) -> str:
    """flash_attention_2 when asked for (or auto) and usable, else SDPA cut at example boundaries (sdpa_varlen, see
    train/attention.py); never a silent downgrade of an explicit ask. Models with their own attention code
    (trust_remote_code) cannot take a registered kernel, so auto gives them transformers' sdpa."""
    have_fa = device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if mcfg.attn == "flash_attention_2" and not have_fa:
        raise ConfigError(
            "model.attn=flash_attention_2 needs CUDA and the flash-attn package; use model.attn=sdpa_varlen"
        )
    if mcfg.attn == "sdpa_varlen" and mcfg.trust_remote_code:
        raise ConfigError(
            "model.attn=sdpa_varlen cannot reach a remote-code model's own attention; use model.attn=sdpa"
        )
    if mcfg.attn == "auto":
        if have_fa:
            return "flash_attention_2"
        return "sdpa" if mcfg.trust_remote_code else "sdpa_varlen"
    return mcfg.attn


def random_model_config(mcfg: ModelConfig, vocab_size: int, seq_len: int, pad_token_id: int, eos_token_id: int):
    """The transformers config of `model.init: random` (Qwen2 architecture by default)."""
    from transformers import AutoConfig

    if mcfg.hidden_size % mcfg.num_heads or mcfg.num_heads % mcfg.num_kv_heads:
        raise ConfigError("model.hidden_size must divide by model.num_heads, and num_heads by model.num_kv_heads")
    return AutoConfig.for_model(
        mcfg.arch,
        vocab_size=mcfg.vocab_size or vocab_size,
        hidden_size=mcfg.hidden_size,
        intermediate_size=mcfg.intermediate_size,
        num_hidden_layers=mcfg.num_layers,
        num_attention_heads=mcfg.num_heads,
        num_key_value_heads=mcfg.num_kv_heads,
        max_position_embeddings=max(seq_len, 128),
        tie_word_embeddings=False,  # ZeRO-3 consolidation and export stay simple without shared tensors
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
    )


def write_random_base(
    mcfg: ModelConfig,
    out_dir: Path,
    *,
    vocab_size: int,
    seq_len: int,
    pad_token_id: int,
    eos_token_id: int,
    seed: int,
    tokenizer: str = "",
) -> Path:
    """Build the seeded random model once and save it: every rank then loads the same weights the same way a
    pretrained model is loaded, and LoRA export has a real base folder to point at. With `tokenizer` (a folder or
    id) the folder also gets the tokenizer, so the untrained base is a whole model `cbt-llm eval` can answer with."""
    from transformers import AutoModelForCausalLM

    from cbt_llm.inference.tokenizer import open_tokenizer

    torch.manual_seed(seed)
    cfg = random_model_config(mcfg, vocab_size, seq_len, pad_token_id, eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer:
        open_tokenizer(str(tokenizer)).save_pretrained(out_dir)
    return out_dir


MERGED_FROM = "merged_from.json"


def _files_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def write_merged_base(base: str, adapter: str, out_dir: Path, *, dtype: torch.dtype, trust_remote_code: bool) -> Path:
    """model.lora.init_adapter: the base with that (SFT) adapter merged in, saved once as a model folder, so that
    every rank loads it as its base (under ZeRO-3 straight into partitions) and a fresh adapter trains on top:
    with the adapters disabled the model is then the SFT model, the DPO reference. Kept while base and adapter
    are unchanged (merged_from.json), so a resumed run finds the same base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"model.lora.init_adapter: '{adapter}' is not a LoRA adapter folder (no adapter_config.json)")
    record = {"base": str(base), "adapter": str(Path(adapter).resolve()), "adapter_hash": _files_hash(Path(adapter))}
    marker = out_dir / MERGED_FROM
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == record:
        return out_dir
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # written last: a folder without it (or with another record) is merged again
    merged.save_pretrained(out_dir, safe_serialization=True)
    marker.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return out_dir


def apply_liger(model_type: str, device_type: str) -> str:
    """Patch the model family's modules with Liger kernels before the model is built. Returns what was done, for
    the log. The loss kernels stay off: the loop computes its own masked sum over packed rows."""
    if device_type != "cuda":
        return "liger: off (needs CUDA)"
    try:
        import liger_kernel.transformers as lk
    except ImportError:
        return "liger: off (liger_kernel not installed: pip install liger-kernel)"
    patch = getattr(lk, f"apply_liger_kernel_to_{model_type}", None)
    if patch is None:
        return f"liger: off (no Liger patch for model_type '{model_type}')"
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    return f"liger: on ({model_type}: rope, rms_norm, swiglu)"


def load_model(path: str, mcfg: ModelConfig, dtype: torch.dtype, attn: str):
    """from_pretrained; under ZeRO-3 the caller keeps an HfDeepSpeedConfig alive so weights load partitioned."""
    from transformers import AutoModelForCausalLM

    if attn == "sdpa_varlen":
        from train.attention import register

        register()
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn, trust_remote_code=mcfg.trust_remote_code
        )
    except OSError as exc:
        raise ConfigError(f"model.name_or_path '{path}': cannot load ({str(exc).splitlines()[0]})") from None


def apply_activation_checkpointing(model, mcfg: ModelConfig) -> str:
    """model.activation_checkpointing on the decoder layers (non-reentrant, so ZeRO-3 and LoRA work); returns
    what was done, for the log. every_k keeps the flag on layers 0, k, 2k, ...: transformers' own switch sets it
    on every layer, so the others are turned back off here (one way for every transformers version)."""
    if mcfg.activation_checkpointing == "off":
        return "off"
    from transformers.modeling_layers import GradientCheckpointingLayer

    # transformers 5.2x renamed the switch (the old name warns); the image's 5.17 has only the old one
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    k = 1 if mcfg.activation_checkpointing == "full" else mcfg.checkpoint_every_k
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % k == 0
    on = sum(layer.gradient_checkpointing for layer in layers)
    return f"{mcfg.activation_checkpointing} ({on} of {len(layers)} layers recomputed)"


def lora_peft_config(lcfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=lcfg.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )


def apply_lora(model, lcfg: LoraConfig):
    """Wrap in peft LoRA; only adapter weights stay trainable."""
    from peft import get_peft_model

    return get_peft_model(model, lora_peft_config(lcfg))


def count_params(model) -> tuple[int, int]:
    """(total, trainable) parameter counts; ZeRO-3 partitioned params report their full size via ds_numel."""
    total = trainable = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def masked_ce_sum(
    logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, *, count: bool = True
) -> tuple[torch.Tensor, int | None]:
    """Sum of next-token cross-entropy over label tokens, and their count (None with count=False: on a GPU the
    count would wait for the device; the training loop takes it from label_count on the host instead).

    Token t predicts label t+1. A target that starts a new packed example (position 0) is never a label, even if
    a shard marked it so: it belongs to another conversation.
    """
    target = labels[:, 1:].clone()
    target[position_ids[:, 1:] == 0] = IGNORE
    logits = logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, (int((target != IGNORE).sum()) if count else None)


def label_count(labels: torch.Tensor, position_ids: torch.Tensor) -> int:
    """How many targets masked_ce_sum will count for this batch (known before the forward pass)."""
    target = labels[:, 1:]
    return int(((target != IGNORE) & (position_ids[:, 1:] != 0)).sum())


@torch.no_grad()
def packing_isolation(forward, ids: torch.Tensor, split: int) -> tuple[float, float]:
    """How much a packed row leaks across examples: (packed vs alone, plain-causal vs alone) max logit gaps
    for the second example of `ids` split at `split`.

    Packing relies on the model turning restarted position_ids into a block-diagonal mask (transformers'
    masking utils and flash-attn varlen do; a model with its own attention code may not). `forward(input_ids,
    position_ids)` returns logits; the first number must be far below the second.
    """
    n = ids.shape[1]
    second = ids[:, split:]
    packed = forward(ids, torch.cat([torch.arange(split), torch.arange(n - split)])[None])[:, split:].float()
    alone = forward(second, torch.arange(n - split)[None]).float()
    causal = forward(ids, torch.arange(n)[None])[:, split:].float()
    return float((packed - alone).abs().max()), float((causal - alone).abs().max())
