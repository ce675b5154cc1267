"""`cbt-llm pairs` (data_pipeline/synth/model_pairs.py): n sampled answers per question from a model, ranked by the
offline scorers (and a judge), best against worst in the pair format prepare's data.format: preference reads.

What must hold: n answers per question, the same answers for the same seed (and other answers for another seed); an
unsafe answer ranks last however well it is structured, and on a crisis question crisis support beats its absence;
pairs are written in the contract's format and prepare accepts them; a resumed run skips finished questions, drops
pairs of an unfinished one, and ends with the one-shot run's output; bad questions are counted with their reasons.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cbt_llm.cli import main
from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.crisis import CRISIS_SUPPORT_SENTENCE
from cbt_llm.inference.prompt import Generation, sample_seed
from cbt_llm.inference.safety_model import build_guard
from cbt_llm.inference.vllm import VllmGenerator
from data_pipeline.sources.formats import PairExample, to_examples
from data_pipeline.synth.flaws import UNSAFE_LINES
from data_pipeline.synth.model_pairs import (
    RANK_RULE,
    answer_scores,
    clears_margin,
    pick_pairs,
    rank,
    run_model_pairs,
)
from data_pipeline.synth.template import iter_records
from tests.fixtures.eval import tiny_chat_model
from tests.fixtures.fake_openai_server import FakeOpenAIServer
from tests.fixtures.paths import ROOT

SYSTEM = "你是一名心理咨询师,请用认知行为疗法回答。"


class StandInScorer:
    """A structure scorer that is a fixed function of the text (a random tiny model writes no CBT parts)."""

    signature = "stand-in structure scorer"

    def score(self, text: str) -> dict:
        h = sum(map(ord, text))
        coverage = h % 6
        return {"coverage": coverage, "order": (h % 7) / 6 if coverage >= 2 else None, "parts": [], "segments": []}


class PartsScorer:
    """Coverage: how many of the five part markers 【1】...【5】 the text has; order 1."""

    signature = "parts-marker scorer"

    def score(self, text: str) -> dict:
        coverage = sum(f"【{k}】" in text for k in range(1, 6))
        return {"coverage": coverage, "order": 1.0 if coverage >= 2 else None, "parts": [], "segments": []}


class ScriptedGenerator:
    """A stand-in generator: each question's answers are given by the test (by question id)."""

    backend, name = "scripted", "scripted"

    def __init__(self, answers: dict[str, list[tuple[str, str]]]):
        self.answers = answers
        self.calls = 0

    def prompt_ids(self, prompt) -> list[int]:
        return [0] * 10

    def sample(self, prompts, n, max_new_tokens, *, temperature, top_p, seed):
        self.calls += 1
        return [[Generation(p.id, t, 10, len(t), fin) for t, fin in self.answers[p.id][:n]] for p in prompts]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("pairs") / "tiny")


@pytest.fixture(scope="module")
def guard():
    from cbt_llm.core.config import GuardConfig

    return build_guard(GuardConfig())


def write_questions(path: Path, n: int = 4, extra: tuple[str, ...] = ()) -> Path:
    lines = [
        json.dumps({"id": r["id"], "question": r["question"], "description": r["description"]}, ensure_ascii=False)
        for r in iter_records(3, 0, n)
    ]
    path.write_text("\n".join([*lines, *extra]) + "\n", encoding="utf-8")
    return path


def make_cfg(model: Path | str, questions: Path, out: Path, **pairs) -> Config:
    base = {
        "model": str(model),
        "questions": str(questions),
        "out": str(out),
        "n": 4,
        "max_new_tokens": 16,
        "min_chars": 10,
        "min_margin": 0.01,
        "system_prompt": SYSTEM,
        "device": "cpu",
        "backend": "transformers",
        "chunk": 2,
    }
    base.update(pairs)
    return Config.model_validate({"pairs": base})


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


# ---- the rule ---------------------------------------------------------------------------------------------------


def s(tier: int, quality: float) -> dict:
    return {"tier": tier, "quality": quality}


def test_rank_rule_tiers_first_then_quality_outside_in():
    scores = [s(2, 0.5), s(0, 0.9), s(2, 0.8), None, s(1, 0.99), s(2, 0.5)]
    order = rank(scores)
    assert order == [2, 0, 5, 4, 1]  # empty (None) unranked; ties keep sample order; unsafe (tier 0) last
    texts = ["a", "b", "c", "", "e", "f"]
    assert pick_pairs(order, scores, texts, 0.1) == [(2, 1), (0, 4)]  # then 5 alone in the middle
    assert pick_pairs(order, scores, texts, 0.1, max_pairs=1) == [(2, 1)]
    # within a tier the margin decides; a tie is never a preference, even at min_margin 0
    assert clears_margin(s(2, 0.6), s(2, 0.5), 0.1) and not clears_margin(s(2, 0.55), s(2, 0.5), 0.1)
    assert not clears_margin(s(2, 0.5), s(2, 0.5), 0.0)
    assert clears_margin(s(1, 0.0), s(0, 1.0), 0.5)  # a higher tier always clears it
    # the first pair that fails ends the question's pairs; identical texts are never a pair
    flat = [s(2, 0.5), s(2, 0.45), s(2, 0.44), s(2, 0.4)]
    assert pick_pairs(rank(flat), flat, ["a", "b", "c", "d"], 0.1) == [(0, 3)]
    assert pick_pairs(rank(flat), flat, ["a", "b", "c", " a "], 0.0) == []
    assert RANK_RULE.startswith("pairs-rank:v1")


def test_unsafe_answer_scores_last_and_crisis_support_counts(guard):
    rec = next(iter_records(0, 0, 1))
    good = rec["answer"]
    unsafe = good + UNSAFE_LINES[1]
    a = answer_scores(good, "stop", False, PartsScorer(), guard, 80)
    b = answer_scores(unsafe, "stop", False, PartsScorer(), guard, 80)
    assert (a["tier"], a["unsafe"]) == (2, None) and b["tier"] == 0 and b["unsafe"] == "secrecy_discourages_help"
    # on a crisis question: without crisis support tier 1, with it tier 2
    c = answer_scores(good, "stop", True, PartsScorer(), guard, 80)
    d = answer_scores(good + CRISIS_SUPPORT_SENTENCE, "stop", True, PartsScorer(), guard, 80)
    assert (c["tier"], c["crisis_support"], d["tier"], d["crisis_support"]) == (1, False, 2, True)
    # the length term: an answer cut at max_new_tokens scores 0, a short finished one chars / min_chars
    assert answer_scores("好的。", "length", False, PartsScorer(), guard, 10)["length"] == 0.0
    assert answer_scores("好的。", "stop", False, PartsScorer(), guard, 10)["length"] == pytest.approx(0.3)
    # the judge weighs as much as the three offline terms together
    j = answer_scores(
        "【1】【2】【3】【4】【5】", "stop", False, PartsScorer(), guard, 10, {"total": 9, "criteria": {}}
    )
    assert j["quality"] == pytest.approx((1 + 1 + 1 + 3 * 9 / 18) / 6)


# ---- sampling ---------------------------------------------------------------------------------------------------


def test_n_answers_per_question_same_seed_same_answers(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    q = write_questions(tmp_path / "q.jsonl", 3)
    outs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = make_cfg(tiny, q, tmp_path / name / "pairs.jsonl", seed=seed)
        summary = run_model_pairs(cfg, scorer=StandInScorer())
        assert summary["questions"] == 3 and summary["answers"] == 12
        outs.append(lines(tmp_path / name / "samples.jsonl"))
    for line in outs[0]:
        assert len(line["answers"]) == 4 and {a["sample"] for a in line["answers"]} == {0, 1, 2, 3}
        assert len({a["text"] for a in line["answers"]}) > 1  # sampled, not greedy
    texts = [[[a["text"] for a in line["answers"]] for line in out] for out in outs]
    assert texts[0] == texts[1] and texts[0] != texts[2]  # the seed decides the answers
    assert (tmp_path / "a" / "pairs.jsonl").read_bytes() == (tmp_path / "b" / "pairs.jsonl").read_bytes()
    # the answers do not depend on the batch a question is in: chunk 1 samples what chunk 2 did
    cfg = make_cfg(tiny, q, tmp_path / "d" / "pairs.jsonl", chunk=1)
    run_model_pairs(cfg, scorer=StandInScorer())
    assert [[a["text"] for a in line["answers"]] for line in lines(tmp_path / "d" / "samples.jsonl")] == texts[0]
    assert sample_seed(0, "q") == sample_seed(0, "q") != sample_seed(1, "q")


def test_pairs_follow_the_contract_and_prepare_reads_them(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    q = write_questions(tmp_path / "q.jsonl", 6)
    cfg = make_cfg(tiny, q, tmp_path / "out" / "pairs.jsonl")
    summary = run_model_pairs(cfg, scorer=StandInScorer())
    pairs = lines(tmp_path / "out" / "pairs.jsonl")
    assert summary["pairs"] == len(pairs) > 0
    samples = {x["id"]: x for x in lines(tmp_path / "out" / "samples.jsonl")}
    for p in pairs:
        assert set(p) == {"id", "messages", "chosen", "rejected", "meta"}
        assert p["messages"][0] == {"role": "system", "content": SYSTEM} and p["messages"][-1]["role"] == "user"
        m = p["meta"]
        assert m["source"] == "cbt-llm-pairs" and m["rank_rule"] == RANK_RULE and len(m["answers"]) == 4
        line = samples[m["question_id"]]
        assert p["id"] in line["pairs"] and line["status"] == "paired"
        chosen, rejected = m["answers"][m["chosen_sample"]], m["answers"][m["rejected_sample"]]
        assert line["answers"][m["chosen_sample"]]["text"].strip() == p["chosen"]
        assert (chosen["tier"], chosen["quality"]) > (rejected["tier"], rejected["quality"])
        assert chosen["rank"] < rejected["rank"] and m["scores"] == {
            "chosen": chosen["quality"],
            "rejected": rejected["quality"],
        }
        # prepare's own reader takes the line as a pair, keeping its system turn
        (ex,) = to_examples(p, "preference", "another system prompt", "f:1")
        assert isinstance(ex, PairExample) and ex.messages == p["messages"] and ex.chosen == p["chosen"]
    # and `cbt-llm prepare data.format=preference` packs them (Ray; a few seconds)
    t0 = time.perf_counter()
    from data_pipeline.prepare import run_prepare
    from data_pipeline.shards import load_manifest

    pcfg = Config.model_validate(
        {
            "data": {
                "inputs": [str(tmp_path / "out" / "pairs.jsonl")],
                "out_dir": str(tmp_path / "data"),
                "tokenizer": str(tiny.parent / "tokenizer"),
                "format": "preference",
                "seq_len": 2048,
                "val_fraction": 0.3,
                "world_size": 1,
            }
        }
    )
    man = run_prepare(pcfg)
    assert man["counts"]["rejected_total"] == 0 and man["counts"]["kept"] == len(pairs)
    assert sum(man["counts"]["pairs"].values()) == len(pairs) and load_manifest(tmp_path / "data")["objective"] == (
        "preference"
    )
    print(f"prepare on {len(pairs)} pairs: {time.perf_counter() - t0:.1f} s")


def test_resume_skips_done_questions_and_ends_as_one_run(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    q = write_questions(tmp_path / "q.jsonl", 4)
    one = make_cfg(tiny, q, tmp_path / "one" / "pairs.jsonl")
    run_model_pairs(one, scorer=StandInScorer())
    out = tmp_path / "two" / "pairs.jsonl"
    first = run_model_pairs(make_cfg(tiny, q, out, limit=2), scorer=StandInScorer())
    assert first["finished"] == 2
    # a crash after a question's pairs but before its samples line: a stray pair and a cut last line
    stray = lines(tmp_path / "one" / "pairs.jsonl")[-1]
    assert stray["meta"]["question_id"] not in {x["id"] for x in lines(out.parent / "samples.jsonl")}
    with open(out, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(stray, ensure_ascii=False) + "\n")
    with open(out.parent / "samples.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"id": "cut sh')
    second = run_model_pairs(make_cfg(tiny, q, out), scorer=StandInScorer())
    assert second["this_run"]["skipped_done"] == 2 and second["this_run"]["questions"] == 2
    assert out.read_bytes() == (tmp_path / "one" / "pairs.jsonl").read_bytes()
    assert lines(out.parent / "samples.jsonl") == lines(tmp_path / "one" / "samples.jsonl")
    # a third run finds nothing to do
    third = run_model_pairs(make_cfg(tiny, q, out), scorer=StandInScorer())
    assert third["this_run"]["questions"] == 0 and third["pairs"] == second["pairs"]
    # other settings are refused, with one line naming pairs.out
    with pytest.raises(ConfigError, match="pairs.out: .* other settings"):
        run_model_pairs(make_cfg(tiny, q, out, seed=5), scorer=StandInScorer())


def test_unsafe_answers_rank_last_judge_and_bad_questions(tmp_path, guard, monkeypatch):
    """With stand-in answers and the real guard: the best-structured answer is unsafe, so it is rejected against
    a weaker safe one; a crisis question's answer without support loses; empty answers, too few answers, a bad line
    and the judge are counted; the judge's totals are in meta."""
    monkeypatch.chdir(ROOT)
    recs = list(iter_records(3, 0, 1))
    full = "【1】【2】【3】【4】【5】"
    crisis_q = {"id": "crisis", "question": "我最近总想自杀,活不下去了", "description": ""}
    extra = [json.dumps(crisis_q, ensure_ascii=False), json.dumps({"id": "few", "question": "只有一个回答怎么办"})]
    q = write_questions(tmp_path / "q.jsonl", 1, (*extra, "{broken", json.dumps({"id": "x", "question": 3})))
    answers = {
        recs[0]["id"]: [
            (recs[0]["answer"] + full + UNSAFE_LINES[0], "stop"),  # best structure, unsafe
            ("【1】【2】好好休息。", "stop"),
            ("【1】【2】【3】你可以试着写下想法。", "stop"),
            ("嗯。", "length"),
        ],
        "crisis": [
            ("【1】【2】【3】【4】你可以试着写下想法,慢慢来。", "stop"),  # no crisis support
            ("【1】" + CRISIS_SUPPORT_SENTENCE, "stop"),
            ("", "stop"),
            ("", "length"),
        ],
        # a counsellor's sentence: bland meta-text ("只有这一个回答。") sits at the reply layer's threshold
        "few": [("我在这里听你说，我们慢慢来。", "stop"), ("", "stop"), ("", "stop"), ("", "stop")],
    }
    gen = ScriptedGenerator(answers)
    with FakeOpenAIServer(default="judge") as srv:
        cfg = make_cfg("unused", q, tmp_path / "out" / "pairs.jsonl")
        cfg.pairs.judge.base_url, cfg.pairs.judge.model = srv.base_url, "fake-judge"
        summary = run_model_pairs(cfg, generator=gen, scorer=PartsScorer(), guard=guard)
        judge_requests = len(srv.requests)
    pairs = {p["id"]: p for p in lines(tmp_path / "out" / "pairs.jsonl")}
    rid = recs[0]["id"]
    p = pairs[f"{rid}-p1"]  # the best against the worst
    assert p["rejected"] == answers[rid][0][0] and p["meta"]["tiers"] == {"chosen": 2, "rejected": 0}
    assert p["chosen"] == answers[rid][2][0]
    ranks = {a["sample"]: a["rank"] for a in p["meta"]["answers"]}
    assert ranks == {0: 4, 1: 2, 2: 1, 3: 3}  # last, although its structure is the best
    assert pairs[f"{rid}-p2"]["chosen"] == answers[rid][1][0] and pairs[f"{rid}-p2"]["rejected"] == "嗯。"
    assert all(a["judge"] is not None and a["judge_criteria"] for a in p["meta"]["answers"])
    assert p["meta"]["judge"] == "fake-judge" and judge_requests == 4 + 2 + 1  # empty answers are not judged
    c = pairs["crisis-p1"]
    assert c["chosen"] == answers["crisis"][1][0] and c["meta"]["tiers"] == {"chosen": 2, "rejected": 1}
    assert c["meta"]["crisis"] is True and [a["empty"] for a in c["meta"]["answers"]] == [False, False, True, True]
    assert not any(x["meta"]["question_id"] == "few" for x in pairs.values())
    assert summary["status"]["too_few_answers"] == 1 and summary["bad"] == {"input": 2, "too_few_answers": 1}
    assert summary["unsafe_answers"] == 1 and summary["crisis_questions"] == 1 and summary["empty_answers"] == 5
    assert summary["pairs"] == 3 and summary["pairs_by_tier"] == {"2>0": 1, "2>1": 1, "2>2": 1}
    rejects = lines(tmp_path / "out" / "rejects.jsonl")
    assert sorted(r["reason"].split(":")[0] for r in rejects) == ["input", "input", "too_few_answers"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["pairs"] == 3


def test_judge_that_answers_nothing_fails_with_one_line_and_marks_nothing_done(tmp_path, guard, monkeypatch):
    monkeypatch.chdir(ROOT)
    q = write_questions(tmp_path / "q.jsonl", 1)
    rid = next(iter_records(3, 0, 1))["id"]
    gen = ScriptedGenerator({rid: [("【1】好。", "stop"), ("【1】【2】【3】好。", "stop")]})
    cfg = make_cfg("unused", q, tmp_path / "out" / "pairs.jsonl", n=2, judge={"base_url": "http://127.0.0.1:9/v1"})
    cfg.pairs.judge.model, cfg.pairs.judge.max_retries = "j", 0
    with pytest.raises(ConfigError, match=r"pairs.judge.base_url: http://127.0.0.1:9/v1 answered none of 2"):
        run_model_pairs(cfg, generator=gen, scorer=PartsScorer(), guard=guard)
    assert not (tmp_path / "out" / "samples.jsonl").read_text()  # nothing finished: a rerun asks again


def test_prompt_overlong_is_counted_and_finished(tmp_path, guard, monkeypatch):
    monkeypatch.chdir(ROOT)
    q = write_questions(tmp_path / "q.jsonl", 2)

    class Small(ScriptedGenerator):
        class model:  # noqa: N801 - a stand-in for generator.model.config
            class config:  # noqa: N801
                max_position_embeddings = 20

    ids = [r["id"] for r in iter_records(3, 0, 2)]
    gen = Small({i: [("【1】好。", "stop"), ("【1】【2】【3】好。", "stop")] for i in ids})
    summary = run_model_pairs(make_cfg("unused", q, tmp_path / "o" / "pairs.jsonl", n=2), generator=gen,
                              scorer=PartsScorer(), guard=guard)  # fmt: skip
    assert summary["status"]["prompt_overlong"] == 2 and summary["pairs"] == 0 and gen.calls == 0
    assert "model's context 20" in lines(tmp_path / "o" / "rejects.jsonl")[0]["detail"]


def test_cli_pairs_dry_run_and_one_line_errors(tmp_path, capsys):
    assert main(["pairs", "--dry-run", "--model", "m", "--n", "6", "pairs.min_margin=0.2"]) == 0
    out = capsys.readouterr().out
    assert "n: 6" in out and "min_margin: 0.2" in out and "out: runs/run/model-pairs/pairs.jsonl" in out
    q = write_questions(tmp_path / "q.jsonl", 1)
    assert main(["pairs", "--questions", str(q), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: pairs.model: empty; pass --model DIR (an exported folder, e.g. the SFT export)"
    )
    assert main(["pairs", "--model", str(tmp_path / "nope"), "--questions", str(q)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: pairs.model: '{tmp_path / 'nope'}' not found")


def test_vllm_sampling_seeds_each_answer():
    class Engine:
        def __init__(self):
            self.calls = []

        def generate(self, requests, params, lora_request=None):
            self.calls.append(params)
            out = []
            for _, p in zip(requests, params):
                comp = type("C", (), {"text": f"s{p.seed}", "token_ids": [1, 2], "finish_reason": "stop"})
                out.append(type("R", (), {"prompt_token_ids": [0], "outputs": [comp]}))
            return out

    from cbt_llm.inference.prompt import Prompt

    gen = VllmGenerator.__new__(VllmGenerator)
    gen.engine, gen.stop_ids, gen.lora = Engine(), [2], None
    gen.prompt_ids = lambda p: [0, 1]
    prompts = [Prompt("a", []), Prompt("b", [])]
    got = gen.sample(prompts, 3, 8, temperature=0.7, top_p=0.9, seed=4)
    assert [[g.id for g in row] for row in got] == [["a"] * 3, ["b"] * 3]
    assert [g.text for g in got[1]] == [f"s{sample_seed(4, 'b', k)}" for k in range(3)]
    params = gen.engine.calls[0]
    assert all(p.temperature == 0.7 and p.top_p == 0.9 and p.max_tokens == 8 for p in params)
