"""Corpus schema v1: what a valid record is, and the reason given for each kind of invalid one."""

import copy

import pytest

from cbt_llm.domain.cbt import CBT_PARTS, join_answer
from cbt_llm.domain.crisis import CRISIS_SUPPORT_SENTENCE, corpus_is_crisis
from cbt_llm.domain.record import validate_record

CBT = {
    "empathy": "听起来你最近压力很大,这种感受很正常。",
    "key_thought": "你似乎认为一次考试失败就代表自己一无是处。",
    "challenge": "一次结果真的能定义你的全部吗?有没有相反的证据?",
    "strategy": "试着把担心写下来,并为每个担心找出更平衡的想法。",
    "encouragement": "你已经迈出了面对问题的一步;如果情绪持续困扰你,可以寻求专业心理咨询师的帮助。",
}


def good():
    return {
        "id": "t-1",
        "question": "考试前总是焦虑怎么办?",
        "description": "每次考试前我都睡不着,担心考不好。",
        "keywords": ["焦虑", "考试"],
        "cbt": dict(CBT),
        "answer": join_answer(CBT),
        "distortions": ["catastrophizing"],
        "source": "test",
        "meta": {"generator": "test", "crisis": False},
    }


def test_good_record_passes_and_answer_keeps_order():
    rec, reason = validate_record(good())
    assert reason is None and rec["id"] == "t-1"
    positions = [rec["answer"].index(CBT[p]) for p in CBT_PARTS]
    assert positions == sorted(positions)


def _mutate(path, value):
    r = good()
    node = r
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return r


@pytest.mark.parametrize(
    "path, value, reason",
    [
        (("cbt", "challenge"), "", "cbt.challenge"),
        (("cbt", "strategy"), "   ", "cbt.strategy"),
        (("cbt", "empathy"), "only english text", "no Chinese"),
        (("cbt", "key_thought"), KeyError, "cbt.key_thought"),
        (("question",), "", "question"),
        (("question",), 42, "question"),
        (("keywords",), "焦虑,考试", "keywords"),
        (("distortions",), ["doom"], "unknown distortion"),
        (("id",), KeyError, "id"),
        (("extra_field",), 1, "extra_field"),
    ],
)
def test_bad_records_give_reason(path, value, reason):
    rec, why = validate_record(_mutate(path, value))
    assert rec is None and reason in why


def test_not_an_object():
    assert validate_record([1, 2])[1].startswith("not a JSON object")


def test_crisis_rules():
    r = good()
    r["description"] = "我觉得活不下去了,有时候想自杀。"
    assert corpus_is_crisis(r["question"], r["description"])
    assert "meta.crisis" in validate_record(copy.deepcopy(r))[1]
    r["meta"]["crisis"] = True
    assert "crisis-support" in validate_record(copy.deepcopy(r))[1]
    r["cbt"]["encouragement"] += CRISIS_SUPPORT_SENTENCE
    r["answer"] = join_answer(r["cbt"])
    assert validate_record(r)[1] is None
