"""pref-accuracy in `cbt-llm eval` (evaluation/preference.py, cbt_llm/inference/logprobs.py): the share of held-out
preference pairs whose chosen answer has the higher mean log-probability per token under the model.

What must hold: the scored tokens are prepare's labels (the answer and its end token, the text encoded at once);
the log-probabilities equal a direct forward pass, whatever the batching; a model trained on the chosen answers
prefers them all (1.0), an untrained one scores what a direct computation gives; an endpoint is n/c; the metric is
in results.json, report.md and the summary table; a preference data folder's heldout_pairs.jsonl is read by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cbt_llm.cli import main
from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.chat_format import IM_END, chat_renderer
from cbt_llm.inference.logprobs import answer_logprobs, encode_answer, plan
from cbt_llm.inference.tokenizer import load_tokenizer
from data_pipeline.prepare.encode import encode_batch
from data_pipeline.shards import IGNORE
from evaluation import preference
from tests.fixtures.eval import tiny_chat_model
from tests.fixtures.fake_openai_server import FakeOpenAIServer
from tests.fixtures.paths import ROOT
from tests.fixtures.tiny import make_preference_shards, make_shards

SYSTEM = "你是一名心理咨询师。"
CHOSEN = "听起来你最近很辛苦,这种感受可以理解。我们可以一起慢慢来,先试着每天写下一个让你难受的想法。"
TOPICS = ["失眠", "考试", "同事", "父母", "工作", "分手", "社交", "拖延"]


def pair(i: int) -> dict:
    t = TOPICS[i % len(TOPICS)]
    return {
        "id": f"p{i}",
        "messages": [{"role": "user", "content": f"最近因为{t}很难受,第{i}次了,我该怎么办?"}],
        "chosen": CHOSEN,
        "rejected": f"别想{t}了,第{i}回忍一忍就过去了,大家都这样。",
        "meta": {"source": "test"},
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny random model, and a copy trained (SFT, 60 steps) on the pairs' chosen answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("pref")
    base = tiny_chat_model(root / "tiny")
    tok = load_tokenizer(str(base))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    seqs = [encode_answer(tok, [{"role": "system", "content": SYSTEM}, *pair(i)["messages"]], CHOSEN) for i in range(8)]
    width = max(len(x) for x, _ in seqs)
    ids = torch.tensor([x + [0] * (width - len(x)) for x, _ in seqs])
    labels = torch.tensor(
        [[t if keep else IGNORE for t, keep in zip(x, m)] + [IGNORE] * (width - len(x)) for x, m in seqs]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(60):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    trained = root / "trained"
    model.save_pretrained(trained, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(trained)
    return {"base": base, "trained": trained}


def direct_mean(model, tok, messages: list[dict], answer: str) -> float:
    """Mean log-prob per token of answer + end token, straight from the model: prompt ids from the chat template
    with the generation prompt, answer ids encoded alone, one sequence, no padding."""
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    ans = tok.encode(answer, add_special_tokens=False) + [tok.convert_tokens_to_ids(IM_END)]
    x = torch.tensor([prompt + ans])
    with torch.no_grad():
        lp = model(x).logits.double().log_softmax(-1)[0]
    return sum(lp[len(prompt) + k - 1, t].item() for k, t in enumerate(ans)) / len(ans)


def test_scored_tokens_are_prepares_labels_and_logprobs_are_direct(models):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(models["base"]))
    model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    items = []
    for i in range(5):
        p = pair(i)
        msgs = [{"role": "system", "content": SYSTEM}, *p["messages"]]
        items += [(msgs, p["chosen"]), (msgs, p["rejected"])]
    for msgs, answer in items[:2]:
        ids, mask = encode_answer(tok, msgs, answer)
        conv = [*msgs, {"role": "assistant", "content": answer}]
        pids, plabels, _ = encode_batch(tok, chat_renderer(tok), [conv], IM_END, learn_from=[len(msgs)])
        assert ids == pids.tolist() and mask == [x != IGNORE for x in plabels.tolist()]
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == answer + IM_END
    got = answer_logprobs(model, tok, items, batch_tokens=64, progress=False)  # several batches, right padded
    one = answer_logprobs(model, tok, items, batch_tokens=1 << 16, progress=False)  # one batch
    for g, o, (msgs, answer) in zip(got, one, items):
        assert g.mean == pytest.approx(direct_mean(model, tok, msgs, answer), abs=1e-5)
        assert g.tokens == o.tokens and g.logp == pytest.approx(o.logp, abs=1e-5)
    assert plan([5, 9, 9, 2], 18) == [[1, 2], [0, 3]] and sorted(sum(plan([3] * 7, 7), [])) == list(range(7))


def test_eval_reports_pref_accuracy_for_every_model(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(ROOT)  # the shared structure scorer artifact
    pairs_file = tmp_path / "pairs.jsonl"
    rows = [pair(i) for i in range(8)]
    bad = [json.dumps(dict(pair(99), rejected=CHOSEN), ensure_ascii=False), "{not json"]
    pairs_file.write_text("\n".join([*(json.dumps(p, ensure_ascii=False) for p in rows), *bad]) + "\n", "utf-8")
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "".join(json.dumps({"id": f"q{i}", "question": f"第{i}个问题:最近很焦虑怎么办?"}, ensure_ascii=False) + "\n"
                for i in range(2)), encoding="utf-8",
    )  # fmt: skip
    out = tmp_path / "eval"
    with FakeOpenAIServer(default="good_text") as srv:
        cfg = tmp_path / "eval.yaml"
        cfg.write_text(
            "data:\n"
            f"  system_prompt: {SYSTEM}\n"
            "eval:\n  models:\n"
            f"    - {{name: dpo, path: {models['trained']}}}\n"
            f"    - {{name: sft, path: {models['base']}}}\n"
            f"    - {{name: api, endpoint: {srv.base_url}, model: fake}}\n"
            f"  pairs: {pairs_file}\n"
            "  check_overlap: false\n  safety_probes: false\n  max_new_tokens: 4\n  bootstrap_resamples: 50\n"
            "  backend: transformers\n  device: cpu\n",
            encoding="utf-8",
        )
        rc = main(["eval", "--config", str(cfg), "--questions", str(questions), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["pairs"]["n"] == 8 and res["pairs"]["rejects"] == 2 and res["pairs"]["source"] == str(pairs_file)
    dpo, sft, api = (res["models"][m]["metrics"]["pref-accuracy"] for m in ("dpo", "sft", "api"))
    assert dpo["score"] == 1.0 and dpo["n"] == 8 and dpo["k"] == 8 and dpo["ci_method"].startswith("wilson")
    lo, hi = dpo["ci95"]
    assert 0.6 < lo < 1.0 == hi  # Wilson: honest at n = 8
    assert dpo["signature"].startswith("pref-accuracy:v1|pairs:") and dpo["signature"] == sft["signature"]
    # the untrained model: what a direct computation gives, pair by pair
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(models["base"]))
    model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    correct = []
    for p in rows:
        msgs = [{"role": "system", "content": SYSTEM}, *p["messages"]]
        correct.append(direct_mean(model, tok, msgs, p["chosen"]) > direct_mean(model, tok, msgs, p["rejected"]))
    assert sft["n"] == 8 and sft["score"] == pytest.approx(sum(correct) / 8)
    per_pair = [json.loads(x) for x in (out / "preference.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in per_pair if r["model"] == "sft"] == correct
    assert len(per_pair) == 16 and {r["model"] for r in per_pair} == {"dpo", "sft"}
    # an endpoint gives no log-probabilities: not computed, said so
    assert api["score"] is None and "endpoint" in api["note"]
    table = next(line for line in err.splitlines() if "pref-accuracy" in line)
    assert "1.000" in table and table.rstrip(" |").endswith("n/c")
    report = (out / "report.md").read_text()
    assert "| pref-accuracy | 1.000 [" in report and "Preference pairs (pref-accuracy)" in report
    reasons = sorted(json.loads(x)["reason"] for x in (out / "rejects.jsonl").read_text().splitlines())
    assert len(reasons) == 2 and reasons[0].startswith("pairs: not valid JSON") and "same_answers" in reasons[1]


def test_pairs_come_from_a_preference_data_folder(tmp_path, capsys, monkeypatch):
    data = make_preference_shards(tmp_path / "data", rows_per_shard=3, train_shards=2, val_rows=2)
    cfg = Config.model_validate({"eval": {"data_dir": str(data)}})
    ps = preference.load_pair_set(cfg)
    held = [json.loads(x) for x in (data / "heldout_pairs.jsonl").read_text().splitlines()]
    assert ps is not None and [p.example_id for p in ps.pairs] == [h["id"] for h in held]
    assert ps.source == str(data / "heldout_pairs.jsonl") and ps.facts()["n"] == len(held)
    # a prompt without a system turn gets the model's; one with its own keeps it
    assert held[0]["messages"][0]["role"] == "user"  # the fixture's pairs have no system turn
    assert ps.items("系统")[0][0] == [{"role": "system", "content": "系统"}, *held[0]["messages"]]
    # an SFT folder, or none at all, has no pairs: no pref-accuracy
    sft = make_shards(tmp_path / "sft")
    assert preference.load_pair_set(Config.model_validate({"eval": {"data_dir": str(sft)}})) is None
    assert preference.load_pair_set(Config.model_validate({"eval": {"data_dir": str(tmp_path / "none")}})) is None
    with pytest.raises(ConfigError, match="eval.pairs: '.*missing.jsonl' not found"):
        preference.load_pair_set(Config.model_validate({"eval": {"pairs": str(tmp_path / "missing.jsonl")}}))
    # a predictions file has no model: pref-accuracy is not computed, and says why
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(ROOT)
    preds = tmp_path / "sys.jsonl"
    preds.write_text(json.dumps({"id": "a", "output": CHOSEN}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "eval"
    args = ["eval", "--predictions", str(preds), "--out", str(out), f"eval.data_dir={data}", "eval.check_overlap=false"]
    assert main([*args, "eval.safety_probes=false"]) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    m = res["models"]["sys"]["metrics"]["pref-accuracy"]
    assert m["score"] is None and "predictions" in m["note"] and res["pairs"]["n"] == len(held)
