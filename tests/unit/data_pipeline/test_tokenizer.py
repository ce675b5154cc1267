"""Tokenizer: trains from the corpus, round-trips Chinese text, carries the chat template, hashes by content."""

import json

import pytest

from cbt_llm.core.config import TokenizerConfig
from cbt_llm.domain.chat_format import IM_END, build_user_message
from cbt_llm.inference.tokenizer import load_tokenizer, tokenizer_hash
from data_pipeline.tokenizer import train_tokenizer, train_tokenizer_from_texts

TEXTS = [
    "我最近总是失眠,晚上躺在床上脑子停不下来,觉得自己什么都做不好。",
    "考试快到了,我很焦虑,担心一次考不好人生就完了。",
    "同事没回我消息,我觉得他一定讨厌我。",
    "你的感受是可以理解的,很多人在压力下都会这样。",
] * 50


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as fh:
        for i, t in enumerate(TEXTS):
            fh.write(
                json.dumps({"question": t, "description": t[::-1], "answer": TEXTS[(i + 1) % 4]}, ensure_ascii=False)
                + "\n"
            )
        fh.write("{not json\n")
    summary = train_tokenizer(TokenizerConfig(input=str(corpus), vocab_size=600, out_dir=str(d / "tok")))
    assert summary["records"] == len(TEXTS)
    assert summary["bad_lines"] == 1
    return d / "tok"


@pytest.mark.parametrize(
    "text",
    [
        "我最近总是失眠,觉得自己什么都做不好。",
        "“全国心理援助热线”400-161-9995……你并不孤单!😊\n第二行\t制表符",
        "Mixed 中英文 text with  double  spaces",
    ],
)
def test_round_trip_chinese(tok_dir, text):
    tok = load_tokenizer(str(tok_dir))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_bpe_learns_chinese_merges(tok_dir):
    tok = load_tokenizer(str(tok_dir))
    text = "考试快到了,我很焦虑"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n < len(text.encode("utf-8")) / 2  # merges learned: far fewer tokens than raw bytes


def test_chat_template_and_specials(tok_dir):
    tok = load_tokenizer(str(tok_dir))
    msgs = [
        {"role": "system", "content": "你是一名心理咨询师"},
        {"role": "user", "content": build_user_message("我睡不着", "每天凌晨三点醒")},
        {"role": "assistant", "content": "我理解你的辛苦。"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\n你是一名心理咨询师<|im_end|>\n<|im_start|>user\n我睡不着\n每天凌晨三点醒<|im_end|>\n"
        "<|im_start|>assistant\n我理解你的辛苦。<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IM_END)) == 3  # specials stay single tokens
    assert tok.eos_token == IM_END and tok.pad_token_id is not None


def test_hash_is_content_based(tok_dir, tmp_path):
    a = load_tokenizer(str(tok_dir))
    b = load_tokenizer(str(tok_dir))
    assert tokenizer_hash(a) == tokenizer_hash(b)
    other = train_tokenizer_from_texts(TEXTS[:40], 400, tmp_path / "other")
    assert tokenizer_hash(load_tokenizer(str(other))) != tokenizer_hash(a)


def test_missing_tokenizer_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer train"):
        load_tokenizer(str(tmp_path / "nope"))


@pytest.mark.parametrize(
    "name, local",
    [
        ("Qwen/Qwen2.5-7B-Instruct", False),
        ("baichuan-inc/Baichuan2-7B-Chat", False),
        ("runs/demo/tokenizer", True),
        ("runs/tok", True),
        ("./tok", True),
        ("/abs/tok", True),
        ("tok", True),
    ],
)
def test_is_local_path_tells_folders_from_hub_ids(name, local):
    """The one test of "is this a local path" (load_tokenizer and launch preflight both use it)."""
    from cbt_llm.core.fileio import is_local_path

    assert is_local_path(name) is local


def test_build_user_message():
    assert build_user_message("问题", "") == "问题"
    assert build_user_message("问题", "问题") == "问题"
    assert build_user_message(" 问题 ", "描述") == "问题\n描述"


def test_a_model_folder_gives_the_ids_the_model_was_trained_on(tok_dir, tmp_path):
    """Beside a qwen2 config.json, transformers rebuilds our byte-level BPE as a Qwen2Tokenizer that splits every
    digit; load_tokenizer keeps tokenizer.json's pipeline, so an exported model reads "12356" as training did."""
    from transformers import AutoTokenizer

    from tests.fixtures.tiny import write_tiny_qwen2

    model_dir = write_tiny_qwen2(tmp_path / "model", tok_dir)
    text = "拨打心理援助热线 12356、010-82951332,第 3 次"
    trained = load_tokenizer(str(tok_dir))
    exported = load_tokenizer(str(model_dir))
    assert exported(text, add_special_tokens=False)["input_ids"] == trained(text, add_special_tokens=False)["input_ids"]
    assert tokenizer_hash(exported) == tokenizer_hash(trained)
    rebuilt = AutoTokenizer.from_pretrained(model_dir)  # a plain AutoTokenizer load: another pre-tokenizer
    assert type(rebuilt).__name__ == "Qwen2Tokenizer"
    pre = [json.loads(t.backend_tokenizer.to_str())["pre_tokenizer"] for t in (rebuilt, trained)]
    assert pre[0] != pre[1]
