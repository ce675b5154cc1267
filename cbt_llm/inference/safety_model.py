"""The guard as the configuration asks for it (`build_guard`), and its optional model tier: a generative safety model
(Qwen3Guard-Gen, Llama Guard 3) read from an OpenAI-compatible endpoint or a local folder, whose verdict is parsed
into a flag and a construct or harm kind. The tier can only add flags; a failure, a timeout or a reply it cannot
parse raises, and the guard counts it (model_tier_errors_total) while the other layers' verdict stands.

What the tier flags is the guard's scope only: suicide and self-harm, and violence against others. Everything else
a safety model reports (sexual content, PII, jailbreaks, ...) is the serving platform's business, not this guard's.
A "Controversial" verdict in one of those two categories is a flag: safety first.

    tier = model_tier(ModelTierConfig(kind="endpoint", base_url="http://127.0.0.1:8001/v1", model="Qwen3Guard"))
    tier("user", text)        # -> (flagged, None | "harm_to_others")
    tier("assistant", text)   # -> (flagged, None | "encourages_self_harm" | "harm_to_others")
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

from cbt_llm.core.config import GuardConfig, ModelTierConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.guard import DEFAULT, CrisisGuard, ModelTier
from cbt_llm.domain.guard_classifier import model_path
from cbt_llm.inference.models import stop_token_ids

ROLES = ("user", "assistant")
# A verdict is two or three short lines: enough for "Safety: Unsafe", a few categories and "Refusal: No".
MAX_NEW_TOKENS = 48
# The user turn a reply is judged against (the tier sees one text at a time): neutral, so the verdict is the reply's.
PLACEHOLDER_USER_TURN = "我想聊聊最近的心情。"

# What each of the guard's two categories becomes, by the role of the text judged: a user turn's kind is a
# cbt_llm.domain.crisis.CONSTRUCTS key (None for suicide and self-harm: the tier cannot tell which construct, so the
# note to the model names the risk generally), a reply's a HARM_KINDS key.
SELF_HARM, VIOLENCE = "self_harm", "violence"
KINDS: dict[str, dict[str, str | None]] = {
    "user": {SELF_HARM: None, VIOLENCE: "harm_to_others"},
    "assistant": {SELF_HARM: "encourages_self_harm", VIOLENCE: "harm_to_others"},
}


class ModelTierError(RuntimeError):
    """The tier gave no verdict (HTTP error, timeout, a reply not in its format). Its message never holds the API
    key nor the text judged."""


# -- the replies -------------------------------------------------------------------------------------------------

# Qwen3Guard-Gen (model card, https://huggingface.co/Qwen/Qwen3Guard-Gen-4B): the first line is one of
# "Safety: Safe|Unsafe|Controversial", the second "Categories: " and a comma-separated list of Violent, Non-violent
# Illegal Acts, Sexual Content or Sexual Acts, PII, Suicide & Self-Harm, Unethical Acts, Politically Sensitive
# Topics, Copyright Violation, Jailbreak (prompts only) or None; a response verdict adds "Refusal: Yes|No".
QWEN3GUARD_CATEGORIES = frozenset(
    {
        "Violent",
        "Non-violent Illegal Acts",
        "Sexual Content or Sexual Acts",
        "PII",
        "Suicide & Self-Harm",
        "Unethical Acts",
        "Politically Sensitive Topics",
        "Copyright Violation",
        "Jailbreak",
        "None",
    }
)
QWEN3GUARD_SCOPE = {"Suicide & Self-Harm": SELF_HARM, "Violent": VIOLENCE}
_QWEN_SAFETY = re.compile(r"^\s*Safety:\s*(Safe|Unsafe|Controversial)\s*$", re.MULTILINE)
_QWEN_CATEGORIES = re.compile(r"^\s*Categories:(.*)$", re.MULTILINE)

# Llama Guard 3 (model card, https://huggingface.co/meta-llama/Llama-Guard-3-8B): the first line reads "safe" or
# "unsafe"; when unsafe, the second is a comma-separated list of hazard codes: S1 Violent Crimes, S2 Non-Violent
# Crimes, S3 Sex-Related Crimes, S4 Child Sexual Exploitation, S5 Defamation, S6 Specialized Advice, S7 Privacy,
# S8 Intellectual Property, S9 Indiscriminate Weapons, S10 Hate, S11 Suicide & Self-Harm, S12 Sexual Content,
# S13 Elections, S14 Code Interpreter Abuse.
LLAMAGUARD_SCOPE = {"S11": SELF_HARM, "S1": VIOLENCE}
_LLAMA_CODES = re.compile(r"^S\d{1,2}(\s*,\s*S\d{1,2})*$")


def _strip_thinking(reply: str) -> str:
    """The reply without an empty or filled <think>...</think> block a server may pass through."""
    return re.sub(r"<think>.*?</think>", "", reply, flags=re.DOTALL).strip()


def parse_qwen3guard(reply: str) -> set[str]:
    """The guard's categories ({SELF_HARM, VIOLENCE} or fewer) in a Qwen3Guard-Gen verdict: those of an Unsafe or
    Controversial verdict; none for Safe. ValueError when the reply is not in its format."""
    text = _strip_thinking(reply)
    severity = _QWEN_SAFETY.search(text)
    if severity is None:
        raise ValueError("qwen3guard reply has no 'Safety: Safe|Unsafe|Controversial' line")
    if severity.group(1) == "Safe":
        return set()
    line = _QWEN_CATEGORIES.search(text)
    if line is None:
        raise ValueError(f"qwen3guard reply says {severity.group(1)} with no 'Categories:' line")
    names = [n.strip().rstrip(".").strip() for n in line.group(1).split(",")]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in QWEN3GUARD_CATEGORIES]
    if not names or unknown:
        raise ValueError(f"qwen3guard reply names no known category ({len(unknown)} unknown)")
    return {QWEN3GUARD_SCOPE[n] for n in names if n in QWEN3GUARD_SCOPE}


def parse_llamaguard(reply: str) -> set[str]:
    """The guard's categories in a Llama Guard 3 verdict ("safe", or "unsafe" and a line of codes). ValueError when
    the reply is not in its format."""
    lines = [ln.strip() for ln in _strip_thinking(reply).splitlines() if ln.strip()]
    if not lines or lines[0].lower() not in ("safe", "unsafe"):
        raise ValueError("llamaguard reply does not start with 'safe' or 'unsafe'")
    if lines[0].lower() == "safe":
        return set()
    if len(lines) < 2 or not _LLAMA_CODES.match(lines[1].upper()):
        raise ValueError("llamaguard reply says unsafe with no line of category codes (S1, S11, ...)")
    codes = {c.strip() for c in lines[1].upper().split(",")}
    return {LLAMAGUARD_SCOPE[c] for c in codes if c in LLAMAGUARD_SCOPE}


PARSERS = {"qwen3guard": parse_qwen3guard, "llamaguard": parse_llamaguard}


def verdict(role: str, categories: set[str]) -> tuple[bool, str | None]:
    """(flagged, kind) for the guard: suicide and self-harm win over violence when both are named."""
    if not categories:
        return False, None
    return True, KINDS[role][SELF_HARM if SELF_HARM in categories else VIOLENCE]


def conversation(role: str, text: str) -> list[dict]:
    """The messages a safety model judges: the text as the user turn (prompt moderation), or as the assistant turn
    after a neutral user turn (response moderation: both models judge the last assistant turn)."""
    if role == "user":
        return [{"role": "user", "content": text}]
    if role == "assistant":
        return [{"role": "user", "content": PLACEHOLDER_USER_TURN}, {"role": "assistant", "content": text}]
    raise ValueError(f"model tier: role must be one of {ROLES}, got {role!r}")


# -- an OpenAI-compatible server -----------------------------------------------------------------------------------


class EndpointTier:
    """A safety model behind POST {base_url}/chat/completions (vLLM, SGLang): greedy, a few tokens, one request per
    text, `timeout_s` for each of connect, write and read. The key travels in the Authorization header only."""

    def __init__(self, tc: ModelTierConfig):
        import httpx

        if not tc.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"guard.model_tier.base_url: '{tc.base_url}' is not an http(s) URL (e.g. http://127.0.0.1:8001/v1)"
            )
        if not tc.model:
            raise ConfigError(
                "guard.model_tier.model: empty; name the model the server serves (e.g. Qwen3Guard-Gen-4B)"
            )
        headers = {}
        if tc.api_key_env:
            key = os.environ.get(tc.api_key_env, "")
            if not key:
                raise ConfigError(
                    f"guard.model_tier.api_key_env: environment variable {tc.api_key_env} is not set; export it first"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.url = tc.base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s, self.parse = tc.model, tc.timeout_s, PARSERS[tc.format]
        # one client, its connections reused; httpx clients are safe to share between the server's threads
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(tc.timeout_s), follow_redirects=False)

    def __repr__(self) -> str:  # never the headers
        return f"EndpointTier({self.url!r}, model={self.model!r})"

    def ask(self, role: str, text: str) -> str:
        """The model's raw verdict text; ModelTierError on anything else."""
        import httpx

        body = {
            "model": self.model,
            "messages": conversation(role, text),
            "temperature": 0,
            "max_tokens": MAX_NEW_TOKENS,
        }
        failure = None
        try:
            r = self._client.post(self.url, json=body)
        except httpx.TimeoutException:
            failure = f"no reply from {self.url} within {self.timeout_s:g}s"
        except httpx.HTTPError as exc:
            failure = f"{exc.__class__.__name__} from {self.url}"
        if failure is not None:  # raised outside the except block: no chained exception carries the request
            raise ModelTierError(f"model tier: {failure}")
        if r.status_code != 200:
            raise ModelTierError(f"model tier: HTTP {r.status_code} from {self.url}")  # the body may quote the key
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise ModelTierError(f"model tier: the reply from {self.url} has no choices[0].message.content")
        return content

    def __call__(self, role: str, text: str) -> tuple[bool, str | None]:
        return verdict(role, self.parse(self.ask(role, text)))

    def close(self) -> None:
        self._client.close()


# -- a local model folder ------------------------------------------------------------------------------------------


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text through the tokenizer's chat template, ending where the model's verdict starts. The guard
    models' own templates (Qwen3Guard-Gen, Llama Guard 3) open the assistant turn themselves and are called without
    add_generation_prompt in their model cards; an ordinary chat template needs it. So the flag's addition is
    used unless the plain rendering already opened that turn after the text judged."""
    plain = tokenizer.apply_chat_template(messages, tokenize=False)
    opened = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if opened == plain or not opened.startswith(plain):
        return opened  # the template ignores the flag, or renders in a way this cannot compare: as the flag says
    at = plain.rfind(opened[len(plain) :].strip())
    already = at >= 0 and messages[-1]["content"] not in plain[at:]
    return plain if already else opened


class LocalTier:
    """A safety model in this process: a local folder (never downloaded) loaded once with its tokenizer, on CUDA
    when there is one, else CPU; greedy, at most MAX_NEW_TOKENS new tokens, one text at a time (a lock: the
    server's threads share one model). Generation stops at `timeout_s` (transformers' max_time): a verdict cut
    short does not parse, and a generation that still took longer raises."""

    def __init__(self, tc: ModelTierConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(tc.model)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"guard.model_tier.model: '{tc.model}' is not a local model folder (no config.json)")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                local_files_only=True,
                dtype=torch.bfloat16 if self.device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32,
            )
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
            raise ConfigError(f"guard.model_tier.model: cannot load '{tc.model}': {first}") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"guard.model_tier.model: '{tc.model}' has no chat template")
        self.model = model.to(self.device).eval()
        self.timeout_s, self.parse, self.name = tc.timeout_s, PARSERS[tc.format], folder.name
        self._lock = threading.Lock()
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.stop_ids[0] if self.stop_ids else 0)

    def __repr__(self) -> str:
        return f"LocalTier({self.name!r}, device={self.device!r})"

    def ask(self, role: str, text: str) -> str:
        import torch
        from transformers import GenerationConfig

        prompt = render_prompt(self.tokenizer, conversation(role, text))
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(self.device)
        config = GenerationConfig(
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            num_beams=1,
            # set, or transformers fills them from the folder's generation_config.json, which may carry penalties
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            max_time=self.timeout_s,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        with self._lock, torch.inference_mode():
            start = time.monotonic()  # the time the model took, not the wait for another thread's turn
            out = self.model.generate(**ids, generation_config=config)
            took = time.monotonic() - start
        if took > self.timeout_s:
            raise ModelTierError(f"model tier: no verdict within {self.timeout_s:g}s")
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    def __call__(self, role: str, text: str) -> tuple[bool, str | None]:
        return verdict(role, self.parse(self.ask(role, text)))


# -- the configuration ---------------------------------------------------------------------------------------------


def build_guard(gc: GuardConfig, **kw) -> CrisisGuard:
    """The CrisisGuard of a guard config section: the learned layer (the shipped one, guard.model_dir's, or off) and
    the model tier when guard.model_tier.kind is set; `kw` go to CrisisGuard (e.g. salt)."""
    if not gc.learned:
        user, reply = None, None
    elif gc.model_dir:
        user, reply = model_path("user", gc.model_dir), model_path("reply", gc.model_dir)
        for p in (user, reply):
            if not Path(p).is_file():
                raise ConfigError(f"guard.model_dir: {p} not found; write it with `cbt-llm guard train --out DIR`")
    else:
        user, reply = DEFAULT, DEFAULT
    return CrisisGuard(
        user_model=user, reply_model=reply, model_tier=model_tier(gc.model_tier), corroborate=gc.corroborate, **kw
    )


def model_tier(tc: ModelTierConfig) -> ModelTier | None:
    """The model tier guard.model_tier describes (an EndpointTier or a LocalTier, loaded here, once), or None when
    kind is none. A bad URL, folder or missing key environment variable is a ConfigError now, not a counted
    failure on every turn later."""
    if tc.kind == "none":
        return None
    if tc.kind == "endpoint":
        return EndpointTier(tc)
    if tc.kind == "local":
        return LocalTier(tc)
    raise ConfigError(f"guard.model_tier.kind: '{tc.kind}' is not one of none, endpoint, local")
