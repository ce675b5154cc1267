"""What fits the model's context: how long a reply may be, and which of a long conversation's oldest turns the model
no longer sees. One rule for the server (serve/serving.py) and the terminal chat (serve/chat.py).

    budget = ReplyBudget(engine, cap=4096, trim=False)
    fitted = budget(messages, asked)   # messages as the model sees them; asked: the request's max_tokens or None
    fitted.messages, fitted.max_new_tokens, fitted.dropped

The reply length:
    asked        an explicit max_tokens must fit beside the prompt: PromptTooLong naming it (param "max_tokens")
                 otherwise, unless trimming makes room for it
    not asked    what the context has left after the prompt, at most `cap` (vLLM's and OpenAI's rule); a prompt
                 that leaves no room at all is PromptTooLong naming "messages"
    unknown      an engine whose context is unknown (a stand-in) gets `asked` or `fallback` (at most `cap`); an
                 upstream server (serve/remote.py) gets `asked` or nothing, and sizes the reply itself

Trimming (`trim`: on for `cbt-llm chat`, `serve.trim_history` for the server): when the prompt leaves less than the
reply needs (an explicit max_tokens, else `reserve`: min(cap, half the context)), the oldest turns are dropped, a
user turn together with the replies that follow it, until it fits. Never dropped: the system turns (where the
guard's crisis note is: serve/guarded.py fits the messages after the note is in) and the latest user turn. When
even that leaves less than the reserve, every older turn is dropped and the reply gets what is left.

Trimming changes only what the model sees. The crisis guard reads the whole conversation before this runs (its
verdict, and so crisis mode, never depends on what was dropped), and the model in a crisis still gets the guard's
note in the kept system turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve.batching import BatchingEngine
from serve.engine import PromptTooLong
from serve.remote import RemoteEngine


@dataclass
class Fitted:
    """The messages the model gets, its reply length (None: the engine's upstream decides) and how many messages
    were dropped from the start of the conversation (0: none)."""

    messages: list[dict]
    max_new_tokens: int | None
    dropped: int = 0


def turn_groups(messages: list[dict]) -> list[list[int]]:
    """The indices that may be dropped, oldest first, in groups dropped together: each user turn with the replies
    after it (replies before any user turn are a group of their own). System turns and the latest user turn (with
    anything after it) are in none."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    end = users[-1] if users else len(messages)
    groups: list[list[int]] = []
    for i, m in enumerate(messages[:end]):
        if m.get("role") == "system":
            continue
        if m.get("role") == "user" or not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def drop_groups(messages: list[dict], groups: list[list[int]], k: int) -> list[dict]:
    """`messages` without its k oldest groups."""
    gone = {i for g in groups[:k] for i in g}
    return [m for i, m in enumerate(messages) if i not in gone]


class ReplyBudget:
    """The rule above for one engine (serve.engine.Engine or VllmEngine, either behind serve/batching.py, a
    RemoteEngine, or a stand-in).

    cap       the longest reply a request that asks for none gets (serve's max_tokens_limit; chat's --max-tokens)
    trim      drop the oldest turns to fit instead of failing
    fallback  the reply length when the model's context is unknown and none was asked for
    advice    the end of the "no room" message: what the person can do
    """

    def __init__(
        self,
        engine,
        *,
        cap: int,
        trim: bool = False,
        fallback: int = 512,
        advice: str = "shorten the messages",
    ):
        inner = engine.engine if isinstance(engine, BatchingEngine) else engine
        self.context: int | None = getattr(inner, "context_length", None)
        self._ids = getattr(inner, "prompt_ids", None)
        self.remote = isinstance(inner, RemoteEngine)
        self.cap, self.trim, self.fallback, self.advice = cap, trim, min(fallback, cap), advice

    @property
    def reserve(self) -> int:
        """What trimming makes room for when no reply length was asked for."""
        return max(1, min(self.cap, (self.context or 0) // 2))

    def _count(self, messages: list[dict]) -> int:
        return len(self._ids(messages))

    def __call__(self, messages: list[dict], asked: int | None = None, field: str = "max_tokens") -> Fitted:
        """`messages` (the last one a user turn) fitted; `asked` the explicit reply length (None: what fits),
        named `field` in an error. PromptTooLong when it cannot fit."""
        if not self.context or self._ids is None:
            return Fitted(messages, asked if asked is not None or self.remote else self.fallback)
        context = self.context
        n = self._count(messages)
        need = asked if asked is not None else (self.reserve if self.trim else 1)
        if n + need <= context:
            return Fitted(messages, self._length(asked, n))
        dropped = 0
        if self.trim and (groups := turn_groups(messages)):
            k, kept, n = self._fewest_dropped(messages, groups, need)
            dropped = len(messages) - len(kept)
            messages = kept
            if n + need <= context or (asked is None and n < context):
                return Fitted(messages, self._length(asked, n), dropped)
        if n >= context or asked is None:
            raise PromptTooLong(
                n,
                need,
                context,
                message=f"the messages are {n} tokens{' even with the older turns dropped' if dropped else ''} and "
                f"the model's context is {context}: no room is left for a reply; {self.advice}",
            )
        raise PromptTooLong(
            n,
            asked,
            context,
            param=field,
            message=f"{field} {asked} does not fit: the messages are {n} of the model's {context} tokens, which "
            f"leaves {context - n}; lower {field}, or leave it out and the reply gets what fits",
        )

    def _length(self, asked: int | None, n: int) -> int:
        return asked if asked is not None else min(self.cap, self.context - n)

    def _fewest_dropped(self, messages: list[dict], groups: list[list[int]], need: int) -> tuple[int, list, int]:
        """(k, the messages without the k oldest groups, their tokens) for the smallest k that leaves `need`
        tokens; every group dropped when none does. A binary search: fewer turns are never more tokens."""
        lo, hi = 1, len(groups)
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            kept = drop_groups(messages, groups, mid)
            n = self._count(kept)
            if n + need <= self.context:
                best, hi = (mid, kept, n), mid - 1
            else:
                lo = mid + 1
        if best is None:
            kept = drop_groups(messages, groups, len(groups))
            best = (len(groups), kept, self._count(kept))
        return best
