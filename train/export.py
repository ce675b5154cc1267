"""`cbt-llm export`: a run's ZeRO checkpoint -> a Hugging Face folder (safetensors + tokenizer).

Three outputs: a full fine-tune becomes a consolidated model; a LoRA run becomes a peft adapter (loadable with
PeftModel.from_pretrained on the base), or with --merge-lora a merged model loadable by transformers alone.
Runs in one process without a process group: DeepSpeed's zero_to_fp32 reads every rank's shard files.
export.json beside the weights says what was exported and how to prompt it: the system prompt the run trained with
and whether the saved tokenizer has a chat template (`cbt-llm eval` reads them). README.md is the model card
(train/model_card.py): base, training, intended use, limits, the disclaimer, the crisis lines, the latest eval.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cbt_llm.core.config import load_config
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.report import print_summary, write_metrics
from data_pipeline.shards import MANIFEST_FILE
from train import checkpoint as ckpt
from train.model_card import eval_entry_for, write_card


def _gather_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    import logging

    from deepspeed.utils import logger as ds_logger
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_logger.setLevel(logging.WARNING)
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def _trained_system_prompt(cfg) -> str:
    """The system prompt of the shards the run trained on (their manifest: prepare may have run with another
    config), else the run config's data.system_prompt when the data folder is gone."""
    try:
        return json.loads((Path(cfg.train.data_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))["system_prompt"]
    except (OSError, ValueError, KeyError):
        return cfg.data.system_prompt


def _training_facts(run: Path, cfg) -> dict:
    """What the model card says of the training run: its data (the manifest's counts) and its summary."""
    facts = {"data": f"the shards in {cfg.train.data_dir}"}
    try:
        man = json.loads((Path(cfg.train.data_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
        c = man["counts"]
        facts["data"] = (
            f"{c['kept']:,} examples ({man.get('format', 'cbt')} format; {c['rows']['train']:,} packed rows of "
            f"{man['seq_len']} tokens) prepared from {len(man.get('inputs', []))} corpus file(s)"
        )
    except (OSError, ValueError, KeyError):
        pass
    try:
        s = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
        facts["details"] = (
            f"{s['steps']} optimizer steps on {s['world_size']} rank(s), LoRA {s['lora']}, training loss "
            f"{s['first_train_loss']:.3f} -> {s['last_train_loss']:.3f}, validation loss {s['eval_loss']}"
        )
        if s.get("objective") == "dpo":
            facts["details"] = (
                f"Preference optimisation (train.objective dpo, loss {s['dpo_loss']}, beta {s['dpo_beta']}, "
                f"reference {s['reference']}): "
                + facts["details"]
                + f", validation preference accuracy (rewards) {s.get('eval_rewards_accuracies')}"
            )
    except (OSError, ValueError, KeyError, TypeError):
        facts["details"] = "the run's train_summary.json was not found"
    return facts


def _latest_eval(out: Path, cfg) -> dict | None:
    """This folder's numbers in the run's latest eval (eval.out_dir/results.json), when it evaluated this folder."""
    try:
        results = json.loads((Path(cfg.eval.out_dir) / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return eval_entry_for(out, results)


def run_export(run: str | Path, out: str | Path, *, merge_lora: bool = False, tag: str | None = None) -> dict:
    """Write the exported model/adapter to `out`; returns a summary dict (also written to out/export.json)."""
    from transformers import AutoModelForCausalLM

    from cbt_llm.inference.tokenizer import open_tokenizer

    run, out = Path(run), Path(out)
    ckpt_dir = run / "checkpoints"
    tag = tag or ckpt.latest_tag(ckpt_dir)
    if not tag or not (ckpt_dir / tag / ckpt.STATE_FILE).is_file():
        raise ConfigError(
            f"--run (train.run_dir): no complete checkpoint in '{ckpt_dir}'; train first or pass --tag of a saved step"
        )
    state = json.loads((ckpt_dir / tag / ckpt.STATE_FILE).read_text())
    cfg = load_config(run / "config.yaml")
    lora = bool(state["lora"])
    if merge_lora and not lora:
        raise ConfigError("--merge-lora: this run trained all weights (model.lora.enabled=false); drop --merge-lora")
    dtype = torch.bfloat16 if state.get("dtype") == "bfloat16" else torch.float32
    base = state["base_model"]
    if Path(base).exists():
        base = str(Path(base).resolve())

    sd = _gather_state_dict(ckpt_dir, tag)
    if lora:
        lora_keys = [k for k in sd if ".lora_" in k]
        if not lora_keys:
            raise ConfigError(f"checkpoint {tag} holds no LoRA weights; was it trained with model.lora.enabled=true?")
        # lora_B starts at zero: if it still is, the adapter changes nothing
        if all(float(sd[k].detach().abs().max()) == 0.0 for k in lora_keys if ".lora_B." in k):
            raise ConfigError(
                f"checkpoint {tag}: every lora_B is zero, the adapter is a no-op; train longer before exporting"
            )
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code
    )
    if lora:
        from train.model import apply_lora

        model = apply_lora(model, cfg.model.lora)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if "lora_" in k or not lora]:
        raise RuntimeError(
            f"checkpoint {tag} does not match the model: missing={missing[:3]} unexpected={unexpected[:3]}"
        )

    out.mkdir(parents=True, exist_ok=True)
    if lora and merge_lora:
        model = model.merge_and_unload()
        kind = "merged"
    elif lora:
        model.peft_config["default"].base_model_name_or_path = base
        kind = "adapter"
    else:
        kind = "full"
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    tok = open_tokenizer(state["tokenizer"], cfg.model.trust_remote_code)
    tok.save_pretrained(out)
    summary = {
        "kind": kind,
        "run": str(run),
        "checkpoint": tag,
        "step": state["step"],
        "base_model": base,
        "dtype": str(dtype).replace("torch.", ""),
        "tensors": len(sd),
        "out": str(out),
        # what `cbt-llm eval` needs to prompt the model as it was trained (evaluation.generate.exported_system_prompt)
        "system_prompt": _trained_system_prompt(cfg),
        "chat_template": bool(getattr(tok, "chat_template", None)),
    }
    write_metrics(out / "export.json", summary)
    card = write_card(out, summary, _training_facts(run, cfg), _latest_eval(out, cfg))
    print_summary("cbt-llm export", {**summary, "model_card": str(card)}, file=sys.stderr)
    return summary
