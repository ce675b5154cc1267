"""The model card every `cbt-llm export` writes (README.md beside the weights), so that a model pushed to a hub as it
is (`huggingface-cli upload`) says what it is: its base, how and on what it was trained, its latest eval as
model-index results when it has been evaluated, what it is for and not for, that it must not replace a professional,
where to get help in a crisis, and that it is meant to be served behind the crisis guard.

The header is Hugging Face's model card metadata (huggingface_hub.ModelCard parses it). `cbt-llm eval` rewrites
the card of an exported model it evaluates, so the numbers there are that model's latest.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from cbt_llm.core.fileio import write_text_atomic
from cbt_llm.domain.crisis import DISCLAIMER, SHOWN_CRISIS_LINES, hotline

CARD_FILE = "README.md"
# the eval metrics a card reports, in this order (all of eval's numbers are in its results.json)
CARD_METRICS = (
    "rouge-l",
    "bleu-4",
    "meteor",
    "bertscore-f1",
    "structure-coverage",
    "structure-order",
    "crisis-support",
    "crisis-hotline",
    "professional-help",
)


def _metadata(export: dict, eval_entry: dict | None) -> dict:
    kind = export.get("kind", "full")
    meta: dict = {
        "language": ["zh"],
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["cbt-llm", "cbt", "mental-health", "counselling", "chinese", *(["lora"] if kind != "full" else [])],
    }
    base = str(export.get("base_model") or "")
    if base and not Path(base).exists():  # a hub id; a local folder's path means nothing on a hub
        meta["base_model"] = base
    if eval_entry:
        meta["model-index"] = [
            {
                "name": eval_entry["name"],
                "results": [
                    {
                        "task": {"type": "text-generation", "name": "CBT counselling answers"},
                        "dataset": {"name": eval_entry["questions"], "type": "cbt-llm-heldout"},
                        "metrics": [
                            {"type": name, "name": name, "value": round(float(m["score"]), 4), "verified": False}
                            for name, m in eval_entry["metrics"].items()
                        ],
                    }
                ],
            }
        ]
    return meta


def _eval_section(eval_entry: dict | None) -> str:
    if not eval_entry:
        return "Not evaluated yet: `cbt-llm eval --model <this folder>` adds its numbers here.\n"
    rows = ["| metric | score | n | 95% interval |", "|---|---:|---:|---|"]
    for name, m in eval_entry["metrics"].items():
        ci = m.get("ci95") or [None, None]
        interval = f"{ci[0]:.3f}-{ci[1]:.3f}" if None not in ci else ""
        rows.append(f"| {name} | {m['score']:.3f} | {m.get('n', '')} | {interval} |")
    return (
        f"`cbt-llm eval` on {eval_entry['n']} held-out questions ({eval_entry['questions']}), greedy decoding:\n\n"
        + "\n".join(rows)
        + "\n\nEach metric's signature (tokenisation, implementation, version) is in the eval's results.json.\n"
    )


def render_card(export: dict, training: dict, eval_entry: dict | None = None) -> str:
    """README.md's text: the metadata header and the card. `export` is export.json's content; `training` what the
    run says of itself (steps, data counts, config); `eval_entry` {name, questions, n, metrics} or None."""
    header = yaml.safe_dump(_metadata(export, eval_entry), sort_keys=False, allow_unicode=True)
    lines = "\n".join(f"- {h.name}: {h.number}" for h in SHOWN_CRISIS_LINES)
    emergency = f"{hotline('ambulance').number} / {hotline('police').number}"
    kinds = {
        "full": "a fully fine-tuned model",
        "merged": "a LoRA fine-tune merged into its base",
        "adapter": "a LoRA adapter (load it on its base model with peft)",
    }
    kind = kinds.get(export.get("kind"), "a model")
    return f"""---
{header}---

# {Path(str(export.get("out", "model"))).name}: a CBT-structured Chinese counselling model

{kind.capitalize()} trained with cbt-llm to answer mental-health questions in the five parts of
a Cognitive Behavioral Therapy answer: validation and empathy (验证和共情), the key thought or belief (识别关键思维或
信念), a challenge or reflection (提出挑战或反思), a strategy or insight (提供策略或见解), and encouragement and
foresight (鼓励与前瞻), which says that more professional support may be needed.

## Not a replacement for a professional

{DISCLAIMER}

This model can be wrong, can miss that a person is in danger, and can say harmful things. It must not be used to
diagnose, to treat, or as the only support of anyone in distress.

## If you or someone you know is in crisis

{lines}
- Emergency: {emergency}, or the nearest hospital's emergency department.

## Intended use

Research and supervised deployment by counselling platforms, **served behind the cbt-llm crisis guard**
(`cbt-llm serve --model <this folder>`): the guard reads every user turn for suicide, self-harm and harm-to-others
risk and every reply for harmful content, puts the crisis lines first in a crisis, replaces unsafe replies and adds
the disclaimer. Serving the raw model without such a layer is outside its intended use.

## Limitations

- Trained on {training.get("data", "its run's corpus")}; answers follow that corpus's style and topics.
- A model's own crisis handling is not enough: measure it (`cbt-llm eval` reports crisis support) and keep the guard on.
- Chinese only; other languages are not evaluated.

## Training

- Base model: {export.get("base_model", "")}
- Export: {export.get("kind", "")} from {export.get("run", "")} checkpoint {export.get("checkpoint", "")}
  (step {export.get("step", "")}), dtype {export.get("dtype", "")}
- System prompt: {json.dumps(export.get("system_prompt", ""), ensure_ascii=False)}
- {training.get("details", "")}

## Evaluation

{_eval_section(eval_entry)}"""


def _evaluated_folder(m: dict) -> str | None:
    """The folder an eval's model entry answered with: the model folder, or the adapter on a base model."""
    if m.get("kind") == "folder" and not m.get("adapter"):
        return m.get("source") or None
    if m.get("kind") == "base+adapter":
        return m.get("adapter") or None
    return None


def eval_entry_for(out: str | Path, results: dict) -> dict | None:
    """This export's entry in an eval's results.json ({name, questions, n, metrics}), or None when the eval did not
    answer with this folder (as the model, or as the adapter on its base)."""
    target = Path(out).resolve()
    for name, m in results.get("models", {}).items():
        src = _evaluated_folder(m)
        if src and Path(src).resolve() == target:
            metrics = {k: m["metrics"][k] for k in CARD_METRICS if m["metrics"].get(k, {}).get("score") is not None}
            q = results.get("questions", {})
            return {"name": name, "questions": q.get("source", ""), "n": q.get("n", 0), "metrics": metrics}
    return None


def write_card(out: str | Path, export: dict, training: dict, eval_entry: dict | None = None) -> Path:
    return write_text_atomic(Path(out) / CARD_FILE, render_card(export, training, eval_entry))


def refresh_card(out: str | Path, results: dict) -> Path | None:
    """Rewrite the card of exported folder `out` (one with export.json) with its entry in an eval's `results`: the
    model-index header and the Evaluation section, the rest kept as export wrote it (a folder without a card gets a
    whole one). None, and nothing written, when `out` is no export or the eval has no entry for it."""
    out = Path(out)
    try:
        export = json.loads((out / "export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = eval_entry_for(out, results)
    if entry is None or not isinstance(export, dict):
        return None
    card = out / CARD_FILE
    old = card.read_text(encoding="utf-8") if card.is_file() else ""
    return write_text_atomic(card, _with_eval(old, export, entry) or render_card(export, {}, entry))


def refresh_cards(results: dict) -> list[Path]:
    """refresh_card for every folder an eval answered with (`cbt-llm eval` calls it once results.json is
    written): the cards rewritten."""
    folders = {src for m in results.get("models", {}).values() if (src := _evaluated_folder(m))}
    return [card for f in sorted(folders) if (card := refresh_card(f, results)) is not None]


def _with_eval(old: str, export: dict, entry: dict) -> str | None:
    """`old` (a card render_card wrote) with the header and Evaluation section of `entry`; None when it is not one."""
    marker = "\n## Evaluation\n"
    end = old.find("\n---\n", 3)
    if not old.startswith("---\n") or end < 0 or marker not in old:
        return None
    header = yaml.safe_dump(_metadata(export, entry), sort_keys=False, allow_unicode=True)
    body = old[end + len("\n---\n") : old.rindex(marker)]
    return f"---\n{header}---\n{body}{marker}\n{_eval_section(entry)}"
