"""The model card (train/model_card.py) as the hub reads it: README.md loaded with huggingface_hub's ModelCard, its
metadata (base model, tags, the eval as model-index results) and its text (the disclaimer, the crisis lines, the
guard); and `cbt-llm eval` rewriting the card of an exported folder it evaluated."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from cbt_llm.domain.crisis import DISCLAIMER, SHOWN_CRISIS_LINES
from train.model_card import CARD_FILE, eval_entry_for, refresh_card, refresh_cards, write_card

EXPORT = {
    "kind": "merged",
    "run": "runs/qwen/train",
    "checkpoint": "step-0000300",
    "step": 300,
    "base_model": "Qwen/Qwen2.5-7B-Instruct",
    "dtype": "bfloat16",
    "out": "runs/qwen/export",
    "system_prompt": "你是一名心理咨询师",
    "chat_template": True,
}
TRAINING = {"data": "1,000 examples (cbt format)", "details": "300 optimizer steps on 8 rank(s)"}


def _results(folder, *, kind: str = "folder", rouge: float = 0.2512) -> dict:
    entry = {"kind": kind, "source": str(folder), "adapter": None, "metrics": {}}
    if kind == "base+adapter":
        entry.update(source="Qwen/Qwen2.5-7B-Instruct", adapter=str(folder))
    entry["metrics"] = {
        "rouge-l": {"score": rouge, "n": 40, "ci95": [0.2, 0.3]},
        "crisis-support": {"score": 0.9, "n": 40, "ci95": [0.8, 0.95]},
        "bleu-4": {"score": None, "n": 0},  # not computed: left out of the card
        "length": {"score": 120.0, "n": 40},  # not a card metric
    }
    return {"questions": {"source": "data/heldout.jsonl", "n": 40}, "models": {"export": entry}}


def _card(folder) -> ModelCard:
    return ModelCard.load(folder / CARD_FILE)


def _metrics(card: ModelCard) -> dict[str, float]:
    return {r.metric_type: r.metric_value for r in card.data.eval_results or []}


def test_the_card_parses_with_base_tags_eval_results_and_the_safety_text(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    write_card(out, EXPORT, TRAINING, eval_entry_for(out, _results(out)))
    card = _card(out)
    assert card.data.base_model == "Qwen/Qwen2.5-7B-Instruct"
    assert {"cbt-llm", "mental-health", "lora"} <= set(card.data.tags) and card.data.language == ["zh"]
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert _metrics(card) == {"rouge-l": 0.2512, "crisis-support": 0.9}
    assert card.data.eval_results[0].dataset_name == "data/heldout.jsonl"
    text = card.text
    assert DISCLAIMER in text and all(f"{h.name}: {h.number}" in text for h in SHOWN_CRISIS_LINES)
    assert "behind the cbt-llm crisis guard" in text and "1,000 examples" in text


def test_a_card_without_an_eval_or_a_hub_base_says_so_and_still_parses(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    write_card(out, {**EXPORT, "kind": "full", "base_model": str(tmp_path)}, TRAINING)  # a local base folder
    card = _card(out)
    assert card.data.base_model is None and not card.data.eval_results and "lora" not in card.data.tags
    assert "Not evaluated yet" in card.text and DISCLAIMER in card.text


def test_an_eval_rewrites_the_cards_of_the_exported_folders_it_answered_with(tmp_path):
    out, adapter, plain = tmp_path / "export", tmp_path / "adapter", tmp_path / "plain"
    for d in (out, adapter, plain):
        d.mkdir()
    (out / "export.json").write_text(json.dumps(EXPORT))
    (adapter / "export.json").write_text(json.dumps({**EXPORT, "kind": "adapter"}))
    write_card(out, EXPORT, TRAINING)
    before = _card(out).text

    assert refresh_card(out, _results(out)) == out / CARD_FILE
    card = _card(out)
    assert _metrics(card) == {"rouge-l": 0.2512, "crisis-support": 0.9}
    # the rest is as export wrote it, the training facts included; only the eval section changed
    assert card.text.split("## Evaluation")[0] == before.split("## Evaluation")[0]
    assert "| rouge-l | 0.251 | 40 | 0.200-0.300 |" in card.text and "Not evaluated yet" not in card.text
    # the next eval replaces the numbers
    refresh_card(out, _results(out, rouge=0.3))
    assert _metrics(_card(out))["rouge-l"] == 0.3 and _card(out).text.count("## Evaluation") == 1

    # an adapter evaluated on its base, an export without a card yet: a whole card
    assert refresh_cards(_results(adapter, kind="base+adapter")) == [adapter / CARD_FILE]
    card = _card(adapter)
    assert card.data.library_name == "peft" and _metrics(card)["crisis-support"] == 0.9 and DISCLAIMER in card.text
    # a folder that is no export (no export.json), or one the eval did not answer with: nothing written
    assert refresh_cards(_results(plain)) == [] and not (plain / CARD_FILE).exists()
    assert refresh_card(out, _results(plain)) is None


def test_cbt_llm_eval_puts_its_numbers_in_the_card_of_the_exported_model(tmp_path, capsys, monkeypatch):
    from cbt_llm.cli import main
    from tests.fixtures.eval import tiny_chat_model
    from tests.fixtures.paths import ROOT
    from tests.unit.evaluation.test_eval_run import write_questions

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(ROOT)  # the structure scorer artifact is shared by the tests
    model = tiny_chat_model(tmp_path / "tiny")
    (model / "export.json").write_text(json.dumps({**EXPORT, "out": str(model), "system_prompt": ""}))
    write_card(model, {**EXPORT, "out": str(model)}, TRAINING)
    args = ["--model", str(model), "--questions", str(write_questions(tmp_path / "q.jsonl"))]
    args += ["eval.check_overlap=false", "eval.max_new_tokens=4", "eval.bootstrap_resamples=0"]
    args += ["eval.safety_probes=false", "--out", str(tmp_path / "eval")]
    assert main(["eval", *args]) == 0, capsys.readouterr().err
    assert f"model card {model / CARD_FILE} updated" in capsys.readouterr().err
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    (entry,) = results["models"].values()
    card = _card(model)
    got = _metrics(card)
    assert got and got["structure-coverage"] == round(entry["metrics"]["structure-coverage"]["score"], 4)
    assert "1,000 examples" in card.text  # the training facts export wrote stay
