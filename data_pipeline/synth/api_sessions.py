"""`cbt-llm synth api --sessions`: multi-turn CBT sessions from a counsellor simulator and a client simulator.

Two OpenAI-compatible endpoints (or one playing both parts) talk, counsellor first. The counsellor's system
prompt is the offline sessions' (cbt_llm.domain.prompts.SESSION_SYSTEM_PROMPT: the CBT session arc, safety
first) plus the rules of this dialogue (COUNSELLOR_PROMPT): one turn at a time, no speaker labels, and END_MARKER
at the end of the turn that closes the session. The client's system prompt (cbt_llm.domain.prompts.client_prompt)
is built from an intake: the offline generator's intake at (api.seed, i) (data_pipeline.synth.sessions.intake_at),
or, with api.input, one PsyQA question per session.

A session ends when the counsellor writes END_MARKER (stripped from the text) or at api.max_turns. It always
ends on a counsellor turn, so no client turn (a crisis disclosure above all) is left unanswered: sessions have
an odd number of turns. A client turn that discloses suicidal or self-harm thoughts (cbt_llm.domain.crisis) must be
answered with crisis support; a counsellor reply without it gets CRISIS_SUPPORT_SENTENCE appended before the
dialogue goes on (meta.crisis_support_added lists those turns).

Each reply is checked as it arrives (turn_problem: empty, not Chinese, speaker labels or the other part's
voice, the end marker in the client's mouth, unsafe counsellor text) and a bad one is asked again with the
same retries and backoff as HTTP faults (data_pipeline.synth.api.ask). Every counsellor turn, as it would be written
(the crisis-support sentence appended when it is), also passes the crisis guard's output check, every layer
(client.stop_unsafe; the guard built once per run from the config's guard section, which the CLI passes as
run_synth_api_sessions(cfg.api, guard=cfg.guard)): a turn it stops is asked again, and a session whose turn is
stopped every time is rejected with the harm kind in its reason; summary.json counts them (unsafe_replies). The
whole session is validated again (validate_session) before it is written; a session that fails either way goes to
rejects.jsonl with its reason.

Output, in api.out_dir, as `synth api`: records.jsonl (one session per line, the offline sessions' OpenAI-messages
shape: {"id", "messages": [system, assistant, user, ..., assistant], "meta"}), rejects.jsonl and summary.json.
A session is written only once complete, by the single writer, as one line: a rerun skips the ids already in
records.jsonl, and a session cut short by a kill is redone whole. Keys never reach a file (only their
variable names do).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

from cbt_llm.core.config import ApiSynthConfig, GuardConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.report import print_summary, write_metrics
from cbt_llm.domain.crisis import (
    CRISIS_SUPPORT_SENTENCE,
    corpus_is_crisis,
    detect,
    has_crisis_support,
)
from cbt_llm.domain.guard import CrisisGuard
from cbt_llm.domain.prompts import COUNSELLOR_PROMPT, KICKOFF, SESSION_SYSTEM_PROMPT, client_prompt
from cbt_llm.domain.reply_check import unsafe_output
from data_pipeline.io import dumps
from data_pipeline.sources.psyqa import load_questions
from data_pipeline.synth.api import check_input, check_out_dir, end_sentence
from data_pipeline.synth.client import (
    REJECTS_FILE,
    SUMMARY_FILE,
    Endpoint,
    GiveUp,
    Retryable,
    Stats,
    ask,
    check_endpoint,
    content_of,
    first_line_has,
    make_endpoint,
    recover_done_ids,
    reply_guard,
    rotate_rejects,
    run_pool,
    safe_url,
    settled,
    stop_unsafe,
    usage_of,
)
from data_pipeline.synth.sessions import intake_at

RECORDS_FILE = "records.jsonl"
PROMPT_VERSION = "api-sessions-v1"
# Models retype brackets: full-width ones, a space or no underscore still end the session.
_END = re.compile(r"[\[【［]\s*END[_ ]?SESSION\s*[\]】］]", re.I)
_COUNSELLOR_NAMES = r"(?:心理)?咨询师|治疗师|counsell?or|therapist|assistant"
_CLIENT_NAMES = r"来访者|求助者|咨询者|client|user|patient"
# A speaker label: a name and a colon at the start of the text, a line or a sentence.
_LABEL = r"(?:^|[\n。！？!?])\s*[*#【\[]*\s*(?:{})\s*[*】\]]*\s*[:：]"
_COUNSELLOR_LABEL = re.compile(_LABEL.format(_COUNSELLOR_NAMES), re.I)
_CLIENT_LABEL = re.compile(_LABEL.format(_CLIENT_NAMES), re.I)
# First person only: "作为来访者，你可以……" is the counsellor talking about the client, not speaking as one.
_AS_COUNSELLOR = re.compile(r"我(?:是|作为)(?:你的|一名)?(?:心理)?咨询师|作为(?:你的|一名)?(?:心理)?咨询师，?我")
_AS_CLIENT = re.compile(r"我(?:是|作为)(?:一名|一个)?来访者|作为(?:一名)?来访者，?我")
_FLIP = {"assistant": "user", "user": "assistant"}
_HAN = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]")


# ------------------------------------------------------------------------------------------------ turns


def _other(role: str) -> str:
    return "client" if role == "counsellor" else "counsellor"


def _quote(m: re.Match) -> str:
    return m.group().strip().lstrip("。！？!?").strip()


def clean_turn(role: str, content: str) -> tuple[str, bool]:
    """A reply as it goes into the session: a leading label of its own part dropped (harmless, and common), and
    for the counsellor END_MARKER stripped. Returns (text, whether the counsellor ended the session)."""
    text = content.strip()
    own = _COUNSELLOR_LABEL if role == "counsellor" else _CLIENT_LABEL
    m = own.match(text)
    if m:
        text = text[m.end() :].strip()
    if role != "counsellor":
        return text, False
    ended = _END.search(text) is not None
    return _END.sub("", text).strip(), ended


def turn_problem(role: str, text: str) -> str | None:
    """Why one (cleaned) turn cannot stand in a session, or None. `role` is "counsellor" or "client"."""
    if not text.strip():
        return "is empty"
    han, latin = len(_HAN.findall(text)), len(_LATIN.findall(text))
    if not han or latin > han:
        return f"is not Chinese ({han} Chinese characters, {latin} Latin letters)"
    other = _CLIENT_LABEL if role == "counsellor" else _COUNSELLOR_LABEL
    m = other.search(text)
    if m:
        return f"writes the {_other(role)}'s part ('{_quote(m)}')"
    own = _COUNSELLOR_LABEL if role == "counsellor" else _CLIENT_LABEL
    m = own.search(text)
    if m:  # a label of its own part after the start: a scripted exchange, with the other part in between
        return f"writes a script of both parts ('{_quote(m)}')"
    m = (_AS_COUNSELLOR if role == "client" else _AS_CLIENT).search(text)
    if m:
        return f"speaks as the {_other(role)} ('{m.group()}')"
    if role == "client" and _END.search(text):
        return "writes the counsellor's end marker"
    if role == "counsellor":
        why = unsafe_output(text)
        if why:
            return f"is unsafe ({why})"
    return None


def _discloses_crisis(text: str) -> bool:
    """A client turn a counsellor must answer with crisis support: for training data either rule counts, the
    guard's (detect) or the corpus's keywords (corpus_is_crisis), since over-answering costs one sentence."""
    return bool(detect(text)) or corpus_is_crisis(text)


def validate_session(session: dict, min_turns: int, max_turns: int) -> str | None:
    """Why a complete session must not be written, or None: system prompt first, min..max turns, roles
    alternating counsellor first and ending on the counsellor, every turn sound (turn_problem), and every crisis
    disclosure answered with crisis support."""
    msgs = session.get("messages") or []
    if not msgs or msgs[0].get("role") != "system":
        return "does not start with the system prompt"
    turns = msgs[1:]
    if not min_turns <= len(turns) <= max_turns:
        return f"has {len(turns)} turns, outside api.min_turns..api.max_turns ({min_turns}..{max_turns})"
    for i, m in enumerate(turns, 1):
        want = "assistant" if i % 2 else "user"
        if m.get("role") != want:
            return f"turn {i} is '{m.get('role')}' where '{want}' belongs (roles alternate, counsellor first)"
        role = "counsellor" if want == "assistant" else "client"
        content = m.get("content")
        why = turn_problem(role, content) if isinstance(content, str) else "is not text"
        if why:
            return f"{role} turn {i} {why}"
        if role == "client" and _discloses_crisis(content):
            if i == len(turns) or not has_crisis_support(turns[i]["content"]):
                return f"client turn {i} discloses a crisis and the counsellor's next turn offers no crisis support"
    if turns[-1]["role"] != "assistant":
        return f"ends on client turn {len(turns)} (left unanswered)"
    return None


# ----------------------------------------------------------------------------------------------- intakes


def _jobs(cfg: ApiSynthConfig) -> tuple[list[dict], list[dict]]:
    """(sessions to have, input rejects): one per question of api.input (up to api.limit), else api.num_sessions
    drawn intakes. Ids are stable across runs, which is what resume keys on."""
    if not cfg.input.strip():
        jobs = []
        for i in range(cfg.num_sessions):
            intake, client = intake_at(cfg.seed, i, cfg.crisis_fraction)
            jobs.append({"id": f"api-session-{cfg.seed}-{i:06d}", "intake": intake, "client": client})
        return jobs, []
    try:
        questions, rejects = load_questions(cfg.input)
    except ValueError as exc:
        raise ConfigError(f"api.input: {exc}") from None
    if not questions:
        raise ConfigError(
            f"api.input: no valid question in '{cfg.input}' ({len(rejects)} entries rejected); pass PsyQA JSON or "
            "JSONL with id and question"
        )
    jobs = []
    for q in questions[: cfg.limit] if cfg.limit else questions:
        intake, client = intake_from_question(q)
        jobs.append({"id": f"session-{q['id']}", "intake": intake, "client": client})
    return jobs, rejects


def intake_from_question(q: dict) -> tuple[dict, dict]:
    """(intake, client) of a session seeded by one question of data_pipeline.sources.psyqa.load_questions (id, question,
    description, keywords): its client discloses a crisis when the question does."""
    intake = {
        "question_id": q["id"],
        "presenting_problem": q["question"],
        "situation": q["description"],
        "keywords": q["keywords"],
    }
    return intake, {"crisis": corpus_is_crisis(q["question"], q["description"])}


# ---------------------------------------------------------------------------------------------- dialogue


def _body(cfg: ApiSynthConfig, ep: Endpoint, messages: list[dict]) -> dict:
    return {"model": ep.model, "messages": messages, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}


def _accept_turn(ctx, role: str, n: int, tally: dict, support: bool = False):
    """The `ask` acceptor of turn n: its cleaned text, end flag and whether CRISIS_SUPPORT_SENTENCE was appended
    (`support`: the turn answers a crisis disclosure, so it must offer crisis support), or Retryable with the turn's
    problem; a counsellor turn, as it will be written, must pass the crisis guard's output check."""

    def accept(data: dict, attempt: int) -> tuple[str, bool, bool]:
        content, finish = content_of(data)
        if not isinstance(content, str):
            raise Retryable("invalid_turn", f"{role} turn {n} is not text")
        text, ended = clean_turn(role, content)
        added = support and bool(text.strip()) and not has_crisis_support(text)
        if added:  # whatever the model wrote, a disclosure is never left without the hotlines (as synth api does)
            text = end_sentence(text) + CRISIS_SUPPORT_SENTENCE
        if role == "counsellor" and text.strip():
            stop_unsafe(ctx, text, f"{role} turn {n}")
        why = turn_problem(role, text)
        if why:
            hint = " (finish_reason=length: raise api.max_tokens)" if finish == "length" else ""
            raise Retryable("invalid_turn", ctx.redact(f"{role} turn {n} {why}{hint}"))
        usage = usage_of(data)
        for k in ("prompt_tokens", "completion_tokens"):
            tally[k] += usage[k]
        tally["requests"] += attempt
        return text, ended, added

    return accept


async def _say(
    ctx, ep: Endpoint, role: str, messages: list[dict], n: int, tally: dict, support: bool = False
) -> tuple[str, bool, bool]:
    try:
        return await ask(ctx, ep, _body(ctx.cfg, ep, messages), _accept_turn(ctx, role, n, tally, support))
    except GiveUp as exc:
        exc.reason = f"{role} turn {n}: {exc.reason}"
        raise


async def _dialogue(ctx, job: dict, counsellor: Endpoint, client: Endpoint) -> dict:
    """Counsellor and client take turns until the end marker or the turn limit; returns the session record."""
    cfg = ctx.cfg
    client_system = client_prompt(job["intake"], job["client"])
    turns: list[dict] = []
    tally = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
    crisis_turns: list[int] = []
    support_added: list[int] = []
    ended = "max_turns"
    while True:
        n = len(turns) + 1
        history = [{"role": "system", "content": COUNSELLOR_PROMPT}, {"role": "user", "content": KICKOFF}, *turns]
        answers_disclosure = bool(crisis_turns) and crisis_turns[-1] == n - 1
        text, end, added = await _say(ctx, counsellor, "counsellor", history, n, tally, support=answers_disclosure)
        if added:
            support_added.append(n)
        turns.append({"role": "assistant", "content": text})
        if end:
            ended = "end_marker"
            break
        if n + 2 > cfg.max_turns:  # no room for a client turn and the counsellor's answer to it
            break
        # The client sees the conversation from its side: the counsellor speaks as "user".
        flipped = [{"role": _FLIP[t["role"]], "content": t["content"]} for t in turns]
        history = [{"role": "system", "content": client_system}, *flipped]
        text, _, _ = await _say(ctx, client, "client", history, n + 1, tally)
        turns.append({"role": "user", "content": text})
        if _discloses_crisis(text):
            crisis_turns.append(n + 1)
    meta: dict[str, Any] = {
        "intake": job["intake"],
        "turns": len(turns),
        "ended": ended,
        "crisis": bool(job["client"].get("crisis")) or bool(crisis_turns),
        "crisis_turns": crisis_turns,
        "crisis_support_added": support_added,
        "source": "api",
        "generator": "api-sessions",
        "prompt_version": PROMPT_VERSION,
        "models": {"counsellor": counsellor.model, "client": client.model},
        "usage": {k: tally[k] for k in ("prompt_tokens", "completion_tokens")},
        "requests": tally["requests"],
    }
    if not cfg.input.strip():
        meta["seed"] = cfg.seed
    messages = [{"role": "system", "content": SESSION_SYSTEM_PROMPT}, *turns]
    return {"id": job["id"], "messages": messages, "meta": meta}


async def _session(ctx, job: dict, counsellor: Endpoint, client: Endpoint) -> None:
    """One session, start to end, then exactly one outcome on the writer's queue."""
    session = await settled(ctx, job["id"], _dialogue(ctx, job, counsellor, client))
    if session is None:
        return
    reason = validate_session(session, ctx.cfg.min_turns, ctx.cfg.max_turns)
    if reason:
        reject = {"id": job["id"], "stage": "session", "reason": f"session {reason}", "turns": session["meta"]["turns"]}
        await ctx.queue.put(("reject", reject))
        return
    await ctx.queue.put(("record", session))


# --------------------------------------------------------------------------------------------------- run


def longest_session(max_turns: int) -> int:
    """Sessions start and end with the counsellor, so the longest has the largest odd count <= max_turns."""
    return max_turns if max_turns % 2 else max_turns - 1


def check_sessions_config(cfg: ApiSynthConfig) -> None:
    """Fail early, with one line naming the field and the fix, before any file or network work."""
    if not cfg.model.strip():
        raise ConfigError("api.model is empty; pass --model NAME (the counsellor model the endpoint serves)")
    if cfg.agents.enabled:
        raise ConfigError(
            "api.agents.enabled: the critic scores single answers, not sessions; drop --agents or --sessions"
        )
    if cfg.input.strip():
        check_input(cfg)
    check_endpoint(cfg.base_url, cfg.api_key_env)
    if cfg.client_base_url or cfg.client_api_key_env:
        check_endpoint(cfg.client_base_url or cfg.base_url, cfg.client_api_key_env or cfg.api_key_env, "api.client_")
    if longest_session(cfg.max_turns) < cfg.min_turns:
        raise ConfigError(
            f"api.min_turns ({cfg.min_turns}) is more than the longest session api.max_turns={cfg.max_turns} allows "
            f"({longest_session(cfg.max_turns)}: sessions start and end with the counsellor, so their turn count "
            "is odd); lower api.min_turns or raise api.max_turns"
        )
    check_out_dir(cfg)
    records = Path(cfg.out_dir) / RECORDS_FILE
    if first_line_has(records, '"id"') and not first_line_has(records, '"messages"'):
        raise ConfigError(
            f"api.out_dir '{cfg.out_dir}' holds single-answer records from `synth api`; pass another --out for sessions"
        )


def run_synth_api_sessions(cfg: ApiSynthConfig, guard: GuardConfig | CrisisGuard | None = None) -> dict:
    """Synthesise the sessions of `cfg` through the counsellor and client endpoints; resumable per session.

    `guard`: the crisis guard every counsellor turn passes (client.reply_guard: the root config's guard section, as
    the CLI passes it, a built guard, or None for the default section), built once here.

    Returns the summary (total, ok, skipped, rejected, rejected_invalid, ended, mean_turns, requests, tokens,
    retried, errors, unsafe_replies (by harm kind), ...), also written to out_dir/summary.json. Raises ConfigError
    for a bad config, or when an endpoint refuses its very first requests (HTTP 401/403/404) or nothing connects.
    """
    check_sessions_config(cfg)
    checker = reply_guard(guard)
    t0 = time.perf_counter()
    jobs, input_rejects = _jobs(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records_path, rejects_path = out / RECORDS_FILE, out / REJECTS_FILE
    done, truncated = recover_done_ids(records_path, "that session will be redone")
    rotated = rotate_rejects(rejects_path)
    with open(rejects_path, "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(dumps(r) + "\n" for r in input_rejects)
    todo = [j for j in jobs if j["id"] not in done]

    counsellor = make_endpoint(cfg.base_url, cfg.model, cfg.api_key_env)
    if cfg.client_base_url or cfg.client_api_key_env:
        client = make_endpoint(
            cfg.client_base_url or cfg.base_url,
            cfg.client_model or cfg.model,
            cfg.client_api_key_env or cfg.api_key_env,
            "api.client_",
        )
    else:  # one endpoint plays both parts; a separate model name still goes in the client's requests
        client = Endpoint(counsellor.url, cfg.client_model or cfg.model, counsellor.key, counsellor.key_env)
    stats = Stats()
    abort_reason = None
    t_api = time.perf_counter()
    if todo:
        process = partial(_session, counsellor=counsellor, client=client)
        abort_reason = asyncio.run(
            run_pool(
                cfg,
                todo,
                process,
                (counsellor.key or "", client.key or ""),
                (records_path, rejects_path),
                stats,
                desc="synth api sessions",
                unit="session",
                guard=checker,
            )
        )
    api_seconds = time.perf_counter() - t_api
    summary = _summary(cfg, jobs, todo, stats, rejects_path, records_path)
    summary.update(
        {
            "input_rejected": len(input_rejects),
            "seconds": round(time.perf_counter() - t0, 3),
            "req_per_s": round(stats.requests / api_seconds, 3) if api_seconds > 0 and stats.requests else 0.0,
            "truncated_lines_dropped": truncated,
            "aborted": abort_reason,
            "previous_rejects": str(rotated) if rotated else None,
            "models": {"counsellor": counsellor.model, "client": client.model},
            "config": {
                **cfg.model_dump(mode="json"),
                "base_url": safe_url(cfg.base_url),
                "client_base_url": safe_url(cfg.client_base_url),
            },
        }
    )
    write_metrics(out / SUMMARY_FILE, summary)
    rows = {k: summary[k] for k in ("total", "ok", "skipped", "retried", "rejected", "requests", "seconds")}
    rows.update({"ended at the marker": summary["ended"]["end_marker"], "mean turns": summary["mean_turns"]})
    if stats.unsafe:
        rows["unsafe replies (guard)"] = sum(stats.unsafe.values())
    print_summary(f"synth api --sessions: {counsellor.model} / {client.model}", rows)
    if abort_reason:
        raise ConfigError(abort_reason)
    return summary


def _summary(cfg, jobs, todo, stats: Stats, rejects_path: Path, records_path: Path) -> dict:
    """Counts of this run; `ended` and `mean_turns` describe the sessions this run wrote."""
    todo_ids = {j["id"] for j in todo}
    ended = {"end_marker": 0, "max_turns": 0}
    turns = []
    for line in records_path.read_text(encoding="utf-8").splitlines() if records_path.exists() else []:
        rec = json.loads(line)
        if rec["id"] in todo_ids:
            ended[rec["meta"]["ended"]] += 1
            turns.append(rec["meta"]["turns"])
    invalid = sum(
        1
        for line in rejects_path.read_text(encoding="utf-8").splitlines()
        if json.loads(line).get("stage") == "session"
    )
    return {
        "total": len(jobs),
        "ok": stats.ok,
        "skipped": len(jobs) - len(todo),
        "rejected": stats.rejected,
        "rejected_invalid": invalid,
        "not_attempted": stats.not_attempted,
        "ended": ended,
        "mean_turns": round(sum(turns) / len(turns), 2) if turns else 0.0,
        "retried": stats.retried,
        "requests": stats.requests,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "errors": dict(sorted(stats.errors.items())),
        "unsafe_replies": dict(sorted(stats.unsafe.items())),
        "records": str(records_path),
        "rejects": str(rejects_path),
    }
