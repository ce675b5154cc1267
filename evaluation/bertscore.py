"""BERTScore F1 of each generated answer against its reference, with a local encoder.

The CBT-LLM paper reports BERTScore as its third metric, computed with bert-base-chinese; layer 8 is the setting
bert-score itself tunes for that encoder (its `model2layers`), so `model_path=<local bert-base-chinese folder>,
layer=8` gives the paper-comparable number. The result has the shape of the reference metrics
(evaluation/reference.py):

    {"score": mean F1 x100 | None, "n": int, "per_sample": [F1 x100, ...], "signature": str, ["note": str]}

F1 is the library's 0-1 value times 100, so it reads like the paper's percentages. idf weighting is off and the
score is not rescaled with a baseline (the paper reports neither, and rescaling would need the library's baseline
table for the encoder); the signature says both.

Scoring is bert-score 0.3.13's own: `bert_score.utils.bert_cos_score_idf` (the function `bert_score.score` calls)
does the embedding and the greedy cosine matching. We load the encoder ourselves instead of passing the path as
`model_type`, because `bert_score.score`
  - picks the model class by substring of `model_type` ("t5" anywhere in a folder path loads a T5 encoder;
    a name starting with "scibert" downloads SciBERT with wget), and
  - reloads the model on every call;
and we load with `local_files_only=True`, so nothing is ever fetched from a hub: a path that is not a complete local
model folder is an error. The encoder is cut after `layer` transformer layers, as the library's `get_model` does,
so the embeddings are the output of layer `layer` (1 = the first layer above the embeddings).

Long texts: the library truncates every text to the tokenizer's `model_max_length` (512 tokens for
bert-base-chinese, about 510 characters of Chinese). CBT answers often run longer, so the note counts the answers
and references that were cut; the tail of such an answer does not count. A tokenizer saved without a maximum is
held to the encoder's position table (`max_position_embeddings`), which a longer input would overrun.

An empty (whitespace-only) prediction or reference scores 0 with a note, as in reference.py, and is never passed
to the library (bert-score's empty-text path calls a tokenizer method transformers 5 no longer has).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

from cbt_llm.core.errors import ConfigError
from evaluation.reference import _check, _result

NAME = "bertscore-f1"
PAPER_SETTING = "bert-base-chinese layer 8 is the paper-comparable setting"
NO_ENCODER = (
    "no encoder configured (eval.bertscore.model_path); set it to a local bert-base-chinese folder, layer 8, "
    "for the paper-comparable score"
)


def not_computed(reason: str) -> dict:
    """The result for a BERTScore that was not computed (e.g. NO_ENCODER): score None, never a 0 that reads as one."""
    return {"score": None, "n": 0, "per_sample": None, "signature": NAME, "note": "not computed: " + reason}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _encoder_layers(model):
    """The encoder's stack of transformer layers (BERT, RoBERTa, ELECTRA...), or None for other architectures."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    return layers if layers is not None and hasattr(layers, "__getitem__") else None


@functools.lru_cache(maxsize=1)
def _load(model_path: str, layer: int):
    """Tokenizer and encoder cut after `layer` layers, from a local folder only. Cached: check_encoder loads the
    model before generation and scoring every model of an eval reuses it."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_path, local_files_only=True)
    model.eval()
    layers = _encoder_layers(model)
    if layers is not None:
        model.encoder.layer = torch.nn.ModuleList(list(layers)[:layer])
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and tokenizer.model_max_length > positions:
        tokenizer.model_max_length = positions
    return tokenizer, model


def check_encoder(model_path: str, layer: int, field: str = "eval.bertscore") -> None:
    """Fail before any generation, with one ConfigError line naming the field, when the encoder cannot be used:
    the folder is missing, transformers cannot load it (AutoConfig, AutoTokenizer, AutoModel, local files only),
    it has no BERT-style layer stack, or `layer` is not one of its layers (1..num_hidden_layers)."""
    path = Path(model_path)
    name = path.name or str(path)
    if not path.is_dir():
        raise ConfigError(
            f"{field}.model_path: {model_path} is not a folder; set it to a local encoder folder "
            f"(config.json, vocab, weights), e.g. bert-base-chinese ({PAPER_SETTING})"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    except Exception as exc:
        raise ConfigError(
            f"{field}.model_path: {model_path} has no config transformers can load ({_one_line(exc)})"
        ) from None
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ConfigError(f"{field}.model_path: {name}'s config ({config.model_type}) names no num_hidden_layers")
    if layer > n:
        raise ConfigError(f"{field}.layer: {layer} is beyond {name}'s {n} layers; {PAPER_SETTING}")
    if layer < 1:
        raise ConfigError(f"{field}.layer: {layer} is not a layer of {name} (1..{n}); {PAPER_SETTING}")
    try:
        _, model = _load(str(model_path), layer)
    except Exception as exc:
        raise ConfigError(
            f"{field}.model_path: {model_path} is not loadable by transformers AutoModel/AutoTokenizer "
            f"({_one_line(exc)})"
        ) from None
    if _encoder_layers(model) is None:
        raise ConfigError(
            f"{field}.model_path: {name} ({config.model_type}) has no encoder.layer stack to cut at layer {layer}; "
            f"use a BERT-style encoder ({PAPER_SETTING})"
        )


def signature(model_path: str, layer: int, max_length: int | None = None) -> str:
    """How the number was made: library and transformers versions, encoder folder, layer, idf, rescale, scale."""
    maxlen = f"|maxlen:{max_length}" if max_length else ""
    # the distribution's version: bert_score.__version__ in the 0.3.13 wheel still says 0.3.12
    return (
        f"{NAME}|bert_score-{version('bert-score')}|transformers-{version('transformers')}"
        f"|model:{Path(model_path).name}|layer:{layer}{maxlen}|idf:false|rescale:false|x100"
    )


def _too_long(tokenizer, texts: list[str]) -> int:
    """How many texts the library will truncate (more tokens, with [CLS] and [SEP], than model_max_length)."""
    ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    return sum(len(x) > tokenizer.model_max_length for x in ids)


def bertscore_f1(
    preds: Sequence[str],
    refs: Sequence[str],
    model_path: str,
    layer: int,
    *,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict:
    """BERTScore F1 x100 of each prediction against its reference (paired by position) and their mean. The
    encoder is checked first (check_encoder, cheap once loaded): a bad folder or layer is a ConfigError here too."""
    _check(preds, refs)
    if not preds:
        return _result(None, 0, [], signature(model_path, layer), ["no samples"])
    check_encoder(model_path, layer)
    from bert_score.utils import bert_cos_score_idf

    tokenizer, model = _load(str(model_path), layer)
    model.to(device)
    sig = signature(model_path, layer, tokenizer.model_max_length)
    keep = [i for i, (p, r) in enumerate(zip(preds, refs)) if p.strip() and r.strip()]
    empty_pred = sum(1 for p in preds if not p.strip())
    empty_ref = len(preds) - len(keep) - empty_pred
    notes = [f"{empty_pred} of {len(preds)} predictions empty: scored 0"] if empty_pred else []
    if empty_ref:
        notes.append(f"{empty_ref} of {len(preds)} references empty: scored 0")
    scores = [0.0] * len(preds)
    if keep:
        cands, golds = [preds[i] for i in keep], [refs[i] for i in keep]
        # idf off, as bert_score.score builds it: every token weighs 1 but [CLS] and [SEP], which weigh 0
        idf = defaultdict(lambda: 1.0, {tokenizer.sep_token_id: 0.0, tokenizer.cls_token_id: 0.0})
        prf = bert_cos_score_idf(model, golds, cands, tokenizer, idf, batch_size=batch_size, device=device)
        for i, f1 in zip(keep, prf[:, 2].tolist()):
            scores[i] = f1 * 100
        cut_p, cut_r = _too_long(tokenizer, cands), _too_long(tokenizer, golds)
        if cut_p or cut_r:
            notes.append(
                f"{cut_p} predictions and {cut_r} references longer than {tokenizer.model_max_length} tokens: "
                "truncated (the library's behaviour), their tails not scored"
            )
    return _result(sum(scores) / len(scores), len(scores), scores, sig, notes)
