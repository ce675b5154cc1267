"""The crisis guard: the one safety layer that runs before and after the model on every path that shows text to a
person or writes it into a corpus (serve, chat, eval's sessions, synth api). Plain functions and one class; no web
framework.

    guard = CrisisGuard()                                   # patterns + the shipped learned layer
    verdict = guard.check_user_turn(messages, conversation_id=cid)
    note = guard.system_note_for_model(verdict)             # add to the system prompt when not None
    text, replaced, reason = guard.check_model_output(model_text, conversation_id=cid)
    reply = guard.wrap_reply(text, verdict, first_reply=is_first_reply)
    # or the two steps in one call each: before_model (verdict, messages with the note), after_model (shown text)

    check = guard.output_stream(conversation_id=cid)     # the same output check on text arriving in pieces
    shown = check.feed(delta)                           # the part now safe to show ('' while held back)
    shown = check.close()                               # the rest, once the model is done

Layers, each of which can only add a flag, never remove one (but for the one rule under patterns):
    patterns     cbt_llm.domain.crisis.detect (user turns, by risk construct) and reply_check.unsafe_output
                 (replies, by harm kind): precise on the phrasings they were written for; they always run. On
                 user turns an acute match (a method, intent, a plan, preparation, an attempt) always stands, and so
                 does a match with less than a sentence around it; any other match stands when the learned layer
                 gives the message at least the floor recorded in its file (corroborate=True): the patterns read
                 words, not context (想死 in a question about warning signs, in a novel, about a relative's pills
                 locked away)
    learned      cbt_llm.domain.guard_classifier: character n-gram classifiers for user turns and replies, trained
                 on the labelled set shipped in cbt_llm/domain/guard_data/ (on by default)
    classifier   optional: any callable text -> probability of crisis (e.g. load_classifier(folder), a local
                 transformers text-classification model)
    model        optional: a generative safety model (cbt_llm.inference.safety_model), asked only when the layers
                 above found nothing; its failure or timeout is counted and the other layers' verdict stands
Every verdict names its construct (user turns) or harm kind (replies) and the layer that raised it. Once any user
turn of a conversation was a crisis, or an earlier reply carried the crisis block, the whole conversation stays in
crisis mode.

Counters (metrics()) are plain dicts for a Prometheus layer to read; they hold constructs, kinds, counts and
conversation ids hashed with a salt, never message text.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re

# the stdlib's own regex parser: the stream's hold-back is read off the output patterns themselves, so a pattern
# made longer can never leave it too short
import re._constants as sre
import re._parser as sre_parse
import secrets
import threading
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cbt_llm.domain import crisis
from cbt_llm.domain.crisis import CONSTRUCTS, CRISIS_BLOCK, DISCLAIMER, detect
from cbt_llm.domain.guard_classifier import MODEL_DIR, TextClassifier, model_path, needs_corroboration
from cbt_llm.domain.guard_classifier import load_classifier as load_text_classifier
from cbt_llm.domain.reply_check import OUTPUT_PATTERNS, unsafe_output

Classifier = Callable[[str], float]
# A generative safety model's reading of one text: (role, text) -> (flagged, construct or harm kind or None).
ModelTier = Callable[[str, str], tuple[bool, str | None]]
DEFAULT = "default"  # the learned layer shipped with the package (cbt_llm/domain/guard_model/)


@dataclass(frozen=True)
class Verdict:
    """The guard's reading of a conversation at its latest user turn.

    crisis        the conversation is in crisis mode (the reply must start with the crisis block)
    construct     what put it there: a cbt_llm.domain.crisis.CONSTRUCTS key (None when no layer named one, or
                  for a non-crisis)
    latest_turn   the latest user turn is itself a crisis (False when only an earlier turn was)
    source        the layer that raised it, "patterns", "learned", "classifier" or "model", or "earlier_turn" (an
                  earlier user turn) or "earlier_reply" (an earlier reply carried the crisis block); None for a
                  non-crisis
    score         the learned layer's or the classifier's probability when it ran, else None
    """

    crisis: bool
    construct: str | None = None
    latest_turn: bool = False
    source: str | None = None
    score: float | None = None


SAFE = Verdict(False)


def message_text(message: Mapping) -> str:
    """The text of one chat message: `content` as a string, or the text parts of an OpenAI-style parts list."""
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")


@functools.cache
def shipped_classifier(task: str) -> TextClassifier:
    """The learned layer shipped with the package for `task` ("user" or "reply"), loaded once per process."""
    return load_text_classifier(model_path(task, MODEL_DIR))


def _learned(value: TextClassifier | str | Path | None, task: str) -> TextClassifier | None:
    if value is None or isinstance(value, TextClassifier):
        return value
    if value == DEFAULT:
        return shipped_classifier(task)
    return load_text_classifier(value)


class CrisisGuard:
    """Crisis detection on user turns, the crisis note for the model, the reply wrapper and the output check.

    user_model, reply_model  the learned layer for user turns and for replies: DEFAULT (the shipped one), a saved
                classifier's path, a TextClassifier, or None (off)
    classifier  optional callable text -> probability of crisis (e.g. load_classifier(folder)) for user turns
    threshold   the classifier probability from which a turn is a crisis
    corroborate a non-acute pattern match on a user turn stands only with the learned layer's corroboration (its
                user model's `corroborate` floor); no effect without a user model or a floor
    model_tier  optional ModelTier (cbt_llm.inference.safety_model): asked last, on user turns and replies
    salt        what conversation ids are hashed with; None: a random salt per process (ids from two processes
                then cannot be joined, which is the point); give one to count conversations across restarts
    A layer that raises is counted (layer_errors_total) and ignored: the other layers' verdict stands.
    """

    def __init__(
        self,
        user_model: TextClassifier | str | Path | None = DEFAULT,
        reply_model: TextClassifier | str | Path | None = DEFAULT,
        classifier: Classifier | None = None,
        threshold: float = 0.5,
        model_tier: ModelTier | None = None,
        salt: bytes | str | None = None,
        corroborate: bool = True,
    ):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"guard threshold must be in (0, 1], got {threshold}")
        self.user_model, self.reply_model = _learned(user_model, "user"), _learned(reply_model, "reply")
        self.classifier, self.threshold, self.model_tier = classifier, threshold, model_tier
        floor = self.user_model.corroborate if corroborate and self.user_model is not None else None
        self.pattern_floor: float | None = floor
        self._salt = salt.encode() if isinstance(salt, str) else (salt if salt is not None else secrets.token_bytes(16))
        self._lock = threading.Lock()
        # construct -> {hashed conversation id -> crisis turns}: what a dashboard counts, never what was said
        self.events: dict[str, dict[str, int]] = {}
        # harm kind -> {hashed conversation id -> replaced model outputs}
        self.output_events: dict[str, dict[str, int]] = {}
        self._counters: dict[str, int] = {
            "user_turns_total": 0,
            "crisis_mode_turns_total": 0,
            "classifier_errors_total": 0,
            "model_tier_errors_total": 0,
            "patterns_not_corroborated_total": 0,
        }
        self._by_layer: dict[str, int] = {}

    # -- ids and counters ----------------------------------------------------------------------------

    def hash_id(self, conversation_id: str | None) -> str:
        """sha256 of salt + id (16 hex digits); 'anonymous' when the caller has no id."""
        if conversation_id is None:
            return "anonymous"
        return hashlib.sha256(self._salt + str(conversation_id).encode()).hexdigest()[:16]

    def _count(self, events: dict[str, dict[str, int]], key: str, conversation_id: str | None, layer: str) -> None:
        conversation = self.hash_id(conversation_id)
        with self._lock:
            per = events.setdefault(key, {})
            per[conversation] = per.get(conversation, 0) + 1
            self._by_layer[layer] = self._by_layer.get(layer, 0) + 1

    def _increment(self, counter: str) -> None:
        with self._lock:
            self._counters[counter] += 1

    def metrics(self) -> dict:
        """Counters as plain dicts (copies): turns checked, crisis turns and distinct conversations by construct,
        turns in crisis mode because of an earlier turn, replaced model outputs by harm kind, flags by the layer
        that raised them, errors of the optional layers."""
        with self._lock:
            return {
                **self._counters,
                "crisis_turns_total": {c: sum(per.values()) for c, per in self.events.items()},
                "crisis_conversations": {c: len(per) for c, per in self.events.items()},
                "output_replaced_total": {r: sum(per.values()) for r, per in self.output_events.items()},
                "flags_by_layer_total": dict(self._by_layer),
            }

    # -- the layers ----------------------------------------------------------------------------------

    def _classify(self, text: str) -> float | None:
        if self.classifier is None:
            return None
        try:
            return float(self.classifier(text))
        except Exception:  # a broken classifier must never take the other layers down with it
            self._increment("classifier_errors_total")
            return None

    def _ask_model(self, role: str, text: str) -> tuple[bool, str | None]:
        if self.model_tier is None:
            return False, None
        try:
            return self.model_tier(role, text)
        except Exception:  # a model tier that fails or times out is counted; the other layers' verdict stands
            self._increment("model_tier_errors_total")
            return False, None

    def read_user_text(self, text: str, *, with_model: bool = True) -> Verdict:
        """One user message through every layer, the cheapest first (a latest turn when it flags, else SAFE with
        the learned layer's score)."""
        found = detect(text)
        if found and (self.pattern_floor is None or not needs_corroboration(found)):
            return Verdict(True, found.construct, True, "patterns")
        score = None
        if self.user_model is not None:
            learned = self.user_model(text)
            if found and learned.score >= self.pattern_floor:
                return Verdict(True, found.construct, True, "patterns", learned.score)
            if learned.flagged:
                return Verdict(True, learned.kind, True, "learned", learned.score)
            if found:  # what a platform watches: pattern matches the learned layer read as not a crisis
                self._increment("patterns_not_corroborated_total")
            score = learned.score
        p = self._classify(text)
        if p is not None and p >= self.threshold:
            return Verdict(True, None, True, "classifier", p)
        score = p if p is not None else score
        if with_model:
            flagged, kind = self._ask_model("user", text)
            if flagged:
                return Verdict(True, kind if kind in CONSTRUCTS else None, True, "model", score)
        return SAFE if score is None else Verdict(False, score=score)

    def read_reply_text(self, text: str) -> tuple[str | None, str | None]:
        """(harm kind or "unsafe" when the layer names none, the layer) for model text that must not be shown;
        (None, None) for text every layer lets through."""
        kind = unsafe_output(text)
        if kind is not None:
            return kind, "patterns"
        if self.reply_model is not None:
            learned = self.reply_model(text)
            if learned.flagged:
                return learned.kind, "learned"
        flagged, kind = self._ask_model("assistant", text)
        if flagged:
            return kind if kind in crisis.HARM_KINDS else "unsafe", "model"
        return None, None

    # -- before the model ----------------------------------------------------------------------------

    def check_user_turn(self, messages: Sequence[Mapping], conversation_id: str | None = None) -> Verdict:
        """The verdict at the latest user turn of `messages` (OpenAI-style {"role", "content"} dicts, oldest
        first). The latest turn goes through every layer; earlier user turns through the patterns and the learned
        layer (the model tier is asked about the latest turn only); an earlier assistant reply that starts with
        the crisis block also keeps the conversation in crisis mode."""
        users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        if not users:
            return SAFE
        with self._lock:
            self._counters["user_turns_total"] += 1
        last = users[-1]
        verdict = self.read_user_text(message_text(messages[last]))
        if verdict.crisis:
            self._count(self.events, verdict.construct or "unnamed", conversation_id, verdict.source)
            return verdict
        for m in messages[:last]:
            earlier = None
            if m.get("role") == "user":
                hit = self.read_user_text(message_text(m), with_model=False)
                earlier = Verdict(True, hit.construct, False, "earlier_turn") if hit.crisis else None
            elif m.get("role") == "assistant" and message_text(m).lstrip().startswith(CRISIS_BLOCK):
                earlier = Verdict(True, None, False, "earlier_reply")
            if earlier is not None:
                with self._lock:
                    self._counters["crisis_mode_turns_total"] += 1
                return earlier
        return verdict

    def system_note_for_model(self, verdict: Verdict) -> str | None:
        """The instruction that tells the model of the risk (added to its system prompt), or None."""
        if not verdict.crisis:
            return None
        what = CONSTRUCTS.get(verdict.construct or "", "自杀、自伤或伤害他人的风险")
        when = "用户最新的消息" if verdict.latest_turn else "用户在本次对话的早前消息中"
        return (
            f"【安全提示】{when}显示可能存在危机：{what}。系统已在你的回复之前向用户展示了危机求助信息"
            "（心理援助热线、急救电话、联系信任的人）。请你：认真、温和地回应对方的感受，不评判、不说教；"
            "直接而关切地询问对方现在是否安全；鼓励对方立刻联系身边信任的人、拨打心理援助热线或前往医院急诊；"
            "不要提供任何自杀、自伤或伤害他人的方法、工具或细节；不要劝阻对方寻求专业帮助，也不要承诺替对方保密危险。"
        )

    # -- after the model -----------------------------------------------------------------------------

    def check_model_output(self, text: str, conversation_id: str | None = None) -> tuple[str, bool, str | None]:
        """(text to show, replaced, harm kind): model text any layer finds unsafe (a method, validation of
        self-harm, secrecy or turning away from help, dosing beyond a prescription, harm to others) is replaced,
        whole, by the crisis block."""
        kind, layer = self.read_reply_text(text)
        if kind is None:
            return text, False, None
        self._count(self.output_events, kind, conversation_id, layer)
        return CRISIS_BLOCK, True, kind

    def output_stream(self, conversation_id: str | None = None) -> OutputStream:
        """check_model_output for model text that arrives in pieces (a token stream): see OutputStream."""
        return OutputStream(self, conversation_id)

    @staticmethod
    def wrap_reply(text: str, verdict: Verdict, first_reply: bool) -> str:
        """The reply a person sees: the crisis block first when the conversation is in crisis (once, even if
        the output check already put it there), then the model's text, then the disclaimer on the first reply."""
        parts = []
        if verdict.crisis and not text.lstrip().startswith(CRISIS_BLOCK):
            parts.append(CRISIS_BLOCK)
        parts.append(text.strip())
        if first_reply:
            parts.append(DISCLAIMER)
        return "\n\n".join(p for p in parts if p)


# -- one reply, before and after the model -------------------------------------------------------------


def with_note(messages: list[dict], note: str | None) -> list[dict]:
    """The messages the model sees: the guard's note appended to the system turn (or a system turn of its own)."""
    if not note:
        return messages
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0], content=f"{messages[0].get('content') or ''}\n\n{note}".strip())
        return [first, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def before_model(
    guard: CrisisGuard, messages: list[dict], conversation_id: str | None = None
) -> tuple[Verdict, list[dict]]:
    """(the verdict at the latest user turn, the messages the model is given): in a crisis the guard's note is in
    the system turn. Every path that shows model text to a person (serve, chat, eval's sessions) starts here."""
    verdict = guard.check_user_turn(messages, conversation_id=conversation_id)
    return verdict, with_note(messages, guard.system_note_for_model(verdict))


def after_model(
    guard: CrisisGuard, text: str, verdict: Verdict, messages: list[dict], conversation_id: str | None = None
) -> tuple[str, bool, str | None]:
    """(the reply a person sees, replaced, why): unsafe model text replaced by the crisis block, then wrap_reply
    (the block first in a crisis; the disclaimer on the first reply, i.e. when `messages` has no assistant turn)."""
    checked, replaced, reason = guard.check_model_output(text, conversation_id=conversation_id)
    first = not any(m.get("role") == "assistant" for m in messages)
    return guard.wrap_reply(checked, verdict, first_reply=first), replaced, reason


# -- model output that arrives in pieces ---------------------------------------------------------------


def _letters_at_most(parsed) -> float:
    """The most non-digit characters one match of a parsed pattern spans (lookaheads included, since they read
    text after the match); inf when unbounded. Digits are left out because a `\\d+` run is unbounded."""
    total = 0.0
    for op, av in parsed:
        if op is sre.LITERAL:
            total += 0 if chr(av).isdecimal() else 1
        elif op in (sre.ANY, sre.NOT_LITERAL):
            total += 1
        elif op is sre.IN:
            total += 0 if all(_digits_only(op2, av2) for op2, av2 in av) else 1
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            _, hi, sub = av
            each = _letters_at_most(sub)
            total += 0 if each == 0 else (math.inf if hi == sre.MAXREPEAT else hi * each)
        elif op is sre.SUBPATTERN:
            total += _letters_at_most(av[3])
        elif op is sre.BRANCH:
            total += max(_letters_at_most(alt) for alt in av[1])
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            total += _letters_at_most(av[1])
        elif op is sre.ATOMIC_GROUP:
            total += _letters_at_most(av)
        elif op is not sre.AT:  # a back reference or anything new: no bound can be claimed
            return math.inf
    return total


def _digits_only(op, av) -> bool:
    """One item of a character class matches decimal digits only."""
    if op is sre.CATEGORY:
        return av is sre.CATEGORY_DIGIT
    if op is sre.LITERAL:
        return chr(av).isdecimal()
    if op is sre.RANGE:
        return all(chr(c).isdecimal() for c in range(av[0], av[1] + 1))
    return False


def letters(text: str) -> int:
    """The characters of `text` that count toward the output patterns' bound: those unsafe_output matches on
    (NFKC, lower case, no spaces, punctuation, symbols or invisible characters), less digits and combining marks
    (NFKC may fold a mark into the character before it, so a mark is never counted on)."""
    t = unicodedata.normalize("NFKC", text).lower()
    return sum(1 for c in t if unicodedata.category(c)[0] not in "PSZCM" and not c.isdecimal())


def output_hold_back(patterns=OUTPUT_PATTERNS) -> int | None:
    """How many letters (see `letters`) of model text a stream must hold back: one more than the longest match
    of any output pattern, plus 2 because NFKC can fold up to two characters right after a cut into the one
    before it (Hangul jamo). None when a pattern has no bound: then nothing may be shown before the end."""
    most = max(_letters_at_most(sre_parse.parse(p.pattern, p.flags)) for p in patterns)
    return None if math.isinf(most) else int(most) + 3


OUTPUT_HOLD_BACK = output_hold_back()


# where a sentence ends: a stream releases model text a whole sentence at a time
_SENTENCE_END = re.compile(r"[。！？!?…；;\n]+[”’\"」』）)]*|\.(?=\s)")


class OutputStream:
    """check_model_output for a reply shown while the model makes it: text is released a sentence at a time, each
    only after every layer of the output check has read the whole text up to it.

    Each piece fed is appended to the model's text and the patterns check the whole text so far (cheap, so a
    method is caught as soon as it is written). A sentence is released when (1) it is complete, (2) at least
    OUTPUT_HOLD_BACK letters follow it, and (3) the learned layer and the model tier find the whole text so far
    safe. (2) is the patterns' bound: an unsafe match has fewer letters than that, so a match that would reach
    back into released text would lie wholly inside text already checked and would have been found then; no
    released character belongs to an unsafe match, however the text goes on (sentence ends alone are no safe cut,
    since the patterns are matched with punctuation removed: 不要。去看医生 reads as 不要去看医生).

    Once the text is unsafe, `replaced` is True, the kind is counted as check_model_output counts it, and nothing
    more is released: the held-back text is never shown."""

    def __init__(
        self, guard: CrisisGuard, conversation_id: str | None = None, hold_back: int | None = OUTPUT_HOLD_BACK
    ):
        self.guard, self.conversation_id, self.hold_back = guard, conversation_id, hold_back
        self.text = ""  # the model's text so far
        self.released = 0  # how much of it has been released
        self.replaced, self.reason = False, None

    def _check(self, every_layer: bool) -> bool:
        """True when the text so far is unsafe (then counted and replaced); the patterns only unless every_layer."""
        if not every_layer and unsafe_output(self.text) is None:
            return False
        _, self.replaced, self.reason = self.guard.check_model_output(self.text, self.conversation_id)
        return self.replaced

    def _cut(self) -> int:
        """The end of the last complete sentence that at least hold_back letters follow (or what was released)."""
        if self.hold_back is None:
            return self.released
        cut, seen = len(self.text), 0
        while cut > self.released and seen < self.hold_back:
            cut -= 1
            seen += letters(self.text[cut])
        if seen < self.hold_back:
            return self.released
        while cut > self.released and letters(self.text[cut:]) < self.hold_back:  # NFKC across characters
            cut -= 1
        ends = [m.end() for m in _SENTENCE_END.finditer(self.text, self.released, cut)]
        return ends[-1] if ends else self.released

    def feed(self, piece: str) -> str:
        """Add `piece` of model text; return the text now released ('' while held back or once replaced)."""
        if self.replaced:
            return ""
        self.text += piece
        if self._check(every_layer=False):
            return ""
        cut = self._cut()
        if cut <= self.released or self._check(every_layer=True):
            return ""
        out, self.released = self.text[self.released : cut], cut
        return out

    def close(self) -> str:
        """The model is done: the held-back rest when the whole text is safe, else ''."""
        if self.replaced or self._check(every_layer=True):
            return ""
        out, self.released = self.text[self.released :], len(self.text)
        return out


def load_classifier(path: str | Path, positive_label: str | None = None, device: int | str = -1) -> Classifier:
    """A crisis classifier from a local transformers text-classification folder (never downloads): returns
    text -> probability of `positive_label` (default: the model's last label, LABEL_1 for a binary head)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"guard classifier: {folder} is not a local model folder (no config.json in it)")
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(folder), tokenizer=str(folder), top_k=None, device=device)
    labels = list(clf.model.config.id2label.values())
    label = positive_label or labels[-1]
    if label not in labels:
        raise ValueError(f"guard classifier: label '{label}' not in the model's labels {labels}")

    def score(text: str) -> float:
        out = clf(text, truncation=True)
        rows = out[0] if out and isinstance(out[0], list) else out
        return next(float(r["score"]) for r in rows if r["label"] == label)

    return score
