"""How people spell crisis words, read back to one form: traditional characters, pinyin, homophones typed to get
past platform filters, spaced or punctuated characters. The guard's patterns (crisis.detect) match on normalise's
text; the learned layer (guard_classifier) reads fold_spellings', which keeps spaces and punctuation."""

from __future__ import annotations

import re
import unicodedata

import opencc

# Traditional characters (Taiwan, Hong Kong) read as simplified, with OpenCC's dictionaries (every character and
# phrase, not only the ones the patterns use), then the two variant forms t2s keeps as they are.
_T2S = opencc.OpenCC("t2s.json")
_VARIANTS = str.maketrans("妳著", "你着")


def to_simplified(text: str) -> str:
    return _T2S.convert(text).translate(_VARIANTS)


# Pinyin syllables people type instead of the characters of crisis words (自sha, zisha, 跳lou, qing生). A latin
# run is replaced only when it splits entirely into these syllables, so English words and "ppt" stay as they are.
_PINYIN: dict[str, str] = {
    "zi": "自",
    "sha": "杀",
    "sa": "杀",
    "si": "死",
    "shi": "死",
    "can": "残",
    "qing": "轻",
    "sheng": "生",
    "lou": "楼",
    "wan": "腕",
    "tiao": "跳",
    "ge": "割",
    "huo": "活",
    "xiang": "想",
    "bu": "不",
    "le": "了",
}

# Internet homophones for 自杀 (written to get past platform filters); 紫砂 is also a teapot clay.
_HOMOPHONES = (
    (re.compile(r"紫砂(?![壶锅杯茶陶器泥])"), "自杀"),
    (re.compile(r"自[鲨刹沙煞纱]"), "自杀"),
    (re.compile(r"(?<=[想要去])zs(?![a-z])"), "自杀"),  # initials of zi sha
)
# 死 typed as s or 4 ("想s", "真想4了算了"), only in a want-to-die frame so that 4 in "4月" stays a number.
_SI_FRAME = re.compile(r"(?<=[想去要该])[s4](?=$|了|啊|呀|吧|算了)")


def _pinyin_run(run: str) -> str:
    """The characters of a latin run made only of _PINYIN syllables (longest syllable first), else the run."""
    out, i = [], 0
    while i < len(run):
        for n in (5, 4, 3, 2):
            syl = run[i : i + n]
            if len(syl) == n and syl in _PINYIN:
                out.append(_PINYIN[syl])
                i += n
                break
        else:
            return run
    return "".join(out)


def compact(text: str) -> str:
    """Drop every space, punctuation mark, symbol and invisible character: 我 想 自.杀 -> 我想自杀."""
    return "".join(c for c in text if unicodedata.category(c)[0] not in "PSZC")


def fold_spellings(text: str) -> str:
    """Traditional -> simplified and homophone spellings of 自杀 turned into the word, on text already NFKC and
    lower case; spaces and punctuation stay (the learned layer reads words apart)."""
    t = to_simplified(text)
    for pattern, repl in _HOMOPHONES:
        t = pattern.sub(repl, t)
    return t


def read_lower(text: str) -> str:
    """NFKC, lower case, traditional -> simplified (OpenCC): the text as written, punctuation and spaces kept."""
    return to_simplified(unicodedata.normalize("NFKC", text).lower())


def compact_spellings(text: str) -> str:
    """read_lower's text with spaces/punctuation/zero-width characters removed and pinyin and homophone spellings
    turned into characters."""
    t = re.sub(r"[a-z]+", lambda m: _pinyin_run(m.group()), compact(text))
    for pattern, repl in _HOMOPHONES:
        t = pattern.sub(repl, t)
    return _SI_FRAME.sub("死", t)


def normalise(text: str) -> str:
    """The text detect() matches on: read_lower, then compact_spellings."""
    return compact_spellings(read_lower(text))
