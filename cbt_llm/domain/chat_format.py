"""The chat format the project trains and serves in: ChatML, the template family of Qwen2.5, with its special
tokens, the user turn a question becomes, the one-string rendering prepare uses for speed, and where the answers
sit in a rendered conversation (what training learns and eval scores).

Real runs use the base model's own tokenizer and template; the demo's tokenizer carries CHAT_TEMPLATE, so prompt
masking behaves the same way on the demo and on real models.
"""

from __future__ import annotations

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

# ChatML. The assistant turn ends with <|im_end|>, which is the token the model learns to stop on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_user_message(question: str, description: str = "") -> str:
    """The user turn: the question, then the asker's description when there is one."""
    question = question.strip()
    description = (description or "").strip()
    if description and description != question:
        return f"{question}\n{description}"
    return question


def render_chatml(messages: list[dict[str, str]]) -> str:
    """Our ChatML template (CHAT_TEMPLATE, no generation prompt) as one string join: the
    same text as apply_chat_template(messages, tokenize=False) with that template (a test checks it on awkward
    contents), without jinja's ~100 us per conversation."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def chat_renderer(tok):
    """messages -> the text the model sees: render_chatml when the tokenizer carries our template verbatim,
    its own jinja template otherwise (a base model's, e.g. Qwen's, which this module does not restate)."""
    if getattr(tok, "chat_template", None) == CHAT_TEMPLATE:
        return render_chatml
    return lambda messages: tok.apply_chat_template(messages, tokenize=False)


def label_spans(
    text: str, messages: list[dict[str, str]], end_token: str, learn_from: int = 0
) -> list[tuple[int, int]]:
    """Character spans of the learned text in a rendered conversation: each assistant answer from message
    `learn_from` on (a split piece's earlier turns are context) plus the end token right after it. Messages are
    located in order, so text repeated in an earlier turn is skipped. Prepare masks labels by these spans and eval
    scores an answer's log-probability over them, so both read the same tokens."""
    spans = []
    cursor = 0
    for k, m in enumerate(messages):
        pos = text.find(m["content"], cursor)
        if pos < 0:
            raise ValueError(f"chat template changed a {m['role']} message; cannot locate it in the rendered text")
        end = pos + len(m["content"])
        cursor = end
        if m["role"] == "assistant" and k >= learn_from:
            if end_token and text.startswith(end_token, end):
                end += len(end_token)
                cursor = end
            spans.append((pos, end))
    return spans
