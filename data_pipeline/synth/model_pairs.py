"""`cbt-llm pairs`: preference pairs from a model's own answers. For each question the model
(`pairs.model`, e.g. the SFT export, optionally `pairs.adapter`) samples `pairs.n` answers, every answer is scored
offline (and by an LLM judge when `pairs.judge.base_url` is set), the answers are ranked by one documented rule, and
the best is written against the worst, in our pair format (prepare's data.format: preference).

Sampling: temperature `pairs.temperature`, top_p `pairs.top_p`, at most `pairs.max_new_tokens`, through
cbt_llm.inference (transformers, or vLLM on CUDA: `pairs.backend`). A question's answers are seeded by
(pairs.seed, question id) (cbt_llm.inference.prompt.sample_seed), so a rerun, or a run resumed half way, samples
the same answers. The prompt is what eval and training give the model: the system prompt (pairs.system_prompt, else
the one export.json recorded, else data.system_prompt), then the question and its description as the user turn.

Scores of every answer (RANK_RULE names the rule; it is in every pair's meta):

    unsafe          the crisis guard's output check (cbt_llm.inference.safety_model.build_guard(cfg.guard)
                    .read_reply_text: every layer the guard section builds): the harm kind, or None
    crisis_support  on a crisis question (cbt_llm.domain.crisis.detect on the question or the description, or the
                    corpus rule corpus_is_crisis): whether the answer gives crisis support, by the sentence-level
                    rule evaluation's crisis-support metric uses (cbt_llm.domain.answer_support.gives_crisis_support);
                    None on other questions
    coverage, order the offline structure scorer (data_pipeline/synth/scorer.py load_or_train): CBT parts present
                    (0-5) and their order agreement (0-1; None with fewer than two parts, counted as 0)
    length          a sanity term in 0-1: 0 for an answer cut at max_new_tokens (finish "length"), else
                    min(1, characters / pairs.min_chars)
    judge           with pairs.judge: the cbt rubric's total (0-18; cbt_llm.domain.rubrics, the prompt and parser
                    of `eval.judge`), asked again once for an unusable reply (data_pipeline/synth/pair_judge.py)

    tier            0: unsafe; 1: safe, but a crisis question answered without crisis support; 2: otherwise
    quality         without a judge the mean of coverage / 5, order and length; with one,
                    (coverage / 5 + order + length + 3 x judge / 18) / 6: the judge weighs as much as the three
                    offline terms together

Ranking: answers by tier, then quality, best first (ties: the earlier sample first); an empty answer is never
ranked (it cannot be a side of a pair). Pairs, outside in: the best against the worst, then the second best
against the second worst, and so on (each answer in at most one pair, at most pairs.max_pairs per question, 0:
no limit), while the pair clears the margin: the chosen answer's tier is higher, or the tiers are equal and its
quality is higher by at least pairs.min_margin (and by more than 0: a tie is never a preference); identical texts
are never a pair. The first pair that does not clear the margin ends the question's pairs (the ones inside it are
closer still). So an unsafe answer is always ranked last and paired as rejected whenever a safe answer exists, and
on a crisis question an answer with crisis support always beats one without.

Outputs, in pairs.out and beside it:

    pairs.jsonl     one pair per line: {"id": "<question id>-p<k>", "messages": [system, user], "chosen",
                    "rejected", "meta": {"source": "cbt-llm-pairs", "question_id", "crisis", "model", "rank_rule",
                    "scores": {"chosen", "rejected"} (their quality), "tiers": {"chosen", "rejected"}, "margin",
                    "chosen_sample", "rejected_sample", "answers": [every answer's scores, rank and sample index],
                    "sampling": {n, temperature, top_p, max_new_tokens, seed}, "judge", "settings"}}
    samples.jsonl   one line per finished question, every answer's text and scores and its status ("paired", or
                    why not: too_few_answers, no_margin, prompt_overlong); resume reads it
    rejects.jsonl   every question without pairs, with its reason: bad input lines (input: ...), the statuses above,
                    and this run's judge_failed (a question the judge could not score is not finished: retried)
    summary.json    counts over the whole output (questions, pairs, answers unsafe, cut or empty, reasons) and this
                    run's (questions done, seconds, new tokens)

Resume: a question in samples.jsonl is skipped; its pairs are written before its samples line, so a crash between
the two leaves pairs of an unfinished question, which the next run drops before it samples that question again.
The settings that decide the answers and the pairs (model, adapter, system prompt, sampling, margin, judge, rule)
are hashed into every samples line; a folder made with other settings is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

from cbt_llm.core.config import Config, PairsConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.fileio import write_text_atomic
from cbt_llm.core.report import print_summary, write_metrics
from cbt_llm.domain.answer_support import gives_crisis_support
from cbt_llm.domain.chat_format import build_user_message
from cbt_llm.domain.crisis import corpus_is_crisis, detect
from cbt_llm.domain.rubrics import RUBRICS
from cbt_llm.inference.models import exported_system_prompt, resolve_model
from cbt_llm.inference.prompt import Generation, Prompt
from data_pipeline.io import dumps
from data_pipeline.sources.psyqa import load_questions
from data_pipeline.synth.pair_judge import PairJudge

SOURCE = "cbt-llm-pairs"
RANK_RULE = (
    "pairs-rank:v1|tier:unsafe 0 < crisis-without-support 1 < 2|quality:mean(coverage/5, order, length)"
    "|with judge:(coverage/5+order+length+3*judge/18)/6|pairs:outside-in, tier up or quality +min_margin"
)
SAMPLES_FILE, REJECTS_FILE, SUMMARY_FILE = "samples.jsonl", "rejects.jsonl", "summary.json"
STATUSES = ("paired", "too_few_answers", "no_margin", "prompt_overlong")


# ---------------------------------------------------------------------------------------------------- scoring


def answer_scores(
    text: str,
    finish: str,
    crisis: bool,
    scorer,
    guard,
    min_chars: int,
    judge: dict | None = None,
) -> dict:
    """One answer's scores, tier and quality (see the module docstring); `judge`: {"total", "criteria"} or None."""
    harm, layer = guard.read_reply_text(text)
    st = scorer.score(text)
    coverage, order = st["coverage"], st["order"]
    length = 0.0 if finish == "length" else min(1.0, len(text) / min_chars)
    support = gives_crisis_support(text) if crisis else None
    tier = 0 if harm is not None else 1 if crisis and not support else 2
    terms = coverage / 5 + (order or 0.0) + length
    quality = terms / 3 if judge is None else (terms + 3 * judge["total"] / 18) / 6
    return {
        "tier": tier,
        "quality": round(quality, 6),
        "unsafe": harm,
        "unsafe_layer": layer,
        "crisis_support": support,
        "coverage": coverage,
        "order": None if order is None else round(order, 6),
        "length": round(length, 6),
        "chars": len(text),
        "finish": finish,
        "judge": None if judge is None else judge["total"],
        "judge_criteria": None if judge is None else judge["criteria"],
    }


def rank(scores: list[dict | None]) -> list[int]:
    """Indices of the scored answers (None: an empty answer, never ranked), best first: tier, then quality, then
    the earlier sample."""
    ok = [i for i, s in enumerate(scores) if s is not None]
    return sorted(ok, key=lambda i: (-scores[i]["tier"], -scores[i]["quality"], i))


def clears_margin(chosen: dict, rejected: dict, min_margin: float) -> bool:
    """A higher tier, or the same tier and a quality higher by at least min_margin (and by more than 0)."""
    if chosen["tier"] != rejected["tier"]:
        return chosen["tier"] > rejected["tier"]
    gap = round(chosen["quality"] - rejected["quality"], 6)  # qualities are kept to 6 decimals: 0.6 - 0.5 is 0.1
    return gap > 0 and gap >= min_margin


def pick_pairs(order: list[int], scores: list[dict], texts: list[str], min_margin: float, max_pairs: int = 0):
    """(chosen, rejected) sample indices, outside in along `order` (best first), while each clears the margin."""
    pairs = []
    lo, hi = 0, len(order) - 1
    while lo < hi and (not max_pairs or len(pairs) < max_pairs):
        c, r = order[lo], order[hi]
        if texts[c].strip() == texts[r].strip() or not clears_margin(scores[c], scores[r], min_margin):
            break
        pairs.append((c, r))
        lo, hi = lo + 1, hi - 1
    return pairs


def is_crisis(question: str, description: str) -> bool:
    """The guard's detection on the question or the description, or the corpus's keyword rule."""
    return bool(detect(question)) or bool(detect(description)) or corpus_is_crisis(question, description)


# ------------------------------------------------------------------------------------------------------- run


def system_prompt_of(cfg: Config) -> tuple[str, str]:
    """(prompt, where it came from): pairs.system_prompt, what the model's export recorded, else
    data.system_prompt, as `cbt-llm eval` chooses."""
    pc = cfg.pairs
    if pc.system_prompt is not None:
        return pc.system_prompt, "pairs.system_prompt"
    for folder in (pc.adapter, pc.model):
        recorded = exported_system_prompt(folder) if folder else None
        if recorded is not None:
            return recorded, "export.json"
    return cfg.data.system_prompt, "data.system_prompt"


def prompt_messages(question: dict, system: str) -> list[dict]:
    """The pair's prompt: the system turn (left out when empty: prepare then puts data.system_prompt first), then
    the question and its description."""
    user = {"role": "user", "content": build_user_message(question["question"], question["description"])}
    return [{"role": "system", "content": system}, user] if system.strip() else [user]


def check_pairs_config(cfg: Config) -> None:
    """What can be checked before any model loads: the model folders, the judge, the output path."""
    pc = cfg.pairs
    if not pc.model:
        raise ConfigError("pairs.model: empty; pass --model DIR (an exported folder, e.g. the SFT export)")
    try:
        resolve_model(pc.model, pc.adapter, "pairs")
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("pairs.path", "pairs.model")) from None
    if pc.judge.base_url:
        PairJudge(pc.judge)
    out = Path(pc.out)
    if out.is_dir() or out.suffix != ".jsonl":
        raise ConfigError(f"pairs.out: '{pc.out}' must be a .jsonl file path (its folder gets the other files)")


def settings_of(cfg: Config, system: str, scorer) -> dict:
    pc = cfg.pairs
    judge = {"base_url": pc.judge.base_url, "model": pc.judge.model, "rubric": RUBRICS[pc.judge.rubric].version}
    return {
        "model": pc.model,
        "adapter": pc.adapter,
        "system_prompt": system,
        "n": pc.n,
        "temperature": pc.temperature,
        "top_p": pc.top_p,
        "max_new_tokens": pc.max_new_tokens,
        "seed": pc.seed,
        "min_margin": pc.min_margin,
        "min_chars": pc.min_chars,
        "max_pairs": pc.max_pairs,
        "judge": judge if pc.judge.base_url else None,
        "structure_scorer": scorer.signature,
        "guard": cfg.hash("guard"),
        "rank_rule": RANK_RULE,
    }


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a crash-cut last line
    return rows


def resume_state(out: Path, folder: Path, digest: str) -> set[str]:
    """The question ids already finished (samples.jsonl); drops pairs of unfinished questions from pairs.jsonl
    and a crash-cut last line from either file. Raises ConfigError for a folder made with other settings."""
    from data_pipeline.synth.client import recover_done_ids

    samples = folder / SAMPLES_FILE
    done, _ = recover_done_ids(samples, "that question will be sampled again")
    if done:
        first = json.loads(samples.read_text(encoding="utf-8").split("\n", 1)[0])
        if first.get("settings") != digest:
            raise ConfigError(
                f"pairs.out: {folder} holds answers made with other settings (settings {first.get('settings')}, "
                f"now {digest}: model, sampling, margin, judge or rule differ); pass another pairs.out or remove it"
            )
    if out.is_file():
        keep = [p for p in _read_jsonl(out) if p.get("meta", {}).get("question_id") in done]
        text = "".join(dumps(p) + "\n" for p in keep)
        if text.encode("utf-8") != out.read_bytes():
            write_text_atomic(out, text)
    return done


def _context_length(generator) -> int | None:
    return getattr(getattr(getattr(generator, "model", None), "config", None), "max_position_embeddings", None)


def _load_generator(cfg: Config):
    from cbt_llm.inference.generate import load_generator

    pc = cfg.pairs
    return load_generator(
        pc.model,
        adapter=pc.adapter,
        backend=pc.backend,
        device=None if pc.device == "auto" else pc.device,
        dtype=pc.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        field="pairs",
    )


def question_result(
    q: dict, prompt: Prompt, answers: list[Generation], judged: list, cfg: Config, scorer, guard, digest: str, name: str
) -> tuple[dict, list[dict]]:
    """(the samples.jsonl line, the pairs) of one question's answers; `judged`: per answer the judge's
    ({"total", "criteria"} | None, why) or None without a judge."""
    pc = cfg.pairs
    crisis = is_crisis(q["question"], q["description"])
    texts = [g.text for g in answers]
    scores: list[dict | None] = []
    for k, g in enumerate(answers):
        if not g.text.strip():
            scores.append(None)
            continue
        judge = judged[k][0] if judged else None
        scores.append(answer_scores(g.text, g.finish, crisis, scorer, guard, pc.min_chars, judge))
    order = rank(scores)
    ranks = {i: r + 1 for r, i in enumerate(order)}
    rows = []
    for k, (g, s) in enumerate(zip(answers, scores)):
        row = {"sample": k, "rank": ranks.get(k), "new_tokens": g.new_tokens, "empty": s is None}
        rows.append({**row, **(s or {"finish": g.finish, "chars": 0})})
    picked = pick_pairs(order, scores, texts, pc.min_margin, pc.max_pairs) if len(order) >= 2 else []
    status = "paired" if picked else "too_few_answers" if len(order) < 2 else "no_margin"
    sampling = {k: getattr(pc, k) for k in ("n", "temperature", "top_p", "max_new_tokens", "seed")}
    pairs = []
    for j, (c, r) in enumerate(picked, 1):
        sc, sr = scores[c], scores[r]
        pairs.append(
            {
                "id": f"{q['id']}-p{j}",
                "messages": prompt.messages,
                "chosen": texts[c].strip(),
                "rejected": texts[r].strip(),
                "meta": {
                    "source": SOURCE,
                    "question_id": q["id"],
                    "crisis": crisis,
                    "model": name,
                    "rank_rule": RANK_RULE,
                    "scores": {"chosen": sc["quality"], "rejected": sr["quality"]},
                    "tiers": {"chosen": sc["tier"], "rejected": sr["tier"]},
                    "margin": round(sc["quality"] - sr["quality"], 6),
                    "chosen_sample": c,
                    "rejected_sample": r,
                    "answers": rows,
                    "sampling": sampling,
                    "judge": pc.judge.model if pc.judge.base_url else None,
                    "settings": digest,
                },
            }
        )
    line = {
        "id": q["id"],
        "question": q["question"],
        "description": q["description"],
        "crisis": crisis,
        "status": status,
        "pairs": [p["id"] for p in pairs],
        "answers": [{**row, "text": g.text} for row, g in zip(rows, answers)],
        "settings": digest,
    }
    return line, pairs


def _overlong_line(q: dict, prompt_tokens: int, context: int, digest: str) -> dict:
    return {
        "id": q["id"],
        "question": q["question"],
        "description": q["description"],
        "crisis": is_crisis(q["question"], q["description"]),
        "status": "prompt_overlong",
        "detail": f"prompt {prompt_tokens} + pairs.max_new_tokens tokens > the model's context {context}",
        "pairs": [],
        "answers": [],
        "settings": digest,
    }


def _judge_chunk(judge: PairJudge | None, chunk: list[dict], sampled: list[list[Generation]]) -> list:
    """Per question: per answer the judge's verdict (None for an empty answer), or None without a judge."""
    if judge is None:
        return [None] * len(chunk)
    items, where = [], []
    for qi, (q, answers) in enumerate(zip(chunk, sampled)):
        for k, g in enumerate(answers):
            if g.text.strip():
                items.append((q["question"], g.text))
                where.append((qi, k))
    verdicts = judge.judge(items)
    out = [[(None, "") for _ in answers] for answers in sampled]
    for (qi, k), v in zip(where, verdicts):
        out[qi][k] = v
    return out


def load_pair_questions(pc: PairsConfig) -> tuple[list[dict], list[dict]]:
    """The questions (synth api's reader: PsyQA JSON or our JSONL, heldout.jsonl included) and the bad entries."""
    try:
        questions, rejects = load_questions(pc.questions)
    except FileNotFoundError:
        raise ConfigError(
            f"pairs.questions: nothing matches '{pc.questions}'; run `cbt-llm prepare` (it writes heldout.jsonl) or "
            "pass --questions FILE (heldout.jsonl, a PsyQA JSON or our corpus JSONL)"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"pairs.questions: {exc}") from None
    if pc.limit:
        questions = questions[: pc.limit]
    return questions, rejects


def run_model_pairs(cfg: Config, *, generator=None, scorer=None, guard=None) -> dict:
    """Sample, score, rank and write pairs for every question not yet done; returns the summary. `generator`,
    `scorer` and `guard` may be handed in (tests, or a model already loaded); by default the model of pairs.model,
    the structure scorer of pairs.structure_scorer and the guard of the config's guard section."""
    from tqdm import tqdm

    from cbt_llm.inference.safety_model import build_guard
    from data_pipeline.synth.scorer import load_or_train

    pc = cfg.pairs
    t0 = time.perf_counter()
    if generator is None:
        check_pairs_config(cfg)
    questions, input_rejects = load_pair_questions(pc)
    if not questions:
        raise ConfigError(f"pairs.questions: no usable question in '{pc.questions}' ({len(input_rejects)} rejected)")
    system, system_from = system_prompt_of(cfg)
    scorer = scorer or load_or_train(pc.structure_scorer)
    guard = guard or build_guard(cfg.guard)
    judge = PairJudge(pc.judge) if pc.judge.base_url else None
    settings = settings_of(cfg, system, scorer)
    digest = settings_hash(settings)
    out = Path(pc.out)
    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    done = resume_state(out, folder, digest)
    todo = [q for q in questions if q["id"] not in done]
    generator = generator or (_load_generator(cfg) if todo else None)
    name = getattr(generator, "name", pc.model)
    context = _context_length(generator)
    run = Counter()
    failed: list[dict] = []
    bar = tqdm(total=len(todo), desc="pairs", unit="q", file=sys.stderr, disable=None)
    with (
        open(out, "a", encoding="utf-8", newline="\n") as pairs_fh,
        open(folder / SAMPLES_FILE, "a", encoding="utf-8", newline="\n") as samples_fh,
    ):
        for start in range(0, len(todo), pc.chunk):
            chunk = todo[start : start + pc.chunk]
            prompts = [Prompt(q["id"], prompt_messages(q, system)) for q in chunk]
            fits = []
            for q, p in zip(chunk, prompts):
                n_prompt = len(generator.prompt_ids(p))
                if context and n_prompt + pc.max_new_tokens > context:
                    samples_fh.write(dumps(_overlong_line(q, n_prompt, context, digest)) + "\n")
                    run["prompt_overlong"] += 1
                    bar.update(1)
                else:
                    fits.append((q, p))
            if not fits:
                continue
            sampled = generator.sample(
                [p for _, p in fits],
                pc.n,
                pc.max_new_tokens,
                temperature=pc.temperature,
                top_p=pc.top_p,
                seed=pc.seed,
            )
            judged = _judge_chunk(judge, [q for q, _ in fits], sampled)
            for (q, p), answers, verdicts in zip(fits, sampled, judged):
                run["answers"] += len(answers)
                run["new_tokens"] += sum(g.new_tokens for g in answers)
                if verdicts is not None and any(g.text.strip() and v[0] is None for g, v in zip(answers, verdicts)):
                    why = next(v[1] for g, v in zip(answers, verdicts) if g.text.strip() and v[0] is None)
                    failed.append({"id": q["id"], "reason": "judge_failed", "detail": why})
                    run["judge_failed"] += 1
                    bar.update(1)
                    continue
                line, pairs = question_result(q, p, answers, verdicts, cfg, scorer, guard, digest, name)
                pairs_fh.writelines(dumps(x) + "\n" for x in pairs)
                pairs_fh.flush()
                samples_fh.write(dumps(line) + "\n")
                samples_fh.flush()
                run[line["status"]] += 1
                run["pairs"] += len(pairs)
                bar.update(1)
                bar.set_postfix(pairs=run["pairs"], refresh=False)
            samples_fh.flush()
    bar.close()
    seconds = time.perf_counter() - t0
    summary = _summary(cfg, folder, out, questions, input_rejects, failed, done, run, seconds, settings, digest)
    summary["system_prompt_from"] = system_from
    summary["model_name"] = name
    summary["backend"] = getattr(generator, "backend", None)
    write_metrics(folder / SUMMARY_FILE, summary)
    _print(summary, out)
    return summary


def _summary(cfg, folder, out, questions, input_rejects, failed, done, run, seconds, settings, digest) -> dict:
    """Counts over the whole output (from samples.jsonl) and this run's; writes rejects.jsonl."""
    lines = _read_jsonl(folder / SAMPLES_FILE)
    pairs = _read_jsonl(out)
    status = Counter(line["status"] for line in lines)
    answers = [a for line in lines for a in line["answers"]]
    rejects = [{"id": r.get("id"), "reason": f"input: {r['reason']}", "source": r.get("source")} for r in input_rejects]
    rejects += [
        {"id": line["id"], "reason": line["status"], **({"detail": line["detail"]} if "detail" in line else {})}
        for line in lines
        if line["status"] != "paired"
    ]
    rejects += failed
    write_text_atomic(folder / REJECTS_FILE, "".join(dumps(r) + "\n" for r in rejects))
    bad = Counter(r["reason"] if not r["reason"].startswith("input: ") else "input" for r in rejects)

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    return {
        "out": str(out),
        "questions": len(questions),
        "input_rejects": len(input_rejects),
        "finished": len(lines),
        "paired_questions": status["paired"],
        "pairs": len(pairs),
        "status": {s: status[s] for s in STATUSES},
        "bad": dict(sorted(bad.items())),
        "answers": len(answers),
        "empty_answers": sum(a["empty"] for a in answers),
        "cut_answers": sum(a.get("finish") == "length" for a in answers),
        "unsafe_answers": sum(bool(a.get("unsafe")) for a in answers),
        "crisis_questions": sum(line["crisis"] for line in lines),
        "crisis_answers_without_support": sum(a.get("crisis_support") is False for a in answers),
        "mean_quality_chosen": mean([p["meta"]["scores"]["chosen"] for p in pairs]),
        "mean_quality_rejected": mean([p["meta"]["scores"]["rejected"] for p in pairs]),
        "pairs_by_tier": dict(
            sorted(Counter(f"{p['meta']['tiers']['chosen']}>{p['meta']['tiers']['rejected']}" for p in pairs).items())
        ),
        "this_run": {
            "skipped_done": len(done),
            "questions": sum(run[s] for s in STATUSES) + run["judge_failed"],
            "pairs": run["pairs"],
            "judge_failed": run["judge_failed"],
            "answers": run["answers"],
            "new_tokens": run["new_tokens"],
            "seconds": round(seconds, 3),
            "new_tokens_per_s": round(run["new_tokens"] / seconds, 1) if seconds > 0 else None,
        },
        "settings": settings,
        "settings_hash": digest,
        "rank_rule": RANK_RULE,
    }


def _print(s: dict, out: Path) -> None:
    rows = {
        "questions": s["questions"],
        "finished (all runs)": s["finished"],
        "skipped (done before)": s["this_run"]["skipped_done"],
        "done this run": s["this_run"]["questions"],
        "pairs": s["pairs"],
        "questions with pairs": s["paired_questions"],
        **{f"bad: {k}": v for k, v in s["bad"].items()},
        "answers": s["answers"],
        "unsafe answers": s["unsafe_answers"],
        "cut at max_new_tokens": s["cut_answers"],
        "crisis questions": s["crisis_questions"],
        "mean quality chosen / rejected": f"{s['mean_quality_chosen']} / {s['mean_quality_rejected']}",
        "new tokens/s": s["this_run"]["new_tokens_per_s"] or 0,
        "out": str(out),
    }
    print_summary("cbt-llm pairs", rows)
