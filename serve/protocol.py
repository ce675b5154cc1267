"""The wire format of the OpenAI-compatible API as typed pydantic models: what a client may send to
/v1/chat/completions, and what it gets back (a completion, stream chunks, the models list, an error).

Requests are checked here and nowhere else. What a request may carry, as OpenAI's chat completions define it:

    acted on    `messages` (system, developer, user and assistant turns, the last one a user turn; `developer` is
                a system turn, as OpenAI's newer clients send it; content a string or a list of parts, whose text
                parts the model reads), `max_tokens` or its newer name `max_completion_tokens` (left out: what the
                model's context has left after the prompt, at most the server's limit: serve/context.py),
                `temperature`, `top_p`, `seed`, `stop`, `n` (1 to MAX_N choices, each through the guard's output
                check; sampled choices are generated one by one, with seed + i for choice i when a seed is given;
                with temperature 0 every choice is the one greedy reply, as greedy decoding gives no other),
                `stream` with `stream_options.include_usage`, and `user` (the guard counts conversations by a
                salted hash of it)
    IGNORED     accepted with any value and ignored, as they ask for nothing a server of one model without storage
                does differently: `model`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`,
                `prompt_cache_key`, `safety_identifier`, `reasoning_effort`, `verbosity`
    NEUTRAL     accepted at the value that asks for nothing (null, or the value in parentheses) and a 400 naming the
                field otherwise, since this server cannot do what they ask: `logprobs` (false), `top_logprobs` (0),
                `logit_bias` ({}), `response_format` ({"type": "text"}), `tools` ([]), `tool_choice` ("none" or
                "auto": without tools both mean plain text), `functions` ([]), `function_call` ("none", "auto"),
                `frequency_penalty` and `presence_penalty` (0), `modalities` (["text"]), `audio`, `prediction`,
                `web_search_options`
Fields OpenAI does not define (another server's extensions, e.g. vLLM's `top_k`) are ignored, as vLLM ignores what
it does not know.

A request that breaks a rule gets a 400 in OpenAI's error shape, {"error": {"message", "type", "param", "code"}},
which the official clients raise as BadRequestError. Pydantic reports every broken rule in its own words; a client
gets one line naming the first broken field, in the order the fields are declared below (so `messages` first), in
this server's words, with that field as `param`. A number outside its range says the range and what it got.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cbt_llm.domain.guard import message_text

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # stop strings a request may give, as OpenAI allows
MAX_N = 16  # choices a request may ask for
IGNORED = ("model", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier",
           "reasoning_effort", "verbosity")  # fmt: skip
INVALID = "invalid_request"  # the pydantic error type of a rule checked here, whose message is already the reply's


class APIError(Exception):
    """A request answered with an error in OpenAI's shape: HTTP `status`, a one-line `message`, the field it is
    about (`param`), the error's `kind` (OpenAI's "type") and `code`; `headers` go with the response."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        *,
        status: int = 400,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status
        self.kind, self.code, self.headers = kind, code, headers

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=self.kind, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()


# -- the request --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What the server allows a request: the largest `max_tokens`, and what a request that names none gets when
    the model's context is unknown (never more than the largest; with a known context it gets what fits)."""

    max_tokens: int
    default_max_tokens: int


def _invalid(message: str, param: str) -> PydanticCustomError:
    return PydanticCustomError(INVALID, "{message}", {"message": message, "param": param})


def _checked_number(value, name: str, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    """`value` when it is a number (an integer with `integer`; true and false are not numbers) in [lo, hi], or
    (lo, hi] with `lo_open`; None when it is null."""
    if value is None:
        return None
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise _invalid(f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise _invalid(f"'{name}' must be in {left}{lo}, {hi}], got {value}", name)
    return value


def _number(default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False) -> PlainValidator:
    """A number field in a fixed range; null means `default`. The value is kept as sent (an integer temperature
    stays an integer)."""

    def check(value, info: ValidationInfo):
        checked = _checked_number(value, info.field_name, lo, hi, integer=integer, lo_open=lo_open)
        return default if checked is None else checked

    return PlainValidator(check)


def _max_tokens(value, info: ValidationInfo) -> int | None:
    """An integer up to the server's limit (the validation context's Limits); absent or null: None (what fits)."""
    limits: Limits = info.context
    return _checked_number(value, info.field_name, 1, limits.max_tokens, integer=True)


def _neutral(accepts, what: str) -> PlainValidator:
    """An OpenAI field this server does not act on: null, or a value `accepts` (the one that asks for nothing), is
    None; anything else is a 400 naming it."""

    def check(value, info: ValidationInfo):
        if value is None or accepts(value):
            return None
        name = info.field_name
        raise _invalid(f"'{name}' is not supported here ({what}); leave it out", name)

    return PlainValidator(check)


def _zero(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v == 0


def _plain_choice(v) -> bool:
    return v in ("none", "auto")


def _never(v) -> bool:
    return False


def _stop_list(value):
    """A single stop string is a list of one; null is none."""
    if isinstance(value, str):
        return [value]
    return [] if value is None else value


def _text_part(part: dict) -> dict:
    if part.get("type") == "text" and not isinstance(part.get("text", ""), str):
        raise ValueError("a text part's text must be a string")
    return part


# One part of a list content: any object; a text part's text must be a string (other parts pass through unread,
# as cbt_llm.domain.guard.message_text reads the text parts only).
ContentPart = Annotated[dict[str, Any], AfterValidator(_text_part)]


class ChatMessage(BaseModel):
    """One turn of the conversation. Fields beyond role and content (e.g. `name`) are kept and passed on."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: Annotated[bool, PlainValidator(bool)] = False  # any value, read as true or false


class ChatCompletionRequest(BaseModel):
    """A /v1/chat/completions request, checked. Validate it with parse_chat_request, which gives the Limits
    that `max_tokens` needs and answers a broken rule with an APIError. Fields are checked in this order; fields
    not declared here (IGNORED, and any other) are ignored."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int | None, PlainValidator(_max_tokens)] = None
    max_completion_tokens: Annotated[int | None, PlainValidator(_max_tokens)] = None
    stop: Annotated[list[str], BeforeValidator(_stop_list), Field(max_length=MAX_STOP)] = Field(default_factory=list)
    n: Annotated[int, _number(1, 1, MAX_N, integer=True)] = 1
    stream: StrictBool = False
    temperature: Annotated[float, _number(0.0, 0.0, 2.0)] = 0.0  # 0: greedy
    top_p: Annotated[float, _number(1.0, 0.0, 1.0, lo_open=True)] = 1.0
    seed: Annotated[int | None, _number(None, -(2**63), 2**63 - 1, integer=True)] = None
    stream_options: Annotated[StreamOptions | None, BeforeValidator(lambda v: v or None)] = None
    # the guard counts conversations by a salted hash of this; anything but a string is ignored
    user: Annotated[str | None, PlainValidator(lambda v: v if isinstance(v, str) else None)] = None
    # NEUTRAL: OpenAI's fields this server cannot act on, accepted when they ask for nothing
    logprobs: Annotated[None, _neutral(lambda v: v is False, "no log probabilities are returned")] = None
    top_logprobs: Annotated[None, _neutral(_zero, "no log probabilities are returned")] = None
    logit_bias: Annotated[None, _neutral(lambda v: v == {}, "no logit bias")] = None
    response_format: Annotated[
        None, _neutral(lambda v: isinstance(v, dict) and v.get("type") == "text", "replies are plain text")
    ] = None
    tools: Annotated[None, _neutral(lambda v: v == [], "no tools")] = None
    tool_choice: Annotated[None, _neutral(_plain_choice, "no tools")] = None
    functions: Annotated[None, _neutral(lambda v: v == [], "no functions")] = None
    function_call: Annotated[None, _neutral(_plain_choice, "no functions")] = None
    frequency_penalty: Annotated[None, _neutral(_zero, "no penalties")] = None
    presence_penalty: Annotated[None, _neutral(_zero, "no penalties")] = None
    modalities: Annotated[None, _neutral(lambda v: v == ["text"], "replies are text only")] = None
    audio: Annotated[None, _neutral(_never, "replies are text only")] = None
    prediction: Annotated[None, _neutral(_never, "no predicted outputs")] = None
    web_search_options: Annotated[None, _neutral(_never, "no web search")] = None

    @field_validator("messages")
    @classmethod
    def _ends_with_a_user_turn(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user":
            raise _invalid("the last message must be a user turn", "messages")
        return messages

    @model_validator(mode="after")
    def _one_reply_length(self) -> ChatCompletionRequest:
        both = (self.max_tokens, self.max_completion_tokens)
        if None not in both and both[0] != both[1]:
            raise _invalid("give max_completion_tokens or max_tokens (its older name), not both", "max_tokens")
        return self

    @property
    def reply_tokens(self) -> int | None:
        """The reply length asked for (max_completion_tokens or max_tokens); None: what fits."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def reply_tokens_field(self) -> str:
        """The name the request gave its reply length by, for an error about it."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
        return self.stream_options is not None and self.stream_options.include_usage

    def message_dicts(self) -> list[dict]:
        """The messages as the guard and the engines take them: plain dicts, extra fields included, a developer
        turn as a system turn, and the system turns the conversation starts with joined into one (the guard adds
        its note to the first, and the model was trained with one)."""
        out: list[dict] = []
        for m in self.messages:
            d = m.model_dump()
            if d["role"] == "developer":
                d["role"] = "system"
            if d["role"] == "system" and out and len(out) == sum(x["role"] == "system" for x in out):
                first = out[0]
                out[0] = {**first, "content": f"{message_text(first)}\n\n{message_text(d)}".strip()}
                continue
            out.append(d)
        return out


# Pydantic's own errors, in this server's words, by field (the numbers' and n's messages are raised as they are).
_FIELD_MESSAGES = {
    "stop": f"'stop' must be a string or a list of at most {MAX_STOP} strings",
    "stream": "'stream' must be true or false",
    "stream_options": "'stream_options' must be an object",
}


def parse_chat_request(body: object, limits: Limits) -> ChatCompletionRequest:
    """The request in `body` (the parsed JSON), checked; an APIError (400) naming the first broken field otherwise."""
    try:
        return ChatCompletionRequest.model_validate(body, context=limits)
    except ValidationError as exc:
        raise _request_error(exc.errors(include_url=False)[0], body) from None


def _request_error(err: dict, body) -> APIError:
    """One pydantic error as the one-line 400 a client gets."""
    if err["type"] == INVALID:
        return APIError(err["msg"], err["ctx"]["param"])
    loc = err["loc"]
    if not loc:
        return APIError("the request body must be a JSON object")
    field = loc[0]
    if field != "messages":
        return APIError(_FIELD_MESSAGES.get(field, f"'{field}': {err['msg']}"), str(field))
    if len(loc) == 1:
        return APIError("'messages' must be a non-empty list of {role, content} objects", "messages")
    i = loc[1]
    if len(loc) == 2 or loc[2] == "role":  # the message is no object, or its role is missing or not one of ROLES
        message = body["messages"][i]
        role = message.get("role") if isinstance(message, dict) else None
        return APIError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
    return APIError(f"messages[{i}].content must be a string or a list of text parts", "messages")


# -- the replies --------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str  # "stop" or "length"


class ChatCompletion(BaseModel):
    """The reply to a request without `stream`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """What a chunk adds to the reply; a field left out is not sent (the last chunk's delta is {})."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _set_fields_only(self) -> dict:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None  # sent as null until the last chunk with a choice


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed reply; `usage` only on the last one, which has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def sse(self) -> str:
        """The chunk as a server-sent event: `data: <json>` and a blank line (usage left out when there is none)."""
        data = self.model_dump(exclude={"usage"} if self.usage is None else None)
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"  # the event that ends every stream


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "cbt-llm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorDetail
