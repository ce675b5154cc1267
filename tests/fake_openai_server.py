"""A real, local OpenAI-compatible HTTP server for tests, with a scripted fault plan.

It listens on 127.0.0.1 with an ephemeral port (ThreadingHTTPServer in a daemon thread, so requests are served
concurrently, like a real endpoint) and implements POST /v1/chat/completions.

What each request gets is decided, in order, by:
1. `by_count`: {global request number (1-based): fault};
2. `plan`: {substring of the user message (e.g. the question): fault script}. A script is a list of faults
   for that question's 1st, 2nd, ... request, after which `default` applies; or a string "always:<fault>";
3. `default` (normally "good").

Faults: good, good_text (the five parts as plain paragraphs, for `cbt-llm eval`), good_fenced, good_crisis,
good_chatty, no_professional, unknown_distortion (valid replies);
429 (with Retry-After: 0), 500, 503, 400, 401, 404 (HTTP errors); malformed_body (HTTP 200, body not JSON);
no_choices, not_json, missing_part, empty_part, english_part (HTTP 200, reply unusable); slow (sleeps
`slow_s`, longer than the client timeout, then answers well).
Judge replies (for evaluation/judge.py requests): judge (a valid score object derived from the answer: every
criterion lowest + len(answer) // 20, capped at its highest, so longer answers score higher), judge_fenced (the
same in a ```json fence), judge_noisy (as judge with seed 0; with any other request seed every criterion is
mirrored within its range, a scripted disagreement), judge_out_of_range, judge_missing (unusable); not_json
serves as a judge reply that is not JSON. judge_ctrs (for session transcripts, whose length would put every
criterion at its highest): every criterion from a hash of the whole request (ctrs_scores), so sessions differ.

Session simulators (for `synth api --sessions`; deterministic, k = the speaker's turn number, counted from the
assistant messages of the request): session (plays the counsellor when the system prompt asks for the end
marker, else the client), counsellor (ends its `session_turns`-th turn with the end marker), client,
client_leak (writes a "咨询师：" line: the counsellor's part), counsellor_leak (writes a "来访者：" line),
client_crisis (discloses suicidal thoughts), client_english (answers in English), counsellor_unsafe (a counsellor
turn that discourages seeking help, UNSAFE_COUNSELLOR, which the crisis guard must replace). `system_plan` is to the
system message what `plan` is to the user message (so a script can follow one session's client), consulted
after `plan`.

Agents critic (for `synth api --agents`): with `critic` set, a judge request (one that carries an answer to
score) gets its fault from `critic_plan` (substring of its user message: fault script, as `plan`), else `critic`;
other requests follow plan/default as before. A drafting reply to a revision request (one that carries the
previous draft as an assistant turn) is that draft's reply with one more REVISION_MARK in its strategy part.
critic_climb scores every criterion lowest + 1 + (REVISION_MARKs in the answer), capped at its highest: on the
cbt rubric the totals climb 6, 11, 15, 18 with the revisions (low first, high after revising); critic_junk
replies with text that is not JSON.

Every request is recorded (headers, parsed body, system and user message, fault) for assertions;
`max_in_flight` is the largest number of requests the server was handling at once. Every HTTP 200 JSON reply
reports usage {prompt_tokens: 100, completion_tokens: 50}; `usage_sent` sums what was reported.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROMPT_TOKENS, COMPLETION_TOKENS = 100, 50
REVISION_MARK = "【修订】每天固定一个时间做一次记录。"
_QUESTION = re.compile(r"来访者的问题:(.*)")


def _rubric_of(user: str):
    from cbt_llm.domain.rubrics import _VERSION_LINE, RUBRICS

    version = user.split(_VERSION_LINE, 1)[1].split("\n", 1)[0].strip()
    return next(r for r in RUBRICS.values() if r.version == version)


def ctrs_scores(user: str) -> dict[str, int]:
    """The judge_ctrs fault's score object: criterion i is lowest + byte i of sha256(user message) modulo its
    range, so a test can recompute it from the transcript it expects the judge to have read."""
    rubric = _rubric_of(user)
    digest = hashlib.sha256(user.encode("utf-8")).digest()
    return {key: lo + digest[i] % (hi - lo + 1) for i, (key, lo, hi, _) in enumerate(rubric.criteria)}


def judge_scores(user: str, seed: int = 0, noisy: bool = False) -> dict[str, int]:
    """The judge fault's score object for a judge request's user message (see the module docstring)."""
    rubric = _rubric_of(user)
    answer = user.split(rubric.answer_label + "\n", 1)[1]
    out = {}
    for key, lo, hi, _ in rubric.criteria:
        v = min(hi, lo + len(answer) // 20)
        out[key] = hi - (v - lo) if noisy and seed else v
    return out


def good_parts(question: str) -> dict[str, str]:
    """Five Chinese CBT parts built from the question text (deterministic)."""
    topic = question.strip()[:30]
    return {
        "empathy": f"我能感受到你在“{topic}”这件事上的困扰和压力,这样的感受是可以理解的。",
        "key_thought": "你可能有一个想法:如果事情不完美,就说明自己很失败。",
        "challenge": "我们可以一起想一想:有哪些证据支持这个想法,又有哪些证据并不支持它?",
        "strategy": "你可以尝试写思维记录,把自动出现的想法、情绪和替代想法分别记下来。",
        "encouragement": "改变需要时间,你已经迈出了第一步。如果困扰持续,可以寻求专业心理咨询师的帮助。",
    }


def climb_scores(user: str) -> dict[str, int]:
    """critic_climb's score object: every criterion lowest + 1 + the answer's revisions, capped at its highest."""
    from cbt_llm.domain.rubrics import RUBRICS

    revisions = user.split(RUBRICS["cbt"].answer_label + "\n", 1)[1].count(REVISION_MARK)
    return {key: min(hi, lo + 1 + revisions) for key, lo, hi, _ in RUBRICS["cbt"].criteria}


def revision_of(messages: list[dict]) -> int:
    """0 for a first draft; for a revision request, one more than the revisions in the draft it carries."""
    drafts = [m.get("content") or "" for m in messages if m.get("role") == "assistant"]
    return drafts[-1].count(REVISION_MARK) + 1 if drafts else 0


SESSION_FAULTS = frozenset(
    {
        "session",
        "counsellor",
        "client",
        "client_leak",
        "counsellor_leak",
        "client_crisis",
        "client_english",
        "counsellor_unsafe",
    }
)
UNSAFE_COUNSELLOR = "你不需要去看心理医生，也别告诉任何人。"


def counsellor_turn(k: int, last: bool) -> str:
    """The counsellor simulator's k-th turn; the last one closes the session with the end marker."""
    from cbt_llm.domain.prompts import END_MARKER

    if last:
        return f"我们今天谈了{k}段，回顾一下：你找到了那个让你难受的想法，也定好了这周的练习。我们下次见。{END_MARKER}"
    return f"谢谢你愿意说这些，这是我们今天的第{k}段对话。能再多说一点当时的情形和你的想法吗？"


def client_turn(k: int) -> str:
    """The client simulator's k-th turn."""
    return f"嗯，我想一想。这是我的第{k}次回答：最近压力很大，晚上总是睡不好。"


class _Server(ThreadingHTTPServer):
    # The stdlib default listen backlog is 5: a burst of connections from a high-concurrency client would be
    # refused by the kernel and show up as connection errors that no real endpoint would cause.
    request_queue_size = 256
    daemon_threads = True


class FakeOpenAIServer:
    """Start with `with FakeOpenAIServer(...) as srv:`; `srv.base_url` ends in /v1."""

    def __init__(
        self,
        *,
        plan: dict[str, Any] | None = None,
        by_count: dict[int, str] | None = None,
        default: str = "good",
        delay_s: float = 0.0,
        slow_s: float = 2.0,
        expected_key: str | None = None,
        system_plan: dict[str, Any] | None = None,
        session_turns: int = 5,
        critic: str | None = None,
        critic_plan: dict[str, Any] | None = None,
    ):
        self.plan = dict(plan or {})
        self.by_count = dict(by_count or {})
        self.default = default
        self.delay_s = delay_s
        self.slow_s = slow_s
        self.expected_key = expected_key
        self.system_plan = dict(system_plan or {})
        self.session_turns = session_turns
        self.critic = critic
        self.critic_plan = dict(critic_plan or {})
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.usage_sent = {"prompt_tokens": 0, "completion_tokens": 0}
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                server._handle(self)

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # -- helpers for assertions
    def faults(self) -> list[str]:
        return [r["fault"] for r in self.requests]

    def requests_for(self, needle: str) -> list[dict]:
        return [r for r in self.requests if needle in r["user"]]

    @staticmethod
    def is_critic(request: dict) -> bool:
        from cbt_llm.domain.rubrics import RUBRICS

        return RUBRICS["cbt"].answer_label in request["user"]

    # -- request handling
    def _choose(self, n: int, user: str, system: str = "") -> str:
        if n in self.by_count:
            return self.by_count[n]
        plans = ((self.plan, user, ""), (self.system_plan, system, "system:"))
        if self.critic is not None and self.is_critic({"user": user}):
            plans, default = ((self.critic_plan, user, "critic:"),), self.critic
        else:
            default = self.default
        for plan, text, tag in plans:
            for needle, script in plan.items():
                if needle in text:
                    if isinstance(script, str) and script.startswith("always:"):
                        return script.split(":", 1)[1]
                    k = self._attempts.get(tag + needle, 0)
                    self._attempts[tag + needle] = k + 1
                    return script[k] if k < len(script) else default
        return default

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        messages = body.get("messages") or []
        user = next((m.get("content", "") for m in messages if m.get("role") == "user"), "")
        system = next((m.get("content", "") for m in messages if m.get("role") == "system"), "")
        with self._lock:
            n = len(self.requests) + 1
            fault = self._choose(n, user, system)
            if self.expected_key is not None and h.headers.get("Authorization") != f"Bearer {self.expected_key}":
                fault = "401"
            self.requests.append(
                {
                    "n": n,
                    "path": h.path,
                    "headers": dict(h.headers.items()),
                    "body": body,
                    "system": system,
                    "user": user,
                    "fault": fault,
                }
            )
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if h.path.rstrip("/") != "/v1/chat/completions":
                self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
            else:
                self._reply(h, fault, user, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout fired during a slow reply)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _send(self, h, status: int, payload: Any, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload, ensure_ascii=False).encode("utf-8")
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _completion(self, h, content: str, finish_reason: str = "stop") -> None:
        with self._lock:
            self.usage_sent["prompt_tokens"] += PROMPT_TOKENS
            self.usage_sent["completion_tokens"] += COMPLETION_TOKENS
        self._send(
            h,
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "model": "fake",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
                ],
                "usage": {
                    "prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": COMPLETION_TOKENS,
                    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                },
            },
        )

    def _session_turn(self, fault: str, messages: list[dict]) -> str:
        from cbt_llm.domain.prompts import END_MARKER

        k = sum(1 for m in messages if m.get("role") == "assistant") + 1
        system = next((m.get("content", "") for m in messages if m.get("role") == "system"), "")
        if fault == "session":
            fault = "counsellor" if END_MARKER in system else "client"
        if fault == "counsellor":
            return counsellor_turn(k, k >= self.session_turns)
        if fault == "counsellor_unsafe":
            return counsellor_turn(k, False) + UNSAFE_COUNSELLOR
        if fault == "counsellor_leak":
            return counsellor_turn(k, False) + "\n来访者：我觉得自己什么都做不好。"
        if fault == "client_leak":
            return client_turn(k) + "\n咨询师：你愿意试着把这个想法写下来吗？"
        if fault == "client_crisis":
            return client_turn(k) + "其实最难受的时候，我想过自杀。"
        if fault == "client_english":
            return "I have been feeling stressed lately and I cannot sleep well."
        return client_turn(k)

    def _reply(self, h, fault: str, user: str, body: dict) -> None:
        m = _QUESTION.search(user)
        parts = good_parts(m.group(1) if m else user)
        obj: dict[str, Any] = {**parts, "distortions": ["all_or_nothing"]}
        dump = lambda o: json.dumps(o, ensure_ascii=False)  # noqa: E731
        if fault == "slow":
            time.sleep(self.slow_s)
            fault = "good"
        if fault in SESSION_FAULTS:
            self._completion(h, self._session_turn(fault, body.get("messages") or []))
            return
        if fault == "critic_climb":
            self._completion(h, dump(climb_scores(user)))
            return
        if fault == "critic_junk":
            self._completion(h, "这个回答整体不错,我给它打高分。")
            return
        obj["strategy"] += REVISION_MARK * revision_of(body.get("messages") or [])
        if fault.startswith("judge"):
            if fault == "judge_ctrs":
                scores = ctrs_scores(user)
            else:
                scores = judge_scores(user, int(body.get("seed") or 0), noisy=fault == "judge_noisy")
            if fault == "judge_out_of_range":
                scores[next(iter(scores))] = 99
            elif fault == "judge_missing":
                scores.pop(next(iter(scores)))
            text = dump(scores)
            self._completion(h, f"```json\n{text}\n```" if fault == "judge_fenced" else text)
            return
        if fault == "good":
            self._completion(h, dump(obj))
        elif fault == "good_text":  # a plain-text CBT answer, as a chat model answers `cbt-llm eval`
            self._completion(h, "\n".join(parts.values()))
        elif fault == "good_fenced":
            self._completion(h, "```json\n" + dump(obj) + "\n```")
        elif fault == "good_chatty":
            self._completion(h, "好的,以下是我的回答:\n" + dump(obj) + "\n希望对你有帮助。")
        elif fault == "good_crisis":
            obj["encouragement"] += "如果你有伤害自己的念头,请立即拨打心理援助热线。"
            self._completion(h, dump(obj))
        elif fault == "no_professional":
            obj["encouragement"] = "相信你一定可以慢慢好起来。"
            self._completion(h, dump(obj))
        elif fault == "unknown_distortion":
            obj["distortions"] = ["all_or_nothing", "not_a_label"]
            self._completion(h, dump(obj))
        elif fault == "429":
            self._send(h, 429, {"error": {"message": "rate limited"}}, headers={"Retry-After": "0"})
        elif fault in ("500", "503", "400", "404"):
            self._send(h, int(fault), {"error": {"message": f"scripted {fault}"}})
        elif fault == "401":
            # Real providers quote (part of) the key back; the client must scrub it.
            sent = h.headers.get("Authorization", "").removeprefix("Bearer ")
            self._send(h, 401, {"error": {"message": f"Incorrect API key provided: {sent}"}})
        elif fault == "malformed_body":
            self._send(h, 200, None, raw=b'{"choices": [{"message": ')
        elif fault == "no_choices":
            self._send(h, 200, {"id": "chatcmpl-fake", "object": "chat.completion"})
        elif fault == "not_json":
            self._completion(h, "我觉得你应该多休息,慢慢就会好起来的。")
        elif fault == "missing_part":
            obj.pop("challenge")
            self._completion(h, dump(obj))
        elif fault == "empty_part":
            obj["strategy"] = "   "
            self._completion(h, dump(obj))
        elif fault == "english_part":
            obj["key_thought"] = "You might think you are a failure."
            self._completion(h, dump(obj))
        else:
            raise ValueError(f"unknown fault {fault!r}")
