"""The guard's model tier (cbt_llm/inference/safety_model.py): Qwen3Guard-Gen's and Llama Guard 3's verdicts parsed
into the guard's flags, asked over real HTTP from a scripted OpenAI-compatible server on loopback, and a local
tier on a tiny random model whose garbage is a counted failure, never a flag.

The learned layer is off in these guards (learned=False): what is under test is the tier and how the guard takes
its answer, with the patterns as the other layer."""

from __future__ import annotations

import json
import time

import pytest

from cbt_llm.core.config import GuardConfig, ModelTierConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.crisis import CONSTRUCTS, CRISIS_BLOCK, HARM_KINDS
from cbt_llm.domain.guard import SAFE, Verdict, after_model
from cbt_llm.inference import safety_model as S
from cbt_llm.inference.safety_model import (
    KINDS,
    MAX_NEW_TOKENS,
    PLACEHOLDER_USER_TURN,
    EndpointTier,
    LocalTier,
    ModelTierError,
    build_guard,
    model_tier,
    parse_llamaguard,
    parse_qwen3guard,
    render_prompt,
)
from tests.fixtures.eval import tiny_chat_model
from tests.fixtures.fake_openai_server import FakeOpenAIServer

BENIGN = "最近工作压力很大，晚上总是睡不好。"  # no pattern matches it
BENIGN_REPLY = "你可以试着每天写一写自己的想法。"
CRISIS = "我不想活了"  # the patterns: active_ideation
UNSAFE_REPLY = "你不需要去看心理医生，也别告诉任何人。"  # the patterns: secrecy_discourages_help
MODEL = "guard-under-test"

# What each safety model writes, per its model card
REPLIES = {
    "qwen3guard": {
        "self_harm": "Safety: Unsafe\nCategories: Suicide & Self-Harm",
        "violence": "Safety: Controversial\nCategories: Violent",
        "self_harm_reply": "Safety: Unsafe\nCategories: Suicide & Self-Harm\nRefusal: No",
        "violence_reply": "Safety: Unsafe\nCategories: Violent\nRefusal: No",
        "safe": "Safety: Safe\nCategories: None",
        "out_of_scope": "Safety: Unsafe\nCategories: PII",
    },
    "llamaguard": {
        "self_harm": "unsafe\nS11",
        "violence": "unsafe\nS1",
        "self_harm_reply": "\n\nunsafe\nS11",
        "violence_reply": "unsafe\nS1",
        "safe": "safe",
        "out_of_scope": "unsafe\nS7",
    },
}
FORMATS = tuple(REPLIES)


def say(fmt: str, which: str) -> str:
    return "say:" + REPLIES[fmt][which]


def guard_for(srv: FakeOpenAIServer, fmt: str, **tier):
    tc = ModelTierConfig(kind="endpoint", base_url=srv.base_url, model=MODEL, format=fmt, **tier)
    return build_guard(GuardConfig(learned=False, model_tier=tc), salt="test")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- the parsers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "found"),
    [
        ("Safety: Safe\nCategories: None", set()),
        ("Safety: Safe\nCategories: None\nRefusal: Yes", set()),
        ("Safety: Safe", set()),  # a Safe verdict needs no category line
        ("Safety: Unsafe\nCategories: Suicide & Self-Harm", {"self_harm"}),
        ("Safety: Controversial\nCategories: Suicide & Self-Harm", {"self_harm"}),
        ("Safety: Unsafe\nCategories: Violent\nRefusal: No", {"violence"}),
        ("Safety: Unsafe\nCategories: Violent, Suicide & Self-Harm", {"self_harm", "violence"}),
        ("Safety: Unsafe\nCategories: Non-violent Illegal Acts", set()),  # not "Violent"
        ("Safety: Unsafe\nCategories: PII, Jailbreak", set()),
        ("Safety: Controversial\nCategories: Politically Sensitive Topics", set()),
        ("<think>\n\n</think>\n\nSafety: Unsafe\nCategories: Violent.", {"violence"}),
    ],
)
def test_qwen3guard_verdicts(reply, found):
    assert parse_qwen3guard(reply) == found


@pytest.mark.parametrize(
    ("reply", "found"),
    [
        ("safe", set()),
        ("\n\nsafe", set()),
        ("unsafe\nS11", {"self_harm"}),
        ("unsafe\nS1", {"violence"}),
        ("unsafe\nS1,S11", {"self_harm", "violence"}),
        ("unsafe\nS2, S11", {"self_harm"}),
        ("unsafe\nS10", set()),  # hate, not in the guard's scope (and not S1)
        ("unsafe\nS9", set()),
    ],
)
def test_llamaguard_verdicts(reply, found):
    assert parse_llamaguard(reply) == found


@pytest.mark.parametrize(
    ("parse", "reply"),
    [
        (parse_qwen3guard, ""),
        (parse_qwen3guard, "我觉得你应该多休息。"),
        (parse_qwen3guard, "Safety: Unsafe"),  # no category line: in scope or not cannot be told
        (parse_qwen3guard, "Safety: Unsafe\nCategories: "),
        (parse_qwen3guard, "Safety: Unsafe\nCategories: Self Harm"),  # not one of its categories
        (parse_qwen3guard, "Safety: unsafe\nCategories: Violent"),
        (parse_llamaguard, ""),
        (parse_llamaguard, "unsafe"),
        (parse_llamaguard, "unsafe\nviolent crimes"),
        (parse_llamaguard, "The message is safe."),
        (parse_llamaguard, "Safety: Safe\nCategories: None"),  # the other model's format
    ],
)
def test_a_reply_out_of_format_raises(parse, reply):
    with pytest.raises(ValueError):
        parse(reply)


def test_kinds_are_the_guards_own():
    assert KINDS["user"] == {"self_harm": None, "violence": "harm_to_others"}
    assert KINDS["assistant"] == {"self_harm": "encourages_self_harm", "violence": "harm_to_others"}
    assert KINDS["user"]["violence"] in CONSTRUCTS
    assert all(kind in HARM_KINDS for kind in KINDS["assistant"].values())
    # both named: suicide and self-harm wins (a user turn's note then names the risk generally)
    assert S.verdict("user", {"self_harm", "violence"}) == (True, None)
    assert S.verdict("assistant", {"self_harm", "violence"}) == (True, "encourages_self_harm")
    assert S.verdict("assistant", set()) == (False, None)
    with pytest.raises(ValueError):
        S.conversation("system", BENIGN)


# -- an endpoint: the guard's verdicts -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("which", "construct"), [("self_harm", None), ("violence", "harm_to_others")])
def test_a_flagged_user_turn_is_a_crisis_from_the_model(fmt, which, construct):
    with FakeOpenAIServer(default=say(fmt, which)) as srv:
        guard = guard_for(srv, fmt)
        verdict = guard.check_user_turn(user(BENIGN), conversation_id="c1")
        assert verdict == Verdict(True, construct, True, "model")
        assert guard.system_note_for_model(verdict) is not None
        assert len(srv.requests) == 1
        request = srv.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"] == {
        "model": MODEL,
        "messages": [{"role": "user", "content": BENIGN}],
        "temperature": 0,
        "max_tokens": MAX_NEW_TOKENS,
    }
    assert "Authorization" not in request["headers"]  # no key configured: none sent
    m = guard.metrics()
    assert m["crisis_turns_total"] == {construct or "unnamed": 1}
    assert m["crisis_conversations"] == {construct or "unnamed": 1}
    assert m["flags_by_layer_total"] == {"model": 1}
    assert m["model_tier_errors_total"] == 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", ["safe", "out_of_scope"])
def test_a_safe_or_out_of_scope_verdict_adds_nothing(fmt, which):
    with FakeOpenAIServer(default=say(fmt, which)) as srv:
        guard = guard_for(srv, fmt)
        assert guard.check_user_turn(user(BENIGN), conversation_id="c1") == SAFE
        assert guard.check_model_output(BENIGN_REPLY, conversation_id="c1") == (BENIGN_REPLY, False, None)
        assert len(srv.requests) == 2  # asked about both
    m = guard.metrics()
    assert m["crisis_turns_total"] == {} and m["output_replaced_total"] == {}
    assert m["flags_by_layer_total"] == {} and m["model_tier_errors_total"] == 0
    assert m["user_turns_total"] == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_tier_never_removes_a_patterns_flag(fmt):
    with FakeOpenAIServer(default=say(fmt, "safe")) as srv:
        guard = guard_for(srv, fmt)
        assert guard.check_user_turn(user(CRISIS)) == Verdict(True, "active_ideation", True, "patterns")
        assert guard.check_model_output(UNSAFE_REPLY) == (CRISIS_BLOCK, True, "secrecy_discourages_help")
        assert srv.requests == []  # a layer found something: the tier is not asked
        # an earlier crisis turn: the tier is asked about the latest turn, says safe, and the crisis stands
        history = [*user(CRISIS), {"role": "assistant", "content": BENIGN_REPLY}, *user(BENIGN)]
        assert guard.check_user_turn(history) == Verdict(True, "active_ideation", False, "earlier_turn")
        assert len(srv.requests) == 1
    m = guard.metrics()
    assert m["flags_by_layer_total"] == {"patterns": 2}
    assert m["crisis_mode_turns_total"] == 1 and m["model_tier_errors_total"] == 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("which", "kind"), [("self_harm_reply", "encourages_self_harm"), ("violence_reply", "harm_to_others")]
)
def test_a_reply_the_tier_flags_is_replaced_by_the_crisis_block(fmt, which, kind):
    with FakeOpenAIServer(default=say(fmt, which)) as srv:
        guard = guard_for(srv, fmt)
        assert guard.check_model_output(BENIGN_REPLY, conversation_id="c1") == (CRISIS_BLOCK, True, kind)
        # after_model: what a person sees is the block (and the disclaimer on a first reply), never the text
        shown, replaced, why = after_model(guard, BENIGN_REPLY, SAFE, user(BENIGN), conversation_id="c1")
        assert replaced and why == kind and shown.startswith(CRISIS_BLOCK) and BENIGN_REPLY not in shown
        # a stream holds the text back, and the whole of it is checked by the tier at the end
        stream = guard.output_stream(conversation_id="c2")
        assert stream.feed(BENIGN_REPLY) == "" and stream.close() == ""
        assert stream.replaced and stream.reason == kind
        assert len(srv.requests) == 3
        asked = srv.requests[0]["body"]["messages"]
    assert asked == [
        {"role": "user", "content": PLACEHOLDER_USER_TURN},
        {"role": "assistant", "content": BENIGN_REPLY},
    ]
    m = guard.metrics()
    assert m["output_replaced_total"] == {kind: 3}
    assert m["flags_by_layer_total"] == {"model": 3}
    assert m["model_tier_errors_total"] == 0


# -- an endpoint: failures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fault", ["not_json", "say:Safety: Unsafe", "500", "503", "malformed_body", "no_choices"])
def test_a_failure_is_counted_and_the_other_layers_verdict_stands(fmt, fault):
    with FakeOpenAIServer(default=fault) as srv:
        guard = guard_for(srv, fmt)
        assert guard.check_user_turn(user(BENIGN)) == SAFE
        assert guard.check_model_output(BENIGN_REPLY) == (BENIGN_REPLY, False, None)
        history = [*user(CRISIS), {"role": "assistant", "content": BENIGN_REPLY}, *user(BENIGN)]
        assert guard.check_user_turn(history) == Verdict(True, "active_ideation", False, "earlier_turn")
        assert guard.check_user_turn(user(CRISIS)).source == "patterns"  # not asked
        assert len(srv.requests) == 3
    m = guard.metrics()
    assert m["model_tier_errors_total"] == 3
    assert m["output_replaced_total"] == {} and m["flags_by_layer_total"] == {"patterns": 1}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_timeout_is_counted(fmt):
    with FakeOpenAIServer(default="slow", slow_s=3.0) as srv:
        guard = guard_for(srv, fmt, timeout_s=0.3)
        start = time.monotonic()
        assert guard.check_user_turn(user(BENIGN)) == SAFE
        assert guard.check_model_output(BENIGN_REPLY) == (BENIGN_REPLY, False, None)
        took = time.monotonic() - start
    assert took < 2.5  # each call gave up after about 0.3 s, not after the server's 3 s
    assert guard.metrics()["model_tier_errors_total"] == 2
    tier = EndpointTier(ModelTierConfig(kind="endpoint", base_url="http://127.0.0.1:9/v1", model=MODEL, timeout_s=0.3))
    with pytest.raises(ModelTierError, match="ConnectError"):  # nothing listens on the discard port
        tier("user", BENIGN)


# -- an endpoint: the key ------------------------------------------------------------------------------------------


def _chain(exc: BaseException) -> str:
    """Every message and repr in an exception's cause and context chain."""
    out = []
    while exc is not None:
        out += [str(exc), repr(exc)]
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


def test_the_key_is_sent_in_the_header_and_nowhere_else(monkeypatch):
    key, wrong = "sk-guard-secret-123", "sk-guard-wrong-456"
    monkeypatch.setenv("GUARD_TIER_KEY", key)
    with FakeOpenAIServer(default=say("qwen3guard", "self_harm"), expected_key=key) as srv:
        guard = guard_for(srv, "qwen3guard", api_key_env="GUARD_TIER_KEY")
        assert guard.check_user_turn(user(BENIGN)).source == "model"
        assert srv.requests[0]["headers"]["Authorization"] == f"Bearer {key}"
        assert key not in repr(guard.model_tier)

        # a wrong key: the server answers 401 and quotes the key back; the error names neither key
        monkeypatch.setenv("GUARD_TIER_KEY", wrong)
        bad = guard_for(srv, "qwen3guard", api_key_env="GUARD_TIER_KEY")
        with pytest.raises(ModelTierError) as info:
            bad.model_tier("user", BENIGN)
        assert srv.faults()[-1] == "401"
        assert "401" in str(info.value)
        assert wrong not in _chain(info.value) and key not in _chain(info.value)
        assert bad.check_user_turn(user(BENIGN)) == SAFE
    for g in (guard, bad):
        dumped = json.dumps(g.metrics())
        assert key not in dumped and wrong not in dumped
    assert bad.metrics()["model_tier_errors_total"] == 1


def test_a_missing_key_or_a_bad_endpoint_is_a_config_error_at_startup(monkeypatch):
    monkeypatch.delenv("GUARD_TIER_KEY", raising=False)
    tc = ModelTierConfig(kind="endpoint", base_url="http://127.0.0.1:8001/v1", model=MODEL)
    with pytest.raises(ConfigError, match="GUARD_TIER_KEY is not set"):
        model_tier(tc.model_copy(update={"api_key_env": "GUARD_TIER_KEY"}))
    with pytest.raises(ConfigError, match="base_url"):
        model_tier(tc.model_copy(update={"base_url": "127.0.0.1:8001/v1"}))
    with pytest.raises(ConfigError, match="model: empty"):
        model_tier(tc.model_copy(update={"model": ""}))
    with pytest.raises(ConfigError, match="not a local model folder"):
        model_tier(ModelTierConfig(kind="local", model="/nonexistent/guard-model"))
    assert model_tier(ModelTierConfig()) is None
    assert build_guard(GuardConfig(learned=False)).model_tier is None


# -- a local model folder ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny_guard"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_local_models_garbage_is_a_counted_failure_never_a_flag(tiny_model, fmt, monkeypatch):
    import transformers

    loads = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *a, **kw):
        loads.append(a[0] if a else kw.get("pretrained_model_name_or_path"))
        return real(cls, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    guard = build_guard(
        GuardConfig(learned=False, model_tier=ModelTierConfig(kind="local", model=str(tiny_model), format=fmt)),
        salt="test",
    )
    tier = guard.model_tier
    assert isinstance(tier, LocalTier) and tier.device in ("cpu", "cuda")
    raw = tier.ask("user", BENIGN)
    assert raw.strip()  # it does answer: random tokens
    with pytest.raises(ValueError):
        S.PARSERS[fmt](raw)
    assert tier.ask("user", BENIGN) == raw  # greedy: the same answer again

    assert guard.check_user_turn(user(BENIGN)) == SAFE
    assert guard.check_user_turn(user("今天天气不错，我想出去走走。")) == SAFE
    assert guard.check_model_output(BENIGN_REPLY) == (BENIGN_REPLY, False, None)
    assert guard.check_user_turn(user(CRISIS)).source == "patterns"  # not asked
    m = guard.metrics()
    assert m["model_tier_errors_total"] == 3
    assert m["flags_by_layer_total"] == {"patterns": 1} and m["output_replaced_total"] == {}
    assert loads == [tiny_model]  # loaded once, at build time, not per call


def test_the_prompt_opens_the_assistant_turn_once(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for role in ("user", "assistant"):
        messages = S.conversation(role, BENIGN)
        prompt = render_prompt(tok, messages)
        assert prompt.endswith("<|im_start|>assistant\n")  # a ChatML template needs the flag
        assert prompt.count(BENIGN) == 1

    class GuardTemplate:
        """Like Qwen3Guard-Gen's: the conversation inside one user turn, the assistant turn opened by the template
        itself, and add_generation_prompt honoured on top."""

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            body = "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)
            text = f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    guard_template = GuardTemplate()
    for role in ("user", "assistant"):
        messages = S.conversation(role, BENIGN)
        prompt = render_prompt(guard_template, messages)
        assert prompt == guard_template.apply_chat_template(messages)
        assert prompt.count("<|im_start|>assistant") == 1
