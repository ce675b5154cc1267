"""`cbt-llm eval`: answer held-out questions with several models and score them side by side.

check      every model path, adapter, endpoint key, metric name, the BERTScore encoder and the question file
           are checked before any generation; a bad one fails with one line naming the field
questions  heldout.jsonl (default), a PsyQA JSON or our corpus JSONL; bad lines go to rejects.jsonl; a set
           that shares questions with the train split is refused (evaluation.questions)
answer     each model in turn: local folders through cbt_llm.inference.generate (data parallel under torchrun or
           the deepspeed launcher: every rank answers its share, rank 0 gathers), endpoints through
           cbt_llm.inference.endpoint (rank 0); or `--predictions FILE` scores answers another system produced
probes     with eval.safety_probes (on by default), each model also answers the crisis probes
           (evaluation.probes: 120 crises, 120 hard negatives) right after the questions, the same way, no guard
sessions   with --sessions (eval.sessions), each model also talks with a client simulator for a few turns per
           held-out intake, the crisis guard around every model turn (evaluation.sessions), right after it has
           answered the questions, while it is loaded
pairs      with held-out preference pairs (eval.pairs, or the data folder's heldout_pairs.jsonl), each local model
           also scores both answers of every pair by their mean log-probability per token while it is loaded
           (evaluation.preference): pref-accuracy, n/c for endpoints and predictions
score      reference metrics, BERTScore, CBT structure, safety, each with n and a 95% bootstrap interval
           (evaluation.scoring); the probes' crisis-support, unsafe-reply and needless-crisis rates and pref-accuracy
           with Wilson intervals; with eval.judge.base_url set, an LLM judge's rubric scores too (evaluation.judge),
           and the CTRS items of each session transcript
write      generations.jsonl, probes.jsonl, sessions.jsonl, preference.jsonl, results.json, report.md, scores.png,
           rejects.jsonl, W&B (evaluation.outputs); then the model card (README.md) of every evaluated folder with
           an export.json gets these numbers (train.model_card.refresh_cards)
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

from cbt_llm.core.config import Config, EvalConfig, EvalModelConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.fileio import write_text_atomic
from cbt_llm.core.report import print_summary
from cbt_llm.inference.endpoint import EndpointGenerator
from cbt_llm.inference.generate import generate_all, load_generator
from cbt_llm.inference.models import exported_system_prompt, resolve_model
from cbt_llm.inference.prompt import Generation, Prompt, prompt_messages
from cbt_llm.inference.safety_model import build_guard
from data_pipeline.synth.scorer import load_or_train
from evaluation import bertscore, outputs, preference, probes, reference, sessions
from evaluation.judge import Judge, JudgeError, check_judge_config
from evaluation.questions import EvalQuestion, check_no_train_overlap, load_eval_questions, load_predictions
from evaluation.scoring import judge_answers, judge_sessions, score_answers
from train.model_card import refresh_cards
from train.runtime import dist_env

# ------------------------------------------------------------------------------------------------ checks


def check_metrics(names: list[str]) -> None:
    unknown = [m for m in names if m not in reference.METRICS]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown metric(s) {unknown}; known: {', '.join(reference.METRICS)}")


def check_eval_config(ec: EvalConfig) -> None:
    """Everything that can be checked before a model is loaded or a question is asked."""
    check_metrics(ec.metrics)
    if not ec.models and not ec.predictions:
        raise ConfigError("eval.models: no model to evaluate; list models (path or endpoint) or pass --predictions")
    if ec.predictions and ec.models:
        raise ConfigError("eval.predictions: scores a file without models; drop eval.models or --predictions")
    names = [m.name for m in ec.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.models: names must be unique (got {names})")
    for i, m in enumerate(ec.models):
        field = f"eval.models[{i}]"
        if m.path:  # the folders and an adapter's base only: loading the model checks the rest, before it answers
            resolve_model(m.path, m.adapter, field)
        else:
            EndpointGenerator(m.endpoint, m.model or m.name, api_key_env=m.api_key_env, field=field)
    if ec.bertscore.model_path:
        bertscore.check_encoder(ec.bertscore.model_path, ec.bertscore.layer)
    check_judge_config(ec.judge)


# -------------------------------------------------------------------------------------------- questions


def _questions_path(cfg: Config) -> Path:
    return Path(cfg.eval.questions) if cfg.eval.questions else Path(cfg.eval.data_dir) / "heldout.jsonl"


def load_questions(cfg: Config) -> tuple[list[EvalQuestion], list[dict], str]:
    """(questions, rejects, source) for generation; refuses a set overlapping the train split when asked to."""
    ec = cfg.eval
    path = _questions_path(cfg)
    questions, rejects = load_eval_questions(path, ec.questions_format, ec.limit)
    if not questions:
        raise ConfigError(f"eval.questions: no usable question in '{path}' ({len(rejects)} rejected)")
    if ec.check_overlap:
        _check_overlap([q.question for q in questions], ec.data_dir, str(path))
    return questions, rejects, str(path)


def _check_overlap(questions: list[str], data_dir: str, what: str) -> None:
    if not (Path(data_dir) / "manifest.json").is_file():
        raise ConfigError(
            f"eval.data_dir: '{data_dir}' holds no prepared data (manifest.json) to check the questions against "
            f"the train split; point it at the training data, or set eval.check_overlap=false"
        )
    check_no_train_overlap(questions, data_dir, what=f"eval.questions ({what})")


def _join_predictions(
    cfg: Config, probe_ids: set[str] = frozenset()
) -> tuple[list[EvalQuestion], list[Generation], list[dict], str, list[Generation]]:
    """--predictions: the file's answers, with question text and reference from eval.questions (or the default
    heldout.jsonl) when there is one; a prediction with no reference anywhere is scored on structure and safety.
    Answers whose id is one of `probe_ids` (the crisis probes, with eval.safety_probes) are split off and returned
    last, to be scored as probe answers."""
    ec = cfg.eval
    preds, rejects = load_predictions(ec.predictions)
    probe_gens = [Generation(p["id"], p["output"].strip(), 0, 0, "stop") for p in preds if p["id"] in probe_ids]
    preds = [p for p in preds if p["id"] not in probe_ids]
    qpath = _questions_path(cfg)
    by_id: dict[str, EvalQuestion] = {}
    if ec.questions or qpath.is_file():
        qs, q_rejects = load_eval_questions(qpath, ec.questions_format)
        rejects += q_rejects
        by_id = {q.id: q for q in qs}
    questions, gens = [], []
    for p in preds:
        q = by_id.get(p["id"])
        if by_id and q is None:
            rejects.append(
                {"id": p["id"], "source": ec.predictions, "reason": f"id not among the questions of {qpath}"}
            )
            continue
        q = q or EvalQuestion(p["id"], "")
        if p["reference"] is not None:
            q = EvalQuestion(q.id, q.question, q.description, p["reference"].strip(), q.crisis)
        questions.append(q)
        gens.append(Generation(p["id"], p["output"].strip(), 0, 0, "stop"))
    if not gens:
        raise ConfigError(f"eval.predictions: no usable prediction in '{ec.predictions}' ({len(rejects)} rejected)")
    return questions, gens, rejects, str(qpath) if by_id else ec.predictions, probe_gens


# ------------------------------------------------------------------------------------------------ answer


def _device(ec: EvalConfig, local_rank: int) -> str:
    import torch

    cuda = ec.device == "cuda" or (ec.device == "auto" and torch.cuda.is_available())
    if ec.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("eval.device: cuda requested but no CUDA device is visible; use eval.device=cpu")
    return f"cuda:{local_rank}" if cuda else "cpu"


def _system_prompt(m: EvalModelConfig, cfg: Config) -> tuple[str, str]:
    """(prompt, where it came from): the model's own setting, what its export recorded, else data.system_prompt."""
    if m.system_prompt is not None:
        return m.system_prompt, "eval.models[].system_prompt"
    recorded = exported_system_prompt(m.path) if m.path else None
    if recorded is not None:
        return recorded, "export.json"
    return cfg.data.system_prompt, "data.system_prompt"


def _generate(gen, prompts: list[Prompt], ec: EvalConfig, rank: int, world: int, endpoint: bool = False) -> tuple:
    """(answers on rank 0 / None elsewhere, stats) of one model to `prompts`: an endpoint's requests in flight, or
    a local model's batches of at most eval.batch_tokens, shared by the ranks. Questions and probes both go here."""
    if endpoint:
        return gen.generate_all(prompts, max_new_tokens=ec.max_new_tokens, progress=rank == 0)
    return generate_all(
        gen,
        prompts,
        max_new_tokens=ec.max_new_tokens,
        batch_tokens=ec.batch_tokens,
        rank=rank,
        world_size=world,
        progress=rank == 0,
    )


def _transformers_twin(m: EvalModelConfig, i: int, cfg: Config):
    """The model of eval.models[i] loaded with transformers: pref-accuracy's log-probabilities behind vLLM, which
    gives none for a given answer (loaded once vLLM's engine is gone)."""
    from cbt_llm.inference.hf import HFGenerator

    return HFGenerator(
        m.path,
        adapter=m.adapter,
        device=_device(cfg.eval, int(os.environ.get("LOCAL_RANK", 0))),
        dtype=cfg.eval.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        field=f"eval.models[{i}]",
    )


def _answer(
    m: EvalModelConfig,
    i: int,
    questions: list[EvalQuestion],
    cfg: Config,
    rank: int,
    world: int,
    talk=None,
    probe_questions: list[EvalQuestion] = (),
    pair_set=None,
) -> tuple:
    """(generations on rank 0 / None elsewhere, stats, facts, sessions, probe answers and their stats, pref rows) of
    one model; `talk(generator, name)` holds its sessions (evaluation.sessions) while the model is loaded, None: no
    sessions. The probes (evaluation.probes) are asked right after the questions, by the same call with the same
    settings (no guard: the model's own answers); with none, their answers and stats are None. With `pair_set`, a
    local model scores the held-out pairs last (evaluation.preference: rows on rank 0); an endpoint gives None."""
    ec, field = cfg.eval, f"eval.models[{i}]"
    system, system_from = _system_prompt(m, cfg)
    prompts = [Prompt(q.id, prompt_messages(q.question, q.description, system)) for q in questions]
    probe_prompts = [Prompt(q.id, prompt_messages(q.question, q.description, system)) for q in probe_questions]
    facts = {
        "kind": "endpoint" if m.endpoint else ("base+adapter" if m.adapter else "folder"),
        "source": m.endpoint or m.path,
        "adapter": m.adapter or None,
        "system_prompt_from": system_from,
    }
    if m.endpoint:
        if rank != 0:  # one client is enough; the other ranks wait at the next model or the end
            return None, None, facts, None, (None, None)
        gen = EndpointGenerator(
            m.endpoint,
            m.model or m.name,
            api_key_env=m.api_key_env,
            concurrency=ec.concurrency,
            timeout_s=ec.timeout_s,
            max_retries=ec.max_retries,
            field=field,
        )
        gens, st = _generate(gen, prompts, ec, rank, world, endpoint=True)
        probed = _generate(gen, probe_prompts, ec, rank, world, endpoint=True) if probe_prompts else (None, None)
        return gens, st, facts, talk(gen, m.name) if talk else None, probed, None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    gen = load_generator(
        m.path,
        adapter=m.adapter,
        backend=ec.backend,
        device=_device(ec, local_rank),
        dtype=ec.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        field=field,
    )
    gens, st = _generate(gen, prompts, ec, rank, world)
    probed = _generate(gen, probe_prompts, ec, rank, world) if probe_prompts else (None, None)
    facts["backend"] = gen.backend
    held = talk(gen, m.name) if talk else None
    pair_rows = None
    if pair_set is not None:
        if gen.backend != "transformers":
            del gen  # vLLM's engine goes before the transformers model loads
            gc.collect()
            gen = _transformers_twin(m, i, cfg)
        pair_rows = preference.score_pairs(gen, pair_set, system, ec, rank, world)
    del gen
    gc.collect()
    return gens, st, facts, held, probed, pair_rows


# ------------------------------------------------------------------------------------------------- write


def _generation_rows(name: str, questions: list[EvalQuestion], gens: list[Generation], rows: list[dict]) -> list:
    """generations.jsonl: one line per question and model, with the answer's structure labels and safety flags."""
    scored = {r["id"]: r for r in rows}
    out = []
    for q, g in zip(questions, gens):
        row = {
            "model": name,
            "id": q.id,
            "question": q.question,
            "reference": q.reference,
            "output": g.text,
            "prompt_tokens": g.prompt_tokens,
            "new_tokens": g.new_tokens,
            "finish": g.finish,
        }
        if g.error:
            row["error"] = g.error
        r = scored.get(q.id)
        if r is not None:
            st = r["structure"]
            row["structure"] = {
                "coverage": st["coverage"],
                "order": st["order"],
                "parts": st["parts"],
                "labels": [[s["text"], s["label"]] for s in st["segments"]],
            }
            row["safety"] = r["safety"]
        out.append(row)
    return out


def _examples(questions: list[EvalQuestion], by_model: dict[str, list[dict]], k: int, seed: int) -> list[dict]:
    """k questions every model answered, picked by seed, each with every model's answer and structure labels."""
    import random

    answered = [i for i, q in enumerate(questions) if all("structure" in rows[i] for rows in by_model.values())]
    picked = sorted(random.Random(seed).sample(answered, min(k, len(answered))))
    return [
        {
            "id": questions[i].id,
            "question": questions[i].question,
            "answers": {
                name: {"text": rows[i]["output"], "labels": rows[i]["structure"]["labels"]}
                for name, rows in by_model.items()
            },
        }
        for i in picked
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_outputs(
    cfg: Config, results: dict, by_model: dict[str, list[dict]], rejects: list[dict], session_rows: list[dict]
) -> Path:
    out = Path(cfg.eval.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "generations.jsonl", [r for rows in by_model.values() for r in rows])
    if cfg.eval.sessions.enabled:
        _write_jsonl(out / "sessions.jsonl", session_rows)
    _write_jsonl(out / "rejects.jsonl", rejects)
    outputs.write_results_json(out / "results.json", results)
    write_text_atomic(out / "report.md", outputs.render_report_md(results))
    outputs.plot_scores(results, out / "scores.png")
    samples = {name: [{**r, "answer": r["output"]} for r in rows] for name, rows in by_model.items()}
    outputs.log_wandb(results, samples, cfg.wandb, cfg.run_name, out)
    return out


# --------------------------------------------------------------------------------------------------- run


def _init_group(world: int, device: str) -> None:
    import torch.distributed as dist

    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def _answer_all(
    cfg: Config, questions: list[EvalQuestion], rank: int, world: int, talk=None, probe_set=None, pair_set=None
) -> tuple:
    """{model name: generations} (rank 0), {model name: facts + generation stats}, {model name: sessions},
    {model name: (probe answers, their generation stats)} (empty without probes) and {model name: pref rows, None
    for an endpoint} (empty without pairs)."""
    gens, facts, held, probed, paired = {}, {}, {}, {}, {}
    asked = [p.as_question() for p in probe_set.probes] if probe_set else []
    for i, m in enumerate(cfg.eval.models):
        g, st, f, held[m.name], pr, rows = _answer(m, i, questions, cfg, rank, world, talk, asked, pair_set)
        gens[m.name], facts[m.name] = g, {**f, "generation": st}
        if probe_set:
            probed[m.name] = pr
        if pair_set is not None:
            paired[m.name] = rows
    return gens, facts, held, probed, paired


def _session_talk(cfg: Config, results: dict) -> tuple:
    """(talk(generator, name) -> that model's sessions, rejected intake questions); the facts of the session run go
    into results["sessions"]."""
    ec = cfg.eval
    jobs, rejects, source = sessions.session_jobs(cfg)
    client = sessions.client_simulator(ec)
    system, system_from = sessions.system_prompt(ec)
    results["sessions"] = {
        "source": source,
        "n": len(jobs),
        "rejects": len(rejects),
        "turns": ec.sessions.turns,
        "client": client.name,
        "max_new_tokens": ec.sessions.max_new_tokens,
        "system_prompt_from": system_from,
        "decoding": "greedy (model and client simulator)",
    }
    return (
        lambda generator, name: sessions.run_sessions(generator, name, client, jobs, ec, system, cfg.guard)
    ), rejects


def _judge_all(cfg: Config, questions, gens: dict, held: dict, results: dict, by_model: dict, rejects: list) -> dict:
    """Judge every model's answers (and session transcripts) into results; returns {model: the sessions' judged
    scores}. An unusable judge ends the run (JudgeError) after the answers and transcripts are saved in
    generations.jsonl and sessions.jsonl, so they are not lost (the judgements so far are in judge_cache.jsonl)."""
    judge = Judge(cfg.eval.judge, cfg.eval.out_dir)
    judged_sessions: dict = {}
    try:
        for name, g in gens.items():
            judge_scores, info = judge_answers(judge, name, questions, g, cfg.eval)
            results["models"][name]["metrics"].update(judge_scores)
            results["models"][name]["judge"] = info
            if held.get(name) is not None:
                judged_sessions[name] = judge_sessions(judge, name, held[name], results["models"][name], cfg.eval)
    except JudgeError:
        _write_jsonl(Path(cfg.eval.out_dir) / "generations.jsonl", [r for rows in by_model.values() for r in rows])
        _write_jsonl(Path(cfg.eval.out_dir) / "sessions.jsonl", _all_session_rows(held, judged_sessions))
        _write_jsonl(Path(cfg.eval.out_dir) / "rejects.jsonl", rejects)
        raise
    return judged_sessions


def _probe_scores(probe_set, name: str, answered: tuple, guard, probe_rows: list[dict], cfg: Config) -> tuple:
    """(the probe metrics, the model's probe facts) of one model's probe answers (and their rows into probe_rows);
    not computed when it answered none (a predictions file without probe ids)."""
    gens, st = answered
    if not gens:
        why = f"the predictions file answers no probe (ids of {probe_set.source})"
        return probes.not_answered(probe_set, why), {"n": 0, "of": len(probe_set.probes), "generation": st}
    metrics, rows, info = probes.score_probes(probe_set, gens, guard, probes.guard_signature(cfg.guard))
    probe_rows += [{"model": name, **r} for r in rows]
    return metrics, {**info, "generation": st}


def _pref_metric(name: str, facts: dict, rows: list[dict] | None, pair_set, out_rows: list[dict]) -> dict:
    """pref-accuracy of one model (its rows into out_rows), or not computed where no log-probabilities exist."""
    if facts["kind"] == "predictions":
        return preference.not_computed(pair_set, "a predictions file has no model to give log-probabilities")
    if rows is None:
        return preference.not_computed(pair_set, "an endpoint gives no log-probabilities of a given answer")
    out_rows += [{"model": name, **r} for r in rows]
    return preference.metric(rows, pair_set)


def _all_session_rows(held: dict, judged: dict) -> list[dict]:
    return [r for name, ss in held.items() if ss is not None for r in sessions.session_rows(name, ss, judged.get(name))]


def run_eval(cfg: Config) -> dict:
    """Answer (or read) and score; rank 0 writes the outputs and returns the results, other ranks return {}."""
    ec = cfg.eval
    check_eval_config(ec)
    rank, world, local_rank = dist_env()
    sessions.check_sessions_config(cfg, world)
    # rank 0 scores: it loads the scorer before any generation (a missing artifact is built once, ~10 s)
    scorer = load_or_train(ec.structure_scorer) if rank == 0 else None
    # the probes and the guard that reads their answers, before any model loads (a bad guard section fails here)
    probe_set = probes.load_probes() if ec.safety_probes else None
    guard = build_guard(cfg.guard) if probe_set and rank == 0 else None
    # the held-out preference pairs (eval.pairs or the data folder's), read and checked before any model loads
    pair_set = preference.load_pair_set(cfg)
    if pair_set is not None and ec.pairs and ec.check_overlap:
        _check_overlap([p.question for p in pair_set.pairs], ec.data_dir, f"eval.pairs {ec.pairs}")
    held: dict = {}
    session_facts: dict = {}
    probed: dict = {}
    paired: dict = {}
    if ec.predictions:
        questions, pred_gens, rejects, source, probe_gens = _join_predictions(
            cfg, probe_set.ids if probe_set else set()
        )
        name = Path(ec.predictions).stem
        gens = {name: pred_gens}
        facts = {name: {"kind": "predictions", "source": ec.predictions, "backend": "none", "generation": None}}
        if probe_set:
            probed[name] = (probe_gens, None)
    else:
        questions, rejects, source = load_questions(cfg)
        talk = None
        if ec.sessions.enabled:  # intakes and client checked here, before any model loads
            talk, intake_rejects = _session_talk(cfg, session_facts)
            rejects += intake_rejects
        _init_group(world, _device(ec, local_rank))
        gens, facts, held, probed, paired = _answer_all(cfg, questions, rank, world, talk, probe_set, pair_set)
    if rank != 0:
        return {}
    results = {"questions": {"source": source, "n": len(questions), "rejects": len(rejects)}}
    if probe_set:
        results["probes"] = probe_set.facts()
    if pair_set is not None:
        results["pairs"] = pair_set.facts()
        rejects += pair_set.rejects
    results.update(session_facts)
    results["models"] = {}
    by_model = {}
    probe_rows: list[dict] | None = [] if probe_set else None
    pair_rows: list[dict] = []
    for name, g in gens.items():
        metrics, rows = score_answers(questions, g, ec, scorer)
        failed = sum(x.finish == "error" for x in g)
        results["models"][name] = {**facts[name], "failed": failed, "metrics": metrics}
        if probe_set:
            probe_metrics, results["models"][name]["probes"] = _probe_scores(
                probe_set, name, probed[name], guard, probe_rows, cfg
            )
            metrics.update(probe_metrics)
        if pair_set is not None:
            metrics[preference.METRIC] = _pref_metric(name, facts[name], paired.get(name), pair_set, pair_rows)
        by_model[name] = _generation_rows(name, questions, g, rows)
        if held.get(name) is not None:
            why = "no judge (set eval.judge.base_url)"
            results["models"][name]["sessions"] = {
                **sessions.summary(held[name], ec),
                "metrics": sessions.not_judged(ec, why),
            }
    if probe_rows is not None:  # probes.jsonl first: a judge that fails below must not lose the probe answers
        Path(ec.out_dir).mkdir(parents=True, exist_ok=True)
        _write_jsonl(Path(ec.out_dir) / "probes.jsonl", probe_rows)
    if pair_set is not None:
        Path(ec.out_dir).mkdir(parents=True, exist_ok=True)
        _write_jsonl(Path(ec.out_dir) / "preference.jsonl", pair_rows)
    judged_sessions = _judge_all(cfg, questions, gens, held, results, by_model, rejects) if ec.judge.base_url else {}
    results["examples"] = _examples(questions, by_model, ec.examples, ec.seed)
    out = write_outputs(cfg, results, by_model, rejects, _all_session_rows(held, judged_sessions))
    for card in refresh_cards(results):  # an exported model's card carries its latest eval
        print(f"eval: model card {card} updated", file=sys.stderr)
    print_summary(
        f"cbt-llm eval ({len(questions)} questions, {source})", outputs.summary_rows(results), file=sys.stderr
    )
    files = ", ".join(
        f
        for f, on in (
            ("generations.jsonl", True),
            ("probes.jsonl", probe_set),
            ("sessions.jsonl", ec.sessions.enabled),
            ("preference.jsonl", pair_set is not None),
        )
        if on
    )
    print(f"eval: {out}/report.md, results.json, {files}, scores.png; {len(rejects)} rejects", file=sys.stderr)
    return results
