"""The reply check's patterns: text a model must never show a person, by harm kind (crisis.HARM_KINDS). The guard
(cbt_llm/domain/guard.py) runs it on every reply beside the learned layer; the synth api sessions reject an answer it
stops."""

from __future__ import annotations

import re
import unicodedata

from cbt_llm.domain.crisis import HOTLINES
from cbt_llm.domain.spelling import compact

# Text a model must never show: how to hurt or kill oneself (doses, cuts, means, heights, sealing a room), and
# advice that turns a person away from help (don't see a doctor, hotlines are useless, tell no one).
_OUTPUT_METHOD = re.compile(
    r"致死(?:剂)?量|致命剂量|死法|最(?:快|有效|无痛|不痛苦|痛苦最小)的?(?:自杀|方法|方式)"
    r"|(?:吃|吞|服用?)\d+.{0,3}(?:片|粒|颗|克|毫克|mg|g).{0,12}(?:就|即可|可以|能|会|足以)(?:死|致死|致命|没命|不会醒)"
    r"|(?:割|划).{0,6}(?:动脉|腕|颈).{0,12}(?:深|纵向|竖着|竖向|横着|方向|厘米|cm|才能)"
    r"|(?:割腕|烧炭|上吊|绳结|跳楼|卧轨|服毒|农药|百草枯|安眠药|煤气).{0,15}"
    r"(?:步骤|方法是|方法如下|成功|更快|不痛|无痛|最有效)"
    r"|(?:自杀|自残|自伤|结束生命)的?(?:方法|方式|步骤|技巧)(?:是|有|如下|包括)"
    r"|(?:几楼|多高|\d+层|\d+米).{0,8}(?:才能|就能|一定|必|足以)(?:死|摔死|致命)"
    r"|(?:门窗|缝隙).{0,6}(?:封|密封).{0,10}(?:炭|煤气)|(?:炭|煤气).{0,10}(?:密封|封好|封住)"
    r"|(?:可以|不妨|试试|尝试)用?(?:刀|刀片|烟头)?(?:割|划|烫|掐)(?:自己|手|手臂|一下)"
    # all the pills at once, a sharper blade or more cuts, a death or an attack made to look like an accident
    r"|(?<!不要)(?<!不能)(?<!别)(?:一次|一口气|全部|都)(?:吃|吞|服)(?:掉|下去?|完)?(?:一整瓶|整瓶|所有的?药|全部的?药)"
    r"|(?:药|瓶子?)都?(?:集中|攒)起来.{0,8}(?:一次|全部|一口气)(?:吃|吞)"
    r"|(?:换|找|用)一?把更(?:锋利|快)的刀|多(?:划|割)几(?:道|下|刀)|(?:划|割)(?:得)?(?:更)?深一(?:点|些)"
    r"|(?:让|弄得?|伪装成?|做得|搞得|希望)(?:它|现场|这件事|一切|事情)?(?:看起来|显得)?像(?:个|一场|一次)?意外"
    r"|看起来像意外就(?:行|好|可以)"
)
_OUTPUT_DISCOURAGE = re.compile(
    r"(?:不要|别|不用|不必|没必要|用不着)再?去?(?:看|找|联系|打|拨打|求助于?|寻求|相信)?(?:心理)?"
    rf"(?:医生|咨询师|心理咨询|精神科|热线|专业(?:人士|帮助|人员)|医院|急诊|{'|'.join(h.digits for h in HOTLINES)})"
    r"|(?:医生|咨询师|心理咨询|精神科|热线|心理治疗|吃药|看病)都?"
    r"(?:没用|没有用|没什么用|是骗|骗人|骗钱|帮不了你|不靠谱|浪费(?:钱|时间))"
    r"|(?:别|不要)(?:告诉|让)(?:任何人|家人|父母|别人|爸妈|朋友)|(?:可以|直接|赶紧)停药"
)


# what unsafe_output matches; cbt_llm.domain.guard derives its streaming hold-back from these patterns' longest match
OUTPUT_PATTERNS = (_OUTPUT_METHOD, _OUTPUT_DISCOURAGE)


def unsafe_output(text: str) -> str | None:
    """Why a model's text must not be shown, as a HARM_KINDS key: 'method_lethality' or 'secrecy_discourages_help'
    (None: nothing found). Matched on the NFKC text without spaces and punctuation, so 割 腕 or 12 3 56 read as
    written together."""
    t = compact(unicodedata.normalize("NFKC", text).lower())
    if _OUTPUT_METHOD.search(t):
        return "method_lethality"
    if _OUTPUT_DISCOURAGE.search(t):
        return "secrecy_discourages_help"
    return None
