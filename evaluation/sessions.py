"""`cbt-llm eval --sessions`: every model holds multi-turn sessions with a client simulator, the crisis guard around
each model turn, and the judge scores each transcript on the six CTRS items (0-6).

intakes    drawn, held out by seed: intake_at(eval.sessions.seed, i) for i < num_sessions, the intake distribution
           of the session corpus (`synth template --sessions` and `synth api --sessions` draw theirs the same way),
           with a seed that corpus did not use; a config whose session corpus was drawn with the same seed is
           refused, since its first sessions start from exactly these intakes. Or eval.sessions.intakes: questions
           (PsyQA JSON or our JSONL), one intake each as `synth api --sessions --input` makes them, refused when
           they share a question with the train split (eval.check_overlap)
dialogue   the client simulator (eval.sessions.client, an OpenAI-compatible model, greedy) plays the client of the
           intake with cbt_llm.domain.prompts.client_prompt and speaks first, as a person does on `cbt-llm serve`;
           the model answers with the chat template over the whole history, greedy, `turns` times. A turn runs for
           every session at once: local models answer them in token-budgeted batches, endpoints concurrently
guard      cbt_llm.domain.guard.before_model / after_model around every model turn, as the server does: a crisis in
           the client's turns puts the guard's note in the model's prompt and the crisis block before its reply,
           unsafe model text is replaced, the first reply carries the disclaimer. The transcript holds what a
           person would have been shown, and both simulators read that back, as a chat client sends the shown
           history. Every model turn records the guard's verdict (crisis, category, source) and any replacement
failure    a client turn that fails (HTTP after the client's retries, or empty, not Chinese or in the counsellor's
           voice: data_pipeline.synth.api_sessions.turn_problem) or a failed model turn ends that session: it stays
           in sessions.jsonl with its reason, is counted, and is never judged
judge      with eval.judge.base_url: evaluation/judge.py on the "ctrs" rubric (cbt_llm/domain/rubrics.py) over the
           intake and the shown transcript, with the judge's cache, retries and failure counting; a transcript the
           judge fails on is left out of the means and counted in the note, never scored 0
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from cbt_llm.core.config import Config, EvalConfig, GuardConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.guard import CrisisGuard, after_model, before_model
from cbt_llm.domain.prompts import SESSION_SYSTEM_PROMPT, client_prompt
from cbt_llm.domain.rubrics import RUBRICS
from cbt_llm.inference.endpoint import EndpointGenerator
from cbt_llm.inference.generate import generate_all
from cbt_llm.inference.prompt import Prompt
from cbt_llm.inference.safety_model import build_guard
from data_pipeline.sources.psyqa import load_questions
from data_pipeline.synth.api_sessions import clean_turn, intake_from_question, turn_problem
from data_pipeline.synth.sessions import intake_at, session_at
from evaluation.judge import signature
from evaluation.questions import check_no_train_overlap

# The client's first request needs a user message (many chat templates refuse a conversation without one); it
# stands for the counsellor's opening, which the model under test never saw, so it is no line of the transcript.
CLIENT_KICKOFF = "（咨询开始了。请你先用一两句话说说今天为什么来。）"
CTRS = RUBRICS["ctrs"]
FIELD = "eval.sessions"


@dataclass
class Session:
    """One session of one model: its intake, the shown transcript (user = client, assistant = what the guard let
    through), the guard's record per model turn, and why it ended early ("" when it ran every turn)."""

    id: str
    intake: dict
    client: dict
    messages: list[dict] = field(default_factory=list)
    guard: list[dict] = field(default_factory=list)
    error: str = ""
    failed_by: str = ""  # "client" or "model" when error is set
    ended: bool = False  # a scripted client's lines ran out before `turns` (not a failure)
    index: int = -1  # the drawn intake's index (intake_at(seed, index)); -1 for intakes from questions
    new_tokens: int = 0


# ------------------------------------------------------------------------------------------------ checks


class ScriptedClient:
    """eval.sessions.client.kind: scripted. Session i's client turns are the client lines of the offline session that
    starts from the same intake (data_pipeline.synth.sessions.session_at(seed, i): intake_at draws the same intake), in
    order, whatever the model answered; a session ends when its script does. Offline and deterministic, so the demo and
    CI can hold sessions without an endpoint; it does not react to the model, so its transcripts show the guard and the
    model's turns, not how well the model steers a conversation."""

    def __init__(self, sc) -> None:
        self.sc = sc
        self.name = f"scripted: data_pipeline.synth.sessions.session_at(seed={sc.seed}) client lines"
        self.scripts: dict[str, list[str]] = {}

    def turn(self, s: Session, turn: int) -> str | None:
        """The client's line for `turn` (1-based) of session `s`, None once its script has no more."""
        if s.id not in self.scripts:
            msgs = session_at(self.sc.seed, s.index, self.sc.crisis_fraction)["messages"]
            self.scripts[s.id] = [m["content"] for m in msgs if m["role"] == "user"]
        lines = self.scripts[s.id]
        return lines[turn - 1] if turn <= len(lines) else None


def client_simulator(ec: EvalConfig) -> EndpointGenerator | ScriptedClient:
    """The client simulator (eval.sessions.client) with eval's retries and concurrency; ConfigError naming the
    field for an empty or non-http URL, an empty model or an unset key variable."""
    c = ec.sessions.client
    if c.kind == "scripted":
        if ec.sessions.intakes:
            raise ConfigError(
                f"{FIELD}.client.kind: scripted replays the offline sessions of drawn intakes; drop "
                f"{FIELD}.intakes or use kind: endpoint"
            )
        return ScriptedClient(ec.sessions)
    if not c.base_url:
        raise ConfigError(
            f"{FIELD}.client.base_url: empty; --sessions needs a client simulator (an OpenAI-compatible URL)"
        )
    if not c.model:
        raise ConfigError(f"{FIELD}.client.model: empty; name the client simulator model sent in each request")
    return EndpointGenerator(
        c.base_url,
        c.model,
        api_key_env=c.api_key_env,
        concurrency=ec.concurrency,
        timeout_s=ec.timeout_s,
        max_retries=ec.max_retries,
        field=f"{FIELD}.client",
        url_key="base_url",
    )


def _corpus_seed_clash(cfg: Config) -> str | None:
    """The config field whose session corpus was drawn with eval.sessions.seed, if any."""
    seed = cfg.eval.sessions.seed
    if cfg.synth.sessions and cfg.synth.seed == seed:
        return "synth.seed"
    if cfg.api.sessions and not cfg.api.input.strip() and cfg.api.seed == seed:
        return "api.seed"
    return None


def check_sessions_config(cfg: Config, world: int) -> None:
    """Before any model loads: the client simulator, held-out intakes, one process, models to talk with."""
    ec = cfg.eval
    if not ec.sessions.enabled:
        return
    if ec.predictions:
        raise ConfigError(f"{FIELD}.enabled: sessions need models to talk with; drop --predictions or --sessions")
    if world > 1:
        raise ConfigError(
            f"{FIELD}.enabled: sessions run in one process; run `cbt-llm eval --sessions` without torchrun or the "
            "deepspeed launcher (or drop --sessions there)"
        )
    client_simulator(ec)
    clash = _corpus_seed_clash(cfg)
    if clash and not ec.sessions.intakes:
        raise ConfigError(
            f"{FIELD}.seed: {ec.sessions.seed} is the seed of this config's session corpus ({clash}), so its intakes "
            f"are training intakes; pick another eval.sessions.seed"
        )


# ------------------------------------------------------------------------------------------------ intakes


def session_jobs(cfg: Config) -> tuple[list[dict], list[dict], str]:
    """(jobs {id, intake, client}, rejected intake questions, where the intakes came from)."""
    sc = cfg.eval.sessions
    if not sc.intakes:
        jobs = []
        for i in range(sc.num_sessions):
            intake, client = intake_at(sc.seed, i, sc.crisis_fraction)
            jobs.append({"id": f"eval-session-{sc.seed}-{i:04d}", "intake": intake, "client": client, "index": i})
        return jobs, [], f"intake_at(seed={sc.seed}, 0..{sc.num_sessions - 1}, crisis_fraction={sc.crisis_fraction})"
    try:
        questions, rejects = load_questions(sc.intakes)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{FIELD}.intakes: {exc}") from None
    questions = questions[: sc.num_sessions]
    if not questions:
        raise ConfigError(f"{FIELD}.intakes: no usable question in '{sc.intakes}' ({len(rejects)} rejected)")
    if cfg.eval.check_overlap:
        check_no_train_overlap([q["question"] for q in questions], cfg.eval.data_dir, what=f"{FIELD}.intakes")
    jobs = [dict(zip(("intake", "client"), intake_from_question(q)), id=f"eval-session-{q['id']}") for q in questions]
    return jobs, rejects, sc.intakes


def intake_text(intake: dict) -> str:
    """The intake as the judge reads it: what the client brings, and the thought the counsellor should find."""
    lines = [f"困扰：{intake['presenting_problem']}"]
    if intake.get("situation"):
        lines.append(f"最近的情境：{intake['situation']}")
    if intake.get("automatic_thought"):
        lines.append(f"来访者的自动化思维（咨询师事先不知道）：{intake['automatic_thought']}")
    return "\n".join(lines)


def transcript_text(messages: list[dict]) -> str:
    """The shown transcript as the judge reads it, one labelled turn per paragraph."""
    return "\n\n".join(f"{'来访者' if m['role'] == 'user' else '咨询师'}：{m['content']}" for m in messages)


# ------------------------------------------------------------------------------------------------ dialogue


def _client_view(s: Session) -> list[dict]:
    """The conversation from the client's side: the counsellor's turns are its "user" turns."""
    flipped = [{"role": "assistant" if m["role"] == "user" else "user", "content": m["content"]} for m in s.messages]
    return [
        {"role": "system", "content": client_prompt(s.intake, s.client)},
        {"role": "user", "content": CLIENT_KICKOFF},
        *flipped,
    ]


def _generate(generator, prompts: list[Prompt], ec: EvalConfig, max_new_tokens: int) -> list:
    if isinstance(generator, EndpointGenerator):
        gens, _ = generator.generate_all(prompts, max_new_tokens=max_new_tokens, progress=False)
        return gens
    gens, _ = generate_all(
        generator, prompts, max_new_tokens=max_new_tokens, batch_tokens=ec.batch_tokens, progress=False
    )
    return gens


def _client_turns(client: EndpointGenerator | ScriptedClient, live: list[Session], ec: EvalConfig, turn: int) -> None:
    if isinstance(client, ScriptedClient):
        for s in live:
            line = client.turn(s, turn)
            if line is None:
                s.ended = True  # the script is over: a complete session, not a failure
            else:
                s.messages.append({"role": "user", "content": line})
        return
    gens = _generate(client, [Prompt(s.id, _client_view(s)) for s in live], ec, ec.sessions.client.max_tokens)
    for s, g in zip(live, gens):
        text, _ = clean_turn("client", g.text)
        why = f"failed: {g.error}" if g.finish == "error" else turn_problem("client", text)
        if why:
            s.error, s.failed_by = f"client turn {turn} {why}", "client"
        else:
            s.messages.append({"role": "user", "content": text})


def _model_turns(generator, guard: CrisisGuard, live: list[Session], system: str, ec: EvalConfig, turn: int) -> None:
    """One guarded reply per live session: the verdict before, the model's text, the checked and wrapped reply."""
    before = [before_model(guard, [{"role": "system", "content": system}, *s.messages], s.id) for s in live]
    gens = _generate(
        generator, [Prompt(s.id, seen) for s, (_, seen) in zip(live, before)], ec, ec.sessions.max_new_tokens
    )
    for s, (verdict, _), g in zip(live, before, gens):
        if g.finish == "error":
            s.error, s.failed_by = f"model turn {turn} failed: {g.error}", "model"
            continue
        shown, replaced, reason = after_model(guard, g.text, verdict, s.messages, s.id)
        s.messages.append({"role": "assistant", "content": shown})
        s.new_tokens += g.new_tokens
        s.guard.append(
            {
                "turn": turn,
                "crisis": verdict.crisis,
                "construct": verdict.construct,
                "source": verdict.source,
                "replaced": replaced,
                "reason": reason,
                "finish": g.finish,
            }
        )


def run_sessions(
    generator,
    name: str,
    client: EndpointGenerator | ScriptedClient,
    jobs: list[dict],
    ec: EvalConfig,
    system: str,
    gc: GuardConfig | None = None,
) -> list[Session]:
    """Every job's session with `generator` (a local generator or an EndpointGenerator), turn by turn: the client
    speaks, then the model answers through the guard; a session that fails stops there. One guard per model, so
    its counters are that model's."""
    guard = build_guard(gc or GuardConfig())
    sessions = [Session(j["id"], j["intake"], j["client"], index=j.get("index", -1)) for j in jobs]
    for turn in range(1, ec.sessions.turns + 1):
        live = [s for s in sessions if not s.error and not s.ended]
        print(
            f"eval: sessions of {name}, turn {turn} of {ec.sessions.turns} ({len(live)} going on)",
            file=sys.stderr,
        )
        if live:
            _client_turns(client, live, ec, turn)
        live = [s for s in live if not s.error and not s.ended]
        if live:
            _model_turns(generator, guard, live, system, ec, turn)
    return sessions


# ------------------------------------------------------------------------------------------------ scores


def guard_counts(sessions: list[Session]) -> dict:
    """What the guard did over a model's sessions: model turns answered in crisis mode (and how many of them right
    after the disclosure), sessions that reached crisis mode, model outputs replaced and why."""
    events = [e for s in sessions for e in s.guard]
    reasons: dict[str, int] = {}
    for e in events:
        if e["replaced"]:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    return {
        "model_turns": len(events),
        "crisis_turns": sum(e["crisis"] for e in events),
        "disclosures": sum(e["crisis"] and e["source"] in ("patterns", "classifier") for e in events),
        "crisis_sessions": sum(any(e["crisis"] for e in s.guard) for s in sessions),
        "replaced": sum(reasons.values()),
        "replaced_by_reason": reasons,
    }


def not_judged(ec: EvalConfig, why: str) -> dict:
    """The CTRS metrics as not computed, with the reason."""
    sig = signature(ec.judge.model or "none", CTRS, ec.judge.repeats)
    names = ["judge-ctrs-total", *(f"judge-ctrs-{k}" for k in CTRS.keys)]
    return {m: {"score": None, "n": 0, "signature": sig, "note": f"not computed: {why}"} for m in names}


def judge_items(sessions: list[Session]) -> list[tuple[str, str, str]]:
    """(id, intake, transcript) of the sessions that ran every turn: the ones the judge scores."""
    return [(s.id, intake_text(s.intake), transcript_text(s.messages)) for s in sessions if not s.error]


def summary(sessions: list[Session], ec: EvalConfig) -> dict:
    """Counts of one model's sessions (results.json "sessions" of a model, less its metrics)."""
    done = [s for s in sessions if not s.error]
    return {
        "n": len(sessions),
        "completed": len(done),
        "failed": {who: sum(s.failed_by == who for s in sessions) for who in ("client", "model")},
        "turns": ec.sessions.turns,
        "new_tokens": sum(s.new_tokens for s in sessions),
        "guard": guard_counts(sessions),
    }


def session_rows(name: str, sessions: list[Session], judged: dict | None) -> list[dict]:
    """sessions.jsonl: one line per model and session: the intake, the shown transcript, the guard's record per
    model turn, the end, and the CTRS scores per repeat (None: not judged or the judge failed)."""
    ctrs = (judged or {}).get("scores", {}).get("ctrs", {})
    rows = []
    for s in sessions:
        row = {
            "model": name,
            "id": s.id,
            "intake": s.intake,
            "client_crisis": bool(s.client.get("crisis")),
            "messages": s.messages,
            "guard": s.guard,
            "completed": not s.error,
            "ctrs": ctrs.get(s.id),
        }
        if s.error:
            row["error"] = s.error
        rows.append(row)
    return rows


def system_prompt(ec: EvalConfig) -> tuple[str, str]:
    """(the model's system prompt in sessions, where it came from)."""
    if ec.sessions.system_prompt is not None:
        return ec.sessions.system_prompt, "eval.sessions.system_prompt"
    return SESSION_SYSTEM_PROMPT, "cbt_llm.domain.prompts.SESSION_SYSTEM_PROMPT"
