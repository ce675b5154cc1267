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

`fit` (serve/context.py's ReplyBudget, or any fit(messages, max_new_tokens) -> Fitted) sizes the reply and drops
a long conversation's oldest turns from what the model sees: it runs after the guard has read the whole
conversation and its note is in the system turn, so trimming never changes the verdict, and the note is kept.
Without one, the engine gets the messages and max_new_tokens as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from cbt_llm.domain.crisis import CRISIS_BLOCK, DISCLAIMER
from cbt_llm.domain.guard import CrisisGuard, Verdict, after_model, before_model, with_note
from serve.engine import Completion, PromptTooLong


@dataclass
class GuardedReply:
    """The reply a person sees, the model's completion it was made from, the guard's verdict, and how many of the
    oldest messages the model did not see (`fit` dropped them to fit its context; 0: none)."""

    text: str
    completion: object  # serve.engine.Completion
    verdict: Verdict
    replaced: bool
    dropped: int = 0


def fitted(seen: list[dict], fit, gen: dict) -> tuple[list[dict], dict, int]:
    """(the messages the model gets, generate_one's options with the reply length set, messages dropped)."""
    if fit is None:
        return seen, gen, 0
    out = fit(seen, gen.get("max_new_tokens"))
    return out.messages, {**gen, "max_new_tokens": out.max_new_tokens}, out.dropped


def _block_alone(guard: CrisisGuard, verdict: Verdict, messages: list[dict]) -> GuardedReply:
    """A crisis whose conversation leaves the model no room to answer: the crisis block (and the disclaimer on a
    first reply) instead of an error, so a person in crisis never gets a 400 where the hotlines should be (the
    server's choice, block_when_no_room; the terminal chat shows the block and says the message was too long)."""
    first = not any(m.get("role") == "assistant" for m in messages)
    return GuardedReply(guard.wrap_reply("", verdict, first), Completion("", 0, 0, "length"), verdict, False, 0)


def guarded_reply(
    engine, guard: CrisisGuard, messages: list[dict], conversation_id: str | None = None, *, fit=None, **gen
) -> GuardedReply:
    """Answer `messages` (the last one a user turn) through the guard; `gen`: engine.generate_one's options."""
    return guarded_replies(engine, guard, messages, conversation_id, fit=fit, **gen)[0]


def guarded_replies(
    engine,
    guard: CrisisGuard,
    messages: list[dict],
    conversation_id: str | None = None,
    n: int = 1,
    *,
    fit=None,
    block_when_no_room: bool = False,
    **gen,
) -> list[GuardedReply]:
    """`n` answers to `messages` (a request's `n`), each through the output check; the user turn is read once.
    Sampled (temperature > 0), each is generated on its own, with seed + i when a seed is given (so they differ and
    repeat); greedy, the model answers once and every choice is that reply (greedy decoding gives nothing else)."""
    verdict, seen = before_model(guard, messages, conversation_id)
    try:
        seen, gen, dropped = fitted(seen, fit, gen)
    except PromptTooLong:
        if not (verdict.crisis and block_when_no_room):
            raise
        return [_block_alone(guard, verdict, messages)] * n
    replies: list[GuardedReply] = []
    for i in range(n):
        if i and not gen.get("temperature"):
            replies.append(replies[0])
            continue
        seed = gen.get("seed")
        try:
            out = engine.generate_one(seen, **{**gen, **({"seed": seed + i} if seed is not None else {})})
        except PromptTooLong:
            if not (verdict.crisis and block_when_no_room):
                raise
            return [_block_alone(guard, verdict, messages)] * n
        text, replaced, _ = after_model(guard, out.text, verdict, messages, conversation_id)
        replies.append(GuardedReply(text, out, verdict, replaced, dropped))
    return replies


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
        *,
        fit=None,
        verdict: Verdict | None = None,
        block_when_no_room: bool = False,
        **gen,
    ):
        self.block_when_no_room = block_when_no_room
        self.deltas, self.guard, self.messages = deltas, guard, messages
        self.conversation_id, self.gen, self.fit = conversation_id, gen, fit
        self.reply: GuardedReply | None = None
        self.verdict: Verdict | None = verdict  # given: the user turn was read already (another choice of `n`)
        self.dropped = 0  # the oldest messages `fit` kept from the model, once started
        self._source: Iterable[str] | None = None

    def start(self) -> Verdict:
        """The guard's verdict on the user turn, and the model's text asked for (not read yet)."""
        if self.verdict is None:
            self.verdict = self.guard.check_user_turn(self.messages, conversation_id=self.conversation_id)
        if self._source is None:
            note = self.guard.system_note_for_model(self.verdict)
            try:
                seen, gen, self.dropped = fitted(with_note(self.messages, note), self.fit, self.gen)
                self._source = self.deltas(seen, **gen)
            except PromptTooLong:
                if not (self.verdict.crisis and self.block_when_no_room):
                    raise
                self._source = iter(())  # no room for the model: the block (and disclaimer) alone, never a 400
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
            wrapped = self.guard.wrap_reply(text, verdict, first)
            self.reply = GuardedReply(wrapped, None, verdict, check.replaced, self.dropped)
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
