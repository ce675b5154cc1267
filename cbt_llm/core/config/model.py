"""Config section of the model being trained: its source, attention, precision and LoRA."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cbt_llm.core.config.base import Section


class LoraConfig(Section):
    """LoRA adapters (peft) on the model; off means full fine-tuning."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Adapter scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the LM head)."
    )
    init_adapter: str = Field(
        "",
        description="A trained LoRA adapter folder (e.g. an SFT run's export) merged into the base before training; "
        "a fresh adapter is trained on top, so under train.objective=dpo the reference (adapters off) is that "
        "merged model. Needs lora.enabled.",
    )


class ModelConfig(Section):
    """`cbt-llm train`: which causal LM to train and how it is built."""

    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="'pretrained': load name_or_path; 'random': a small model from the fields below."
    )
    name_or_path: str = Field("", description="Hugging Face id or local folder (init=pretrained).")
    trust_remote_code: bool = Field(False, description="Allow the model repo's own code (Baichuan2 needs it).")
    arch: str = Field("qwen2", description="model_type of the random model (init=random).")
    hidden_size: int = Field(64, ge=8, description="Random model: hidden size.")
    num_layers: int = Field(2, ge=1, description="Random model: transformer layers.")
    num_heads: int = Field(4, ge=1, description="Random model: attention heads.")
    num_kv_heads: int = Field(2, ge=1, description="Random model: key/value heads (GQA).")
    intermediate_size: int = Field(128, ge=8, description="Random model: MLP width.")
    vocab_size: int = Field(0, ge=0, description="Random model: vocabulary (0: the tokenizer's length).")
    attn: Literal["auto", "flash_attention_2", "sdpa_varlen", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernel; auto = flash_attention_2 when importable on CUDA, else sdpa_varlen (torch SDPA "
        "kernels cut at packed-example boundaries: torch's varlen flash kernel on CUDA, one SDPA call per example "
        "on CPU); sdpa = transformers' SDPA with a block-diagonal mask per packed row; remote-code models: sdpa.",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU.")
    activation_checkpointing: Literal["off", "full", "every_k"] = Field(
        "off",
        description="Recompute activations in backward to save memory: off; full = every decoder layer; every_k = "
        "every k-th layer (model.checkpoint_every_k), a middle ground that recomputes 1/k of the layers.",
    )
    checkpoint_every_k: int = Field(
        2, ge=1, description="activation_checkpointing=every_k: checkpoint layers 0, k, 2k, ... (1 = full)."
    )
    liger: bool = Field(
        True,
        description="Liger kernels (RoPE, RMSNorm, SwiGLU; not its loss: ours masks packed rows) when liger_kernel "
        "is installed (the gpu extra and the Docker image have it) and the device is CUDA; otherwise logged and "
        "ignored. On one H200 they made a ~1.2B full fine-tune 1.32x faster with 20% less peak memory.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="before")
    @classmethod
    def _earlier_checkpointing_name(cls, data: Any) -> Any:
        """`gradient_checkpointing: true` (the earlier field) still means activation_checkpointing: full."""
        if isinstance(data, dict) and "gradient_checkpointing" in data:
            data = dict(data)
            on = data.pop("gradient_checkpointing") in (True, 1, "true", "True")
            data.setdefault("activation_checkpointing", "full" if on else "off")
        return data
