"""The generation engine of `cbt-llm eval` (cbt_llm/inference/) on a tiny random Qwen2 and a local tokenizer."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.chat_format import IM_END
from cbt_llm.inference import generate as G
from cbt_llm.inference.generate import choose_backend, generate_all, load_generator
from cbt_llm.inference.hf import HFGenerator
from cbt_llm.inference.models import exported_system_prompt, stop_token_ids
from cbt_llm.inference.prompt import Prompt, plan_batches, prompt_messages
from cbt_llm.inference.vllm import VllmGenerator
from data_pipeline.prepare.encode import tokenize_conversation
from data_pipeline.sources.formats import to_examples
from data_pipeline.synth.template import record_at
from tests.fixtures.eval import StandInEngine, tiny_chat_model, tiny_questions, write_lora

SYSTEM = "你是一名心理咨询师"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_chat_model(root)
    write_lora(model, root / "adapter", root / "merged")
    return {"model": model, "adapter": root / "adapter", "merged": root / "merged", "root": root}


@pytest.fixture(scope="module")
def base(tiny) -> HFGenerator:
    return HFGenerator(str(tiny["model"]))


def _prompts(n: int = 6) -> list[Prompt]:
    return [Prompt(f"q{k}", prompt_messages(q, d, SYSTEM)) for k, (q, d) in enumerate(tiny_questions(n))]


def test_plan_batches_keeps_the_budget_and_takes_every_prompt_once():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(200)]
    for max_new, budget in [(16, 1000), (64, 4096), (1, 301)]:
        plan = plan_batches(lengths, max_new, budget)
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
        for b in plan:
            assert len(b) * (max(lengths[i] for i in b) + max_new) <= budget
        flat = [lengths[i] for b in plan for i in b]
        assert flat == sorted(lengths, reverse=True)  # longest first, so padding inside a batch stays small
        assert plan == plan_batches(list(lengths), max_new, budget)  # deterministic
    # a prompt over the budget runs alone; the rest still pack together
    assert plan_batches([10, 500, 10, 10], 10, 100) == [[1], [0, 2, 3]]
    assert plan_batches([3, 3, 3], 1, 8) == [[0, 1], [2]]  # stable: equal lengths keep their order
    assert plan_batches([], 8, 100) == []
    with pytest.raises(ValueError):
        plan_batches([1], 0, 100)


def test_prompt_is_the_training_conversation_without_its_answer(base):
    """The user turn is build_user_message's (as prepare made it) and the prompt ids are exactly the start of the
    ids prepare trained on, up to the assistant's answer."""
    rec = record_at(0, 3)
    trained = to_examples(rec, "cbt", SYSTEM, "x")[0].messages
    msgs = prompt_messages(rec["question"], rec["description"], SYSTEM)
    assert msgs == trained[:2]
    # an empty system prompt is still a turn, as prepare writes it (data_pipeline.sources.formats)
    assert (
        prompt_messages("问题", "", "")
        == to_examples({**rec, "question": "问题", "description": ""}, "cbt", "", "x")[0].messages[:2]
    )
    ids = base.prompt_ids(Prompt("a", msgs))
    train_ids, labels = tokenize_conversation(base.tokenizer, trained, IM_END)
    first_label = next(k for k, x in enumerate(labels) if x != -100)
    assert list(train_ids[:first_label]) == ids


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(base):
    prompts = _prompts(6)
    lengths = [len(base.prompt_ids(p)) for p in prompts]
    assert len(set(lengths)) == 6  # every row of the batch is padded differently
    batched = base.generate_batch(prompts, 20)
    single = [base.generate_batch([p], 20)[0] for p in prompts]
    assert batched == single
    assert [g.prompt_tokens for g in batched] == lengths
    assert all((g.finish == "length") == (g.new_tokens == 20) for g in batched)
    # this fixture (its tokenizer trained on template-v3 records) has three rows stop early (q1 after 1 token, q4
    # after 10, q5 after 8): the batch runs on past them and their answers still end at their stop tokens
    assert [(g.finish, g.new_tokens) for g in batched][1::3] == [("stop", 1), ("stop", 10)]
    assert [g.finish for g in batched].count("stop") == 3


def test_adapter_on_its_base_answers_as_the_merged_export_and_not_as_the_base(tiny, base):
    prompts = _prompts(4)
    merged = HFGenerator(str(tiny["merged"])).generate_batch(prompts, 16)
    on_base = HFGenerator(str(tiny["model"]), adapter=str(tiny["adapter"])).generate_batch(prompts, 16)
    alone = HFGenerator(str(tiny["adapter"]))  # base_model_name_or_path from adapter_config.json
    assert alone.name == "model+adapter"
    assert on_base == merged == alone.generate_batch(prompts, 16)
    plain = base.generate_batch(prompts, 16)
    assert all(a.text != b.text for a, b in zip(merged, plain))


def test_finish_is_length_at_the_budget_and_stop_when_a_stop_token_is_made(tiny):
    gen = HFGenerator(str(tiny["model"]))
    prompt = _prompts(1)[0]
    ids = gen.prompt_ids(prompt)
    ((toks, finish),) = gen.generate_ids([ids], 10)
    assert finish == "length" and len(toks) == 10
    eos = gen.tokenizer.convert_tokens_to_ids(IM_END)
    assert gen.stop_ids == [eos] and eos not in toks
    # make <|im_end|> outscore the token chosen at step 4 wherever that one wins: greedy must stop by then
    k = 3
    with torch.no_grad():
        gen.model.lm_head.weight[eos] = gen.model.lm_head.weight[toks[k]] * 1.5
    (g,) = gen.generate_batch([prompt], 10)
    assert g.finish == "stop" and 1 <= g.new_tokens <= k + 1
    assert g.text == gen.tokenizer.decode(toks[: g.new_tokens - 1], skip_special_tokens=True).strip()
    # in a batch the stopped row is padded on; its answer is still cut at the stop token
    other = _prompts(3)[2]
    both = gen.generate_batch([prompt, other], 10)
    assert both[0] == g and both[1] == gen.generate_batch([other], 10)[0]


def test_stop_tokens_include_im_end_when_the_eos_is_another_token(tmp_path):
    from transformers import AutoTokenizer

    from tests.fixtures.train import write_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path / "tok"))  # eos <|endoftext|> (id 0)
    assert stop_token_ids(tok) == [0, 2]
    assert stop_token_ids(tok, [7, 0]) == [0, 2, 7]


def test_a_models_generation_config_cannot_change_greedy_decoding(tiny, base, tmp_path):
    """Chat models ship sampling defaults and a repetition penalty in generation_config.json; eval stays greedy."""
    prompts = _prompts(3)
    model = shutil.copytree(tiny["model"], tmp_path / "model")
    cfg = json.loads((model / "generation_config.json").read_text())
    cfg.update(do_sample=True, temperature=0.7, top_k=5, repetition_penalty=1.8, no_repeat_ngram_size=2)
    (model / "generation_config.json").write_text(json.dumps(cfg))
    assert HFGenerator(str(model)).generate_batch(prompts, 20) == base.generate_batch(prompts, 20)


def test_generate_all_returns_answers_in_prompt_order_with_counts(base):
    prompts = _prompts(6)
    gens, stats = generate_all(base, prompts, max_new_tokens=8, batch_tokens=200, progress=False)
    plan = plan_batches([len(base.prompt_ids(p)) for p in prompts], 8, 200)
    assert len(plan) > 1
    assert [g.id for g in gens] == [p.id for p in prompts]
    assert gens == base.generate_batch(prompts, 8)
    assert stats["questions"] == 6 and stats["batches"] == len(plan) and stats["backend"] == "transformers"
    assert stats["new_tokens"] == sum(g.new_tokens for g in gens) == 5 * 8 + 1  # q1 stops after 1 token
    assert stats["prompt_tokens"] == sum(g.prompt_tokens for g in gens)
    # seconds is rounded to the millisecond and tokens/s computed before that rounding: on a fast run (0.044 s) the
    # millisecond alone is over 1%, so the rate is checked against the interval the rounded seconds allow
    seconds = stats["seconds"]
    assert 41 / (seconds + 0.0005) - 0.05 <= stats["tokens_per_s"] <= 41 / max(seconds - 0.0005, 1e-9) + 0.05


def test_vllm_generator_sends_the_same_prompt_ids_and_answers_as_transformers(tiny, base):
    prompts = _prompts(4)
    lora = HFGenerator(str(tiny["model"]), adapter=str(tiny["adapter"]))
    engine = StandInEngine(base, lora)
    vllm = VllmGenerator(str(tiny["model"]), engine=engine)
    assert vllm.generate_batch(prompts, 10) == base.generate_batch(prompts, 10)
    call = engine.calls[-1]
    assert call["prompts"] == [{"prompt_token_ids": base.prompt_ids(p)} for p in prompts]
    assert call["lora_request"] is None
    params = call["params"]
    assert (params.temperature, params.max_tokens, list(params.stop_token_ids)) == (0.0, 10, base.stop_ids)
    assert params.repetition_penalty == 1.0
    # generate_all hands vLLM every question at once, answers back in prompt order
    gens, stats = generate_all(vllm, prompts, max_new_tokens=10, batch_tokens=100, progress=False)
    assert stats["batches"] == 1 and stats["backend"] == "vllm" and gens == base.generate_batch(prompts, 10)

    with_lora = VllmGenerator(str(tiny["model"]), adapter=str(tiny["adapter"]), engine=engine)
    assert with_lora.generate_batch(prompts, 10) == lora.generate_batch(prompts, 10)
    assert engine.calls[-1]["lora_request"].lora_path == str(tiny["adapter"])


def test_choose_backend_says_which_and_why(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backend("auto") == "transformers"
    assert "auto: no CUDA" in capsys.readouterr().err
    monkeypatch.setattr(G, "vllm_importable", lambda: False)
    with pytest.raises(ConfigError, match=r"^eval\.backend: vllm is not installed") as err:
        choose_backend("vllm")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend("auto") == "transformers"
    monkeypatch.setattr(G, "vllm_importable", lambda: True)
    assert choose_backend("auto") == "vllm" and choose_backend("transformers") == "transformers"
    with pytest.raises(ConfigError, match="eval.backend: 'tgi'"):
        choose_backend("tgi")


def test_bad_model_folders_fail_with_one_line_naming_the_field(tiny, tmp_path):
    def error(path, **kw) -> str:
        with pytest.raises(ConfigError) as err:
            load_generator(str(path), backend="transformers", field="eval.models[0]", **kw)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert error("").startswith("eval.models[0].path: empty")
    assert error(tmp_path / "nope").startswith(f"eval.models[0].path: '{tmp_path / 'nope'}' not found")
    (tmp_path / "empty").mkdir()
    assert "is not a model folder (no config.json)" in error(tmp_path / "empty")
    msg = error(tiny["model"], adapter=str(tmp_path / "no-adapter"))
    assert msg.startswith("eval.models[0].adapter: ") and "not found" in msg
    assert "no adapter_config.json" in error(tiny["model"], adapter=str(tiny["merged"]))
    plain = shutil.copytree(tiny["model"], tmp_path / "no-template")
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    msg = error(plain)
    assert msg.startswith("eval.models[0].path: ") and "has no chat template" in msg
    # another model's tokenizer: ids beyond the model's embeddings
    from transformers import AutoConfig, AutoModelForCausalLM

    small = shutil.copytree(tiny["model"], tmp_path / "small-vocab")
    conf = AutoConfig.from_pretrained(small)
    conf.vocab_size = 64
    AutoModelForCausalLM.from_config(conf).save_pretrained(small)
    msg = error(small)
    assert msg.startswith("eval.models[0].path: the tokenizer in ") and "tokenizer and model do not match" in msg


def test_export_records_the_trained_system_prompt_for_eval(tiny, tmp_path, monkeypatch):
    """export.json says how the model was prompted in training: the shards' system prompt (their manifest), or the
    run config's when the data folder is gone; exported_system_prompt reads it back."""
    from transformers import AutoModelForCausalLM

    import train.export as export

    run, data = tmp_path / "run", tmp_path / "data"
    (run / "checkpoints" / "step-0000001").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-0000001")
    state = {"step": 1, "lora": False, "base_model": str(tiny["model"]), "tokenizer": str(tiny["model"])}
    (run / "checkpoints" / "step-0000001" / "trainer_state.json").write_text(json.dumps(state))
    cfg = {"model": {"init": "random"}, "data": {"system_prompt": "配置里的提示"}, "train": {"data_dir": str(data)}}
    (run / "config.yaml").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    sd = AutoModelForCausalLM.from_pretrained(tiny["model"]).state_dict()
    monkeypatch.setattr(export, "_gather_state_dict", lambda d, t: sd)

    export.run_export(run, tmp_path / "out-config")
    assert exported_system_prompt(tmp_path / "out-config") == "配置里的提示"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"system_prompt": "分片里的提示"}), encoding="utf-8")
    summary = export.run_export(run, tmp_path / "out")
    assert summary["chat_template"] is True and summary["system_prompt"] == "分片里的提示"
    assert exported_system_prompt(tmp_path / "out") == "分片里的提示"
    assert exported_system_prompt(tiny["model"]) is None  # no export.json: a base model
    assert HFGenerator(str(tmp_path / "out")).generate_batch(_prompts(2), 6) == HFGenerator(
        str(tiny["model"])
    ).generate_batch(_prompts(2), 6)
