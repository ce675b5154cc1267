"""BERTScore F1 (evaluation/bertscore.py) with a tiny random BERT saved to a temp folder: no hub, no network."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from cbt_llm.core.errors import ConfigError
from evaluation import bertscore as B

REF = "我最近很焦虑，晚上睡不着觉。"
PRED = "你可以试着放松呼吸。"
OTHER = "今天天气真好，出去玩吧！"
LAYERS = 3
MAX_LEN = 48


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    """A 3-layer BERT (hidden 32, fixed seed) and a character vocabulary of the test strings, saved as a model
    folder the way bert-base-chinese is (config.json, weights, vocab.txt)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert-chinese")
    chars = sorted(set(REF + PRED + OTHER))
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab=str(vocab), model_max_length=MAX_LEN).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(chars) + 5,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_LEN,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test: scoring must not reach a hub."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_identical_pair_scores_100_and_disjoint_lower(encoder, no_network):
    B.check_encoder(encoder, 2)
    out = B.bertscore_f1([REF, PRED], [REF, OTHER], encoder, 2)
    assert out["n"] == 2 and len(out["per_sample"]) == 2
    same, disjoint = out["per_sample"]
    assert same == pytest.approx(100.0, abs=1e-4)
    assert disjoint < same - 1.0
    assert out["score"] == pytest.approx((same + disjoint) / 2)
    assert "note" not in out
    sig = out["signature"]
    assert sig.startswith("bertscore-f1|bert_score-0.3.13|transformers-")
    assert f"|model:{encoder.rsplit('/', 1)[-1]}|layer:2|maxlen:{MAX_LEN}|idf:false|rescale:false|x100" in sig


def _by_hand(folder: str, pred: str, ref: str, layer: int) -> float:
    """BERTScore F1 as bert-score defines it: cosine greedy matching of the uncut encoder's hidden_states[layer];
    every token is a match candidate, [CLS] and [SEP] included, but only the others are averaged (weight 1 each)."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    def emb(text: str) -> np.ndarray:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h = model(ids, output_hidden_states=True).hidden_states[layer][0].numpy()
        return h / np.linalg.norm(h, axis=1, keepdims=True)

    sim = emb(pred) @ emb(ref).T
    p, r = sim.max(axis=1)[1:-1].mean(), sim.max(axis=0)[1:-1].mean()
    return 100 * 2 * p * r / (p + r)


@pytest.mark.parametrize("layer", [1, LAYERS])
def test_layer_is_the_output_of_that_layer(encoder, layer):
    out = B.bertscore_f1([PRED], [OTHER], encoder, layer)
    assert out["score"] == pytest.approx(_by_hand(encoder, PRED, OTHER, layer), abs=1e-3)


def test_matches_the_library_front_door(encoder):
    """Same numbers as bert_score.score(model_type=<folder>, num_layers=...), idf off, no rescale."""
    import bert_score

    _, _, f1 = bert_score.score([PRED, REF], [OTHER, REF], model_type=encoder, num_layers=2, device="cpu")
    out = B.bertscore_f1([PRED, REF], [OTHER, REF], encoder, 2)
    assert out["per_sample"] == pytest.approx([100 * x for x in f1.tolist()], abs=1e-4)


def test_empty_texts_score_zero_with_a_note(encoder):
    out = B.bertscore_f1(["  ", REF, PRED], [REF, REF, ""], encoder, 2)
    assert out["per_sample"][0] == 0.0 and out["per_sample"][2] == 0.0
    assert out["per_sample"][1] == pytest.approx(100.0, abs=1e-4)
    assert out["score"] == pytest.approx(out["per_sample"][1] / 3)
    assert out["note"] == "1 of 3 predictions empty: scored 0; 1 of 3 references empty: scored 0"
    empty = B.bertscore_f1([], [], encoder, 2)
    assert empty["score"] is None and empty["n"] == 0 and empty["note"] == "no samples"


def test_long_texts_are_counted_as_truncated(encoder):
    long_pred = PRED * 6  # 60 characters + [CLS] [SEP] > 48 positions
    out = B.bertscore_f1([long_pred, PRED], [REF, REF], encoder, 2)
    assert out["n"] == 2
    assert out["note"].startswith(f"1 predictions and 0 references longer than {MAX_LEN} tokens: truncated")


def test_bad_calls_fail(encoder):
    with pytest.raises(ValueError, match="pair by position"):
        B.bertscore_f1([PRED], [REF, REF], encoder, 2)
    with pytest.raises(ConfigError, match=r"^eval\.bertscore\.layer: 99 is beyond"):  # never all layers, silently
        B.bertscore_f1([PRED], [REF], encoder, 99)


def _one_line_error(path: str, layer: int) -> str:
    with pytest.raises(ConfigError) as err:
        B.check_encoder(path, layer, field="eval.bertscore")
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_check_encoder_errors_name_the_field(encoder, tmp_path, no_network):
    msg = _one_line_error(str(tmp_path / "missing"), 8)
    assert msg.startswith("eval.bertscore.model_path: ") and "is not a folder" in msg

    name = encoder.rsplit("/", 1)[-1]
    msg = _one_line_error(encoder, 99)
    assert msg == (
        f"eval.bertscore.layer: 99 is beyond {name}'s {LAYERS} layers; "
        "bert-base-chinese layer 8 is the paper-comparable setting"
    )
    assert _one_line_error(encoder, 0).startswith(f"eval.bertscore.layer: 0 is not a layer of {name} (1..{LAYERS})")

    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _one_line_error(str(empty), 8)
    assert msg.startswith(f"eval.bertscore.model_path: {empty} has no config transformers can load")

    # a config without weights or vocabulary: loadable as a config, not as a model
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    shutil.copy(Path(encoder, "config.json"), no_weights)
    msg = _one_line_error(str(no_weights), 2)
    assert msg.startswith(f"eval.bertscore.model_path: {no_weights} is not loadable by transformers AutoModel")


def test_not_computed_has_no_score():
    out = B.not_computed(B.NO_ENCODER)
    assert out["score"] is None and out["n"] == 0 and out["per_sample"] is None
    assert out["signature"] == "bertscore-f1"
    assert out["note"].startswith("not computed: no encoder configured (eval.bertscore.model_path)")
