"""One guarded reply, the same for the server and the terminal chat: the crisis guard (cbt_llm/guard.py) before
and after the model.

    1. check_user_turn(messages)        a crisis adds the guard's system note to the prompt the model sees
    2. the model answers                engine.generate_one
    3. check_model_output(text)         unsafe model text is replaced by the crisis block
    4. wrap_reply(text, verdict, first) crisis block first in a crisis; the disclaimer on the first reply of a
                                        conversation (messages with no earlier assistant turn)
"""

from __future__ import annotations

from dataclasses import dataclass

from cbt_llm.guard import CrisisGuard, Verdict


@dataclass
class GuardedReply:
    """The reply a person sees, the model's completion it was made from, and the guard's verdict."""

    text: str
    completion: object  # serve.engine.Completion
    verdict: Verdict
    replaced: bool


def with_note(messages: list[dict], note: str | None) -> list[dict]:
    """The messages the model sees: the guard's note appended to the system turn (or a system turn of its own)."""
    if not note:
        return messages
    if messages[0]["role"] == "system":
        first = dict(messages[0], content=f"{messages[0].get('content') or ''}\n\n{note}".strip())
        return [first, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def guarded_reply(engine, guard: CrisisGuard, messages: list[dict], conversation_id: str | None = None, **gen):
    """Answer `messages` (the last one a user turn) through the guard; `gen`: engine.generate_one's options."""
    verdict = guard.check_user_turn(messages, conversation_id=conversation_id)
    out = engine.generate_one(with_note(messages, guard.system_note_for_model(verdict)), **gen)
    text, replaced, _ = guard.check_model_output(out.text, conversation_id=conversation_id)
    first = not any(m.get("role") == "assistant" for m in messages)
    return GuardedReply(guard.wrap_reply(text, verdict, first_reply=first), out, verdict, replaced)
