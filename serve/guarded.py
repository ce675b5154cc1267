"""One guarded reply, the same for the server and the terminal chat: the crisis guard (cbt_llm/domain/guard.py)
before and after the model. Steps 1 and 3-4 are cbt_llm.domain.guard.before_model and after_model, which
`cbt-llm eval --sessions` puts around every model turn too.

    1. check_user_turn(messages)        a crisis adds the guard's system note to the prompt the model sees
    2. the model answers                engine.generate_one
    3. check_model_output(text)         unsafe model text is replaced by the crisis block
    4. wrap_reply(text, verdict, first) crisis block first in a crisis; the disclaimer on the first reply of a
                                        conversation (messages with no earlier assistant turn)

GuardedStream is the same reply shown while the model makes it (`cbt-llm chat`, and the server's SSE stream): the
crisis block is shown before the model starts, the model's text goes through the guard's OutputStream (which
releases it a sentence at a time, each only once every layer of the output check has read the text up to it), and
the disclaimer comes last. serve/streaming.py gives the model's text in pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from cbt_llm.domain.crisis import CRISIS_BLOCK, DISCLAIMER
from cbt_llm.domain.guard import CrisisGuard, Verdict, after_model, before_model, with_note


@dataclass
class GuardedReply:
    """The reply a person sees, the model's completion it was made from, and the guard's verdict."""

    text: str
    completion: object  # serve.engine.Completion
    verdict: Verdict
    replaced: bool


def guarded_reply(engine, guard: CrisisGuard, messages: list[dict], conversation_id: str | None = None, **gen):
    """Answer `messages` (the last one a user turn) through the guard; `gen`: engine.generate_one's options."""
    verdict, seen = before_model(guard, messages, conversation_id)
    out = engine.generate_one(seen, **gen)
    text, replaced, _ = after_model(guard, out.text, verdict, messages, conversation_id)
    return GuardedReply(text, out, verdict, replaced)


class _ModelPart:
    """The model's checked text as wrap_reply shows it, piece by piece: leading and trailing whitespace dropped
    (trailing whitespace waits until text follows it), and in crisis mode a crisis block the model text starts
    with dropped (the stream showed it already; a guarded server sends one), as wrap_reply shows it only once."""

    def __init__(self, crisis: bool):
        self.pending, self.started, self.drop_block = "", False, crisis

    def add(self, checked: str) -> str:
        self.pending += checked
        if not self.started:
            self.pending = self.pending.lstrip()
            if self.drop_block and CRISIS_BLOCK.startswith(self.pending):
                return ""  # may still become the block
            if self.drop_block and self.pending.startswith(CRISIS_BLOCK):
                self.pending = self.pending[len(CRISIS_BLOCK) :].lstrip()
            self.drop_block = False
            if not self.pending:
                return ""
            self.started = True
        out = self.pending.rstrip()
        self.pending = self.pending[len(out) :]
        return out

    def finish(self) -> str:
        """The end of the model text: a start of the block that never became all of it is shown after all (the
        whole block, all the model text there was, is not)."""
        out = "" if self.started else self.pending.strip()
        self.pending = ""
        return "" if self.drop_block and out == CRISIS_BLOCK else out


class GuardedStream:
    """guarded_reply shown as the model makes it. Iterate for the pieces to show, in order; afterwards `reply`
    holds the GuardedReply (completion None: the token counts are the deltas' own, e.g. serve.streaming.Generation).

    deltas   called as deltas(messages, **gen): the model's text in pieces as it is made; closed when the stream
             ends early (the output check tripped, or the reader closed the stream), so a generator can stop its
             model in a `finally`

    start() reads the user turn and asks `deltas` for the model's text (which may raise, e.g. PromptTooLong, before
    anything is shown); iterating calls it when it was not called. Joined, the pieces are reply.text, except when
    the output check trips mid-stream: then the text shown so far stays, nothing held back is shown, and the crisis
    block follows (not again when it was shown first and no model text since), then the disclaimer on a first
    reply; reply.text is then what guarded_reply gives for unsafe text (the block first), so that the conversation
    stays in crisis mode as it would without streaming."""

    def __init__(
        self,
        deltas: Callable[..., Iterable[str]],
        guard: CrisisGuard,
        messages: list[dict],
        conversation_id: str | None = None,
        **gen,
    ):
        self.deltas, self.guard, self.messages = deltas, guard, messages
        self.conversation_id, self.gen = conversation_id, gen
        self.reply: GuardedReply | None = None
        self.verdict: Verdict | None = None
        self._source: Iterable[str] | None = None

    def start(self) -> Verdict:
        """The guard's verdict on the user turn, and the model's text asked for (not read yet)."""
        if self.verdict is None:
            self.verdict = self.guard.check_user_turn(self.messages, conversation_id=self.conversation_id)
        if self._source is None:
            note = self.guard.system_note_for_model(self.verdict)
            self._source = self.deltas(with_note(self.messages, note), **self.gen)
        return self.verdict

    def __iter__(self) -> Iterator[str]:
        verdict = self.start()
        source = self._source
        try:
            first = not any(m.get("role") == "assistant" for m in self.messages)
            check = self.guard.output_stream(self.conversation_id)
            join = _Joiner()
            if verdict.crisis:
                yield join("block", CRISIS_BLOCK)
            yield from self._model_text(verdict, source, check, join)
            if check.replaced and join.part != "block":  # right after the block it would say the same again
                yield join("replacement", CRISIS_BLOCK)
            if first:
                yield join("disclaimer", DISCLAIMER)
            text = CRISIS_BLOCK if check.replaced else check.text
            self.reply = GuardedReply(self.guard.wrap_reply(text, verdict, first), None, verdict, check.replaced)
        finally:
            _close(source)  # stops the model when the reader left early (a no-op once it is done)

    def _model_text(self, verdict: Verdict, source: Iterable[str], check, join: _Joiner) -> Iterator[str]:
        model = _ModelPart(verdict.crisis)
        for delta in source:
            if piece := model.add(check.feed(delta)):
                yield join("model", piece)
            if check.replaced:
                _close(source)  # the model stops now, before the replacement is shown
                return
        if rest := model.add(check.close()) + model.finish():
            yield join("model", rest)


def _close(source) -> None:
    getattr(source, "close", lambda: None)()


class _Joiner:
    """A blank line between the parts of a reply (block, model text, disclaimer), as wrap_reply joins them."""

    def __init__(self):
        self.part: str | None = None

    def __call__(self, part: str, text: str) -> str:
        sep = "\n\n" if self.part not in (None, part) else ""
        self.part = part
        return sep + text
