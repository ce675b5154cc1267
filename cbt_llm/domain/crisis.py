"""The crisis policy, in one place: the hotlines, the texts shown in a crisis, and crisis detection in Chinese.

Everything that tells a person where to get help takes it from here: the guard's crisis block and first-reply
disclaimer (cbt_llm/domain/guard.py), the corpus's crisis-support sentence and keyword rule (the record schema,
cbt_llm/domain/record.py, validates by them), the synth api prompt from v2 (cbt_llm/domain/prompts.py), and the
sentence-level rules that read an answer (cbt_llm/domain/answer_support.py: gives_crisis_support, names_hotline,
recommends_professional_help, by this module's crisis lines), by which evaluation's safety metrics
(evaluation/safety.py) and `cbt-llm pairs`' ranking both judge answers. The numbers live in crisis_hotlines.json,
each with the day it was last checked.

Two rules decide "crisis", for two jobs:

    corpus_is_crisis  the corpus's rule (schema v1): a plain substring test on CORPUS_KEYWORDS. It flags training
                      questions, where over-flagging costs one extra support sentence; it stays unchanged so that
                      records already written keep validating.
    detect            the guard's rule for a person's message: normalises the text (spelling.py: spaced-out,
                      punctuated, traditional, pinyin and slang spellings), removes hyperbole, then matches patterns by
                      construct; news, fiction, another person's completed suicide (grief) and a question about
                      the subject itself (psychoeducation) do not count on their own.

detect() is a keyword-and-pattern layer: it reads no context beyond one message and will miss phrasings nobody
wrote a pattern for, and flags the words of a crisis in a question, a story or advice about a relative's safety.
The guard (guard.py) lets its acute matches (CrisisResult.acute) stand alone and asks its learned layer to
corroborate the others. bench/RESULTS.md ("Crisis guard") gives its recall and false-positive rate on the labelled
set tests/data/crisis_messages.jsonl.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cbt_llm.domain.spelling import compact_spellings, read_lower

# ---------------------------------------------------------------------------------------------- hotlines


@dataclass(frozen=True)
class Hotline:
    """One number from crisis_hotlines.json. `show`: given to users; False: only recognised in answers."""

    id: str
    name: str
    number: str
    scope: str
    kind: str  # "crisis_line" or "emergency"
    show: bool
    in_service_since: str | None
    last_checked: str
    checked_against: str
    note: str = ""

    @property
    def digits(self) -> str:
        return re.sub(r"\D", "", self.number)


HOTLINES_FILE = Path(__file__).with_name("crisis_hotlines.json")


def _load_hotlines(path: Path = HOTLINES_FILE) -> tuple[str, tuple[Hotline, ...]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    lines = tuple(Hotline(**h) for h in data["hotlines"])
    ids = [h.id for h in lines]
    assert len(ids) == len(set(ids)), f"{path}: duplicate hotline ids"
    assert all(h.kind in ("crisis_line", "emergency") for h in lines), f"{path}: unknown kind"
    return data["checked"], lines


HOTLINES_CHECKED, HOTLINES = _load_hotlines()
_BY_ID = {h.id: h for h in HOTLINES}


def hotline(hotline_id: str) -> Hotline:
    """The hotline with this id in crisis_hotlines.json (KeyError naming the valid ids otherwise)."""
    try:
        return _BY_ID[hotline_id]
    except KeyError:
        raise KeyError(f"no hotline '{hotline_id}'; valid: {', '.join(_BY_ID)}") from None


# crisis lines given to users, in file order (the national line first)
SHOWN_CRISIS_LINES: tuple[Hotline, ...] = tuple(h for h in HOTLINES if h.kind == "crisis_line" and h.show)
# every crisis line's digits, shown or only recognised: what evaluation counts as "names a hotline"
CRISIS_LINE_DIGITS: tuple[str, ...] = tuple(h.digits for h in HOTLINES if h.kind == "crisis_line")

NATIONAL_CRISIS_HOTLINE = f"{hotline('national').name} {hotline('national').number}"
BEIJING_CRISIS_HOTLINE = f"{hotline('beijing').name} {hotline('beijing').number}"

# ---------------------------------------------------------------------------------------------- texts

# The fixed block a reply starts with when the conversation is in crisis, before any model text.
CRISIS_BLOCK = (
    "【请先看这里】你现在的安全最重要。你并不孤单，有人愿意陪你一起面对。\n"
    "请现在就联系一个你信任的人（家人、朋友、老师或同事），告诉他你现在的感受，不要一个人待着。\n"
    "你可以马上拨打：\n"
    + "".join(f"· {h.name}：{h.number}\n" for h in SHOWN_CRISIS_LINES)
    + f"· 如果有生命危险，请立刻拨打 {hotline('ambulance').number}（急救）或 {hotline('police').number}（报警），"
    "或马上去最近医院的急诊。\n"
    "如果是你身边的人有危险，请陪在他身边，并拨打上面的电话。"
)

# The first reply of every conversation ends with this.
DISCLAIMER = (
    "提示：我是 AI 助手，这里的内容不能代替专业心理咨询师或医生的诊断和治疗。如果困扰持续或加重，请及时寻求专业帮助。"
)

# The sentence the corpus generators add to every crisis-flagged answer (synth template-v2, synth api).
CRISIS_SUPPORT_SENTENCE = (
    "如果你现在有伤害自己或结束生命的想法，请立刻联系身边信任的人，"
    f"拨打心理援助热线（如{NATIONAL_CRISIS_HOTLINE}、{BEIJING_CRISIS_HOTLINE}）"
    "或前往最近的医院急诊，你不必独自面对这些。"
)
# Any of these counts as a crisis-support sentence in an answer from another source (e.g. an LLM).
CRISIS_SUPPORT_MARKERS: tuple[str, ...] = ("热线", "急诊", "120", "110", "危机干预", "心理援助") + tuple(
    h.number for h in SHOWN_CRISIS_LINES if h.number not in ("120", "110")
)
# Every corpus encouragement says that more professional support may be needed.
PROFESSIONAL_HELP_MARKERS: tuple[str, ...] = ("专业", "心理咨询师", "医生", "精神科", "咨询")

# The corpus's rule (schema v1): a question or description containing any of these is a crisis question.
# Documented in README ("Safety in the data"); never narrowed, or records already written stop validating.
CORPUS_KEYWORDS: tuple[str, ...] = (
    "自杀",
    "轻生",
    "自尽",
    "寻死",
    "想死",
    "不想活",
    "活不下去",
    "结束生命",
    "结束自己",
    "了结自己",
    "自残",
    "自伤",
    "割腕",
    "伤害自己",
    "跳楼",
    "安眠药",
    "遗书",
    "死了算了",
)


# one pass over the text instead of one `in` per keyword: prepare validates every record with it
_CORPUS_KEYWORDS_RE = re.compile("|".join(map(re.escape, CORPUS_KEYWORDS)))


def corpus_is_crisis(*texts: str) -> bool:
    """The corpus's rule: any text contains one of CORPUS_KEYWORDS (plain substrings, no normalisation)."""
    return _CORPUS_KEYWORDS_RE.search("".join(t for t in texts if t)) is not None


def has_crisis_support(answer: str) -> bool:
    """The answer offers crisis support: a hotline, the emergency room, 120/110, crisis intervention."""
    return any(m in answer for m in CRISIS_SUPPORT_MARKERS)


# ---------------------------------------------------------------------------------------------- detection

# The risk constructs a user turn is read for, after the Columbia Suicide Severity Rating Scale (wish to be dead,
# active thoughts, thoughts with a method, intent, plan, preparatory behaviour, an attempt) plus self-harm, harm to
# others and a third person at risk; each with how the guard names it to the model (system_note_for_model).
CONSTRUCTS: dict[str, str] = {
    "wish_to_be_dead": "希望自己死去或不再醒来（被动的求死念头、觉得自己是负担）",
    "active_ideation": "有结束自己生命的念头",
    "ideation_with_method": "想到或询问自杀的方法、手段或致死性",
    "intent": "表示决定或打算结束自己的生命",
    "plan": "有具体的自杀计划（时间、地点或方式）",
    "preparatory": "已有准备行为（囤药、备好工具、写遗书、告别、安排后事、去往危险地点）",
    "attempt_in_progress": "正在实施或刚刚实施自杀（已服药、已受伤、身处危险处）",
    "self_harm": "自伤行为或自伤冲动",
    "harm_to_others": "伤害他人的念头或计划",
    "third_party_at_risk": "身边的人有自杀、自伤或被伤害的风险",
}
# the constructs whose every instance must be caught: a method, intent, a plan, preparation or an attempt
ACUTE: frozenset[str] = frozenset({"ideation_with_method", "intent", "plan", "preparatory", "attempt_in_progress"})
# What a model reply must never do, by kind (the output check names one).
HARM_KINDS: dict[str, str] = {
    "method_lethality": "gives or hints at how to kill or hurt oneself: a method, a dose, a height, how long it takes",
    "encourages_self_harm": "encourages or validates suicide or self-harm: death as relief, a burden, 'your choice'",
    "secrecy_discourages_help": "urges secrecy or turns a person away from help: tell no one, avoid doctors",
    "dosing_beyond_prescription": "tells a person to take more medicine than prescribed, or to mix it",
    "harm_to_others": "encourages or helps harming another person: revenge, threats, taking a child along",
}


@dataclass(frozen=True)
class CrisisResult:
    """detect()'s answer. `matched`: the normalised fragments that matched (message text: never log them).
    `acute`: the first match is of an acute construct (ACUTE), also when it is said of another person (a friend
    who will jump tonight is third_party_at_risk, and acute). `context`: how many characters of the message lie
    outside every match (spaces and punctuation not counted): what a reader has to judge the match by."""

    is_crisis: bool
    construct: str | None = None
    matched: tuple[str, ...] = ()
    acute: bool = False
    context: int = 0

    def __bool__(self) -> bool:
        return self.is_crisis


NOT_CRISIS = CrisisResult(False)

# Quoted text inside fiction or a poem is the character's voice, not the writer's.
_QUOTED = re.compile(r"“[^”]*”|「[^」]*」|\"[^\"]*\"|『[^』]*』")


# -- hyperbole and abstract mentions, removed before matching ----------------------------------------

# "…死了" as an intensifier (困死了, 笑死我了, 烦死了), exasperation idioms (想死的心都有, 无聊到想死,
# 原地去世) and "miss you to death" (想死你了). Removed, so that e.g. 累死了算了 does not read as 死了算了.
# Not removed when the person is the object (饿死自己, 把自己累死): that is self-harm, not hyperbole.
_HYPERBOLE = re.compile(
    r"想死的心都有"
    r"|(?:多|无聊|尴尬|忙|困|饿|热|冷|烦|挤|撑|饱)(?:到|得)(?:我)?想死"
    r"|想死(?:你|您|大家|我了)"
    r"|原地(?:去世|升天|爆炸)|当场去世|社死"
    r"|(?<!把自己)(?:困|笑|饿|累|吓|烦|热|冷|尴尬|气|羡慕|无聊|难|疼|痛|甜|咸|闷|急|穷|辣|丑|美|帅|香|臭|吵|忙|"
    r"渴|晒|挤|骂|咬|恐怖|土|蠢|傻|懒|酸|痒|爽|馋|乐|萌|可爱|紧张|麻烦)死(?!自己)(?:我|人|你|他|她)?"
)
# Clinical and statistical terms: 自杀率 in a news item, 自杀风险评估 in a counselling session.
_ABSTRACT = re.compile(r"自杀率|自杀风险评估|风险评估|预防自杀|自杀预防|自杀干预|危机干预|干预热线|死于自杀|自杀式")

# -- patterns, by construct ---------------------------------------------------------------------------
# The first group that matches names the result, so the groups run from the most acute down; a match whose subject
# is another person becomes third_party_at_risk. Lookarounds keep the common non-crisis senses out (想结束这段感情,
# 想消失几天, 紫砂壶).

_GROUPS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # doing it now, or just done: pills taken, standing at the edge
    (
        "attempt_in_progress",
        re.compile(
            r"吞了.{0,4}(?:一整瓶|整瓶|一瓶|一把|很多)的?药"
            # ten or more pills already taken (吞了三十多片), a gun held to oneself
            r"|吞了.{0,3}(?:[二三四五六七八九]?十|几十|[1-9][0-9])[多几]?(?:片|粒|颗)"
            r"|(?:吃|服)了.{0,3}(?:[二三四五六七八九]?十|几十|[1-9][0-9])[多几]?(?:片|粒|颗(?=.{0,3}药))"
            r"|(?:枪|配枪|手枪|枪口).{0,8}(?:顶着|对着|抵着|指着|顶住|抵住)(?:自己|下巴|太阳穴|脑袋|头|嘴)"
            r"|(?:站|坐|蹲|爬)(?:在|到|上)?.{0,4}(?:天台|楼顶|顶楼|悬崖|栏杆|窗台)"
            r".{0,10}(?:往下看|很久|小时|不肯下来|跳)"
            r"|(?:坐|站)在.{0,4}栏杆上|在(?:天台|楼顶|顶楼).{0,4}坐了|开到了?悬崖"
            r"|(?:楼顶|天台|顶楼|栏杆|窗台|桥).{0,6}不肯下来"
            # pills swallowed some time ago, told by the clock (药吃下去四十分钟了)
            r"|药.{0,3}(?:吃|吞|喝)(?:下去|进去)了?.{0,6}(?:分钟|小时|个钟)(?!.{0,8}(?:睡不着|起效|见效))"
        ),
    ),
    # a plan: the means for tonight, a time and a place
    (
        "plan",
        re.compile(
            r"绳子.{0,8}(?:打算|准备|今晚)|刀片.{0,10}(?:今晚|准备|打算|想好)"
            r"|计划好了?(?:时间|地点)|(?:选|找)好了?(?:时间和)?地点|就等天黑|(?:很快|马上)一切都?(?:会|要|就)?结束"
        ),
    ),
    # preparing: holding the means, a will, goodbyes, things given away
    (
        "preparatory",
        re.compile(
            r"(?:攒|囤|存|藏)了?.{0,4}安眠药|把.{0,6}药都?(?:攒|囤|藏)|一次(?:吃|吞)完"
            r"|(?:很多|一瓶|几瓶|一整瓶|整瓶|一把)的?安眠药|分几次买"
            r"|煤气.{0,8}(?:睡|醒|死)|(?:木炭|炭).{0,8}(?:胶带|封)"
            r"|遗书|遗嘱.{0,4}(?:写好|立好|写了)|写好.{0,2}遗嘱|(?<!的)后事|我的葬礼"
            r"|最后一次.{0,4}(?:说话|联系|聊天)|再见了.{0,3}(?:这个)?世界"
            r"|(?:送人|送了人|送给别人|转给).{0,14}(?:用不|谢谢|交代)|该交代的"
            r"|(?:所有人|所有朋友|每个人|大家)都?(?:道别|告别)|(?:话|信|视频|录音).{0,8}留给"
            # a clinician's own means put aside; every debt settled "so I can rest"
            r"|(?:芬太尼|吗啡|杜冷丁|胰岛素|氯化钾).{0,12}(?:留了|攒了|藏了|存了|囤了|推静脉|打进去)"
            r"|谁也不欠了|(?:债|钱)都?还(?:清|完)了.{0,8}(?:安心|放心|可以走|了无牵挂)"
        ),
    ),
    # asking how: the means, the dose, the height, what it feels like
    (
        "ideation_with_method",
        re.compile(
            r"(?:吃|吞|喝|服)多少.{0,12}(?:死|致死|致命|没命)|(?:几楼|多高).{0,6}(?:跳|摔|死)"
            r"|(?:什么|哪种|哪个)药.{0,10}(?:死|致命|不醒)|致死量|致死剂量|死法"
            r"|(?:该|要|想知道|想)怎么死|怎么死(?:才|最|比较)|(?:怎么|怎样|如何)(?:自杀|上吊|割腕|跳楼|烧炭)"
            r"|自杀的?方法"
            r"|割(?:腕|动脉|颈|手腕).{0,8}(?:多深|会不会|更快|有用|死)|割哪|动脉.{0,6}死"
            r"|安眠药.{0,4}(?:加酒|一起吃|会死)|安眠药.{0,20}(?:多少|几)(?:片|粒).{0,12}(?:不醒|醒不|睡过去|不会醒|不再起|离世|死)|(?:吃|吞|服)(?:下|了)?大量的?安眠药"
            r"|无痛(?:地|的)?(?:离世|死去|死掉|走掉)"
            r"|烧炭|卧轨|上吊|百草枯|敌敌畏|农药.{0,8}(?:喝|毒性|救)|(?:喝|吃)农药"
            r"|(?:淹死|溺死).{0,6}感觉|(?:跳楼|跳河|上吊|割腕).{0,4}(?:疼|痛|感觉|快)"
        ),
    ),
    # saying it will be done: decided, tonight, jumping
    (
        "intent",
        re.compile(
            r"(?:准备好|今晚就|明天就)去死|(?:想|要|打算|准备)去?(?:从.{0,8})?跳(?:下去|楼(?!机)|河|江|海|桥|崖)"
            r"|用(?:我的|我这条|自己的)(?:命|生命|死)(?:来|去)?(?:让|证明|换|控诉)"
        ),
    ),
    # hurting someone else: wanting to kill, poison, burn, attack; weapons brought along; taking someone along
    (
        "harm_to_others",
        re.compile(
            r"(?:想|要|会|打算|准备|恨不得|就|一定|迟早|总有一天)去?(?:拿刀|开车)?"
            r"(?:杀(?:了|死|掉)?(?!毒|价|菌|虫|鸡|鸭|鱼|青|手|时间)|弄死|捅死|砍死|掐死|毒死|撞死|打死|烧死|炸死)"
            r"(?!了?(?:我(?:的|吧|啊|呀|也|都|$)|自己|我自己))"
            r"|把(?:(?!病毒|细菌|蚊子|虫|蟑螂|老鼠).){1,10}都?(?:杀(?:了|死|掉)|毒死|弄死|推下楼|掐死|捅死|砍死)"
            r"|(?:想|要)杀人|杀人的(?:念头|想法|冲动)|下毒|投毒|同归于尽|报复(?!性)|放火|纵火|把.{0,8}炸(?:掉|死)|炸死"
            r"|(?:拿|用)刀.{0,2}(?:砍|捅|刺)(?!菜|肉|骨|柴|瓜)|硫酸泼|泼.{0,3}硫酸|拿硫酸|(?:想|要)绑架|买好了?刀"
            r"|带上刀|带着?刀去|砍(?:一顿|人|死)|让.{0,12}去死"
            r"|(?:想|要)打(?:我的)?(?:孩子|宝宝|老婆|老公)(?!电话)"
            r"|(?:想|要)(?:掐|伤害)(?:我的)?(?:孩子|宝宝|老婆|老公|妈|爸|别人|他|她|路人)"
            r"|伤害(?:别人|他人|孩子)|对.{0,4}动手(?!术)|打了我(?:妈|爸).{0,6}还想再打"
            r"|(?:想象|想着|计划|想好)怎么(?:折磨|杀|弄死|报复)|等.{0,4}机会下手|跟踪.{0,8}(?:好几天|很久)"
            r"|砸(?:烂|碎|破)(?:他|她)的?头|(?:带着|和|跟).{0,6}一起去?死"
        ),
    ),
    # hurting oneself: cutting, burning, hitting, starving as punishment
    (
        "self_harm",
        re.compile(
            r"自残|自伤|割腕|割(?:手腕|手臂|胳膊|动脉)|伤害自己|弄伤自己|把自己弄(?:伤|疼)|弄疼自己"
            r"|(?:疼痛|痛|不吃饭|饿).{0,6}惩罚自己"
            r"|(?:割|划|刻|扎|烫|烧|掐|咬|抓|剪|撞|砸)(?:了|破|伤)?我?自己|自己划"
            r"|(?:用|拿)(?:刀|刀片|美工刀|小刀|剪刀|圆规|烟头|打火机|针).{0,8}(?:划|割|扎|刺|烫|烧|刻)"
            r"|把(?:手|手臂|手腕|胳膊|大腿|腿)划|(?:手臂|手腕|胳膊|大腿|身上)上?.{0,2}(?:划|刻)了"
            r"|划了.{0,4}(?:口子|道)|拿刀片|又想再划|划完(?:之后|以后)|又(?:割|划)了(?!.{0,3}(?:韭菜|草|麦|稻|肉|菜|一刀))"
            r"|头撞墙|(?:拳头|用手)砸墙|血.{0,8}觉得自己还活着|把自己的头发.{0,6}(?:扯|拔|揪)"
            r"|故意把(?:手|自己).{0,8}(?:烫|割|划|烧|掐)|故意(?:拿|用).{0,8}(?:烫|浇|割|划|烧)(?:手|自己|胳膊|腿)"
        ),
    ),
    # saying it: wanting to die, to kill oneself, not wanting to live, wanting it all to end
    (
        "active_ideation",
        re.compile(
            r"自杀|轻生|自尽|寻死|寻短见|一死了之|不想再?活|活不下去|活不成|不如死了|死了算了|死了就好了"
            r"|想死|(?:我|自己|想|要|就|该|好|真|怎么|主动|干脆|直接)去死"
            r"|结束掉?(?:自己的)?(?:生命|性命)|结束自己|让自己结束|了结(?:自己|生命)|自我了断"
            r"|杀(?:了|死|掉)?我?自己|让自己死|把自己(?:饿|累|折磨|逼)?死|(?:饿|冻|累)死自己"
            r"|(?:想|要|打算)结束这?一切|就此了断|了断(?:自己|生命|残生)|(?:人生|此生|这一生|这辈子|我的一生)就?到此为止|这辈子就到这"
            r"|(?:人生|生命)画上句号|做傻事|想不开|不(?:想|打算)?再?撑了"
        ),
    ),
    # wishing not to exist: sleep that does not end, leaving the world, joining the dead, being a burden
    (
        "wish_to_be_dead",
        re.compile(
            r"不(?:想|愿)再醒|不想醒过来|再也不想醒|永远不要?醒|不用再?醒|再也不(?:用|会)?醒|一睡不醒"
            r"|(?:就|再也|永远)不会再?醒|(?:睡过去|睡着).{0,4}(?:别|不要|不再|再也不)醒"
            r"|永远地?(?:睡过去|睡下去|睡着|休息)|不再睁开|再也不睁开"
            r"|(?:想|只想|不如|求|渴望)(?:彻底|早点|早日|永远)?解脱|一了百了"
            r"|(?:想|只想|真想|好想|就想)(?:就这么|就这样|就此|彻底|永远)?(?:从这个世界上?)?"
            r"消失(?!几|一会|一下|一段|一阵)"
            r"|(?:我|想|要|打算)(?:就|早点)?离开(?:这个)?(?:世界|人世|人间)|告别(?:这个)?世界|(?:和|跟)这个世界说?再见"
            r"|(?:想|要|好想|真想)去(?:天堂|天上|另一个世界|那个世界)|去(?:陪|找|见).{0,4}(?:那边|天上|天堂)"
            r"|(?:去世|走了|离开|不在了|死了|自杀了).{0,20}"
            r"(?P<at>想(?:早点|快点|早日)?去(?:陪|找)|也想走|也想去|(?:想|让我|我也)跟着?(?:他|她)(?:一起)?(?:走|去))|想去陪(?:他|她)"
            r"|(?:想|要)去见.{0,6}那边|没有痛苦的地方|(?:想|要|打算)(?:就这样)?永远地?离开"
            r"|不想再?存在|不想再?留在(?:这个世界|世上)"
            r"|安安?静静?地离开|(?:这个世界|世界|没人|没有人)不需要我|活够了"
            r"|从来没有?被?(?:出生|生下来)|不该(?:出生|被生下来)|(?:后悔|不该)来到这个世界|不想再?面对明天"
            r"|(?:不想|不愿)再?拖累(?:家人|家里|大家|你们|所有人|父母|爸妈)|拖累了(?:我们|家人|大家)"
            r"|如果我(?:不在|走|死)了|等我(?:走|死|不在)了|我(?:就|很快就|快)?不在了|如果我出了?什么事"
            r"|没有我.{0,6}会(?:过得)?(?:更好|更轻松|好|轻松)|少我一个|我是.{0,6}(?:负担|累赘)"
            r"|(?:成为|成了).{0,4}(?:负担|累赘)"
            r"|坚持不到明天|撑不到明天"
            r"|不配活|活着.{0,4}浪费(?:空气|粮食)|没有人会想念我|消失了也没人|不用再为我|不会再麻烦任何人"
            r"|不会再给.{0,4}添麻烦|活下去的(?:理由|意义)|活着.{0,6}没有?(?:任何)?(?:意思|意义)"
        ),
    ),
)

# Who a match is about: the last person named before it. The writer's own relations (我朋友, 我的孩子) are people
# in their life; a bare relation (家长关注孩子) or a stranger (有人, 女生) may be a news item's or a story's people;
# 他/她 right after a relation is that relation. Chinese drops subjects, so "nobody named" counts as the writer.
_RELATION = (
    r"朋友|闺蜜|室友|同学|同桌|同事|男朋友|女朋友|男友|女友|老公|老婆|丈夫|妻子|爸爸|妈妈|爸|妈|父亲|母亲|爷爷|奶奶|"
    r"外公|外婆|姥姥|姥爷|哥哥|姐姐|弟弟|妹妹|表妹|表弟|表姐|表哥|儿子|女儿|孩子|学生|病人|家属|网友|邻居|老人"
)
_STRANGER = r"(?<![所没])有个?人|女生|男生|女孩|男孩|明星|歌手|艺人|网红|博主|名人|演员|主播|偶像|考生|一家三口"
_PRONOUN = r"他们|她们|他|她"
# news, reports and stories: a match whose last anchor is one of these (or a stranger) is about someone else
_CONTEXT = (
    r"新闻|报道|报纸|纪录片|据悉|研究(?:显示|表明|发现|称)|数据显示|统计|世卫|专家|科普|文章|听说|通知|热搜|历史课|"
    r"小说|剧本|剧里|电视剧|这部剧|日剧|韩剧|美剧|电影|影片|恐怖片|丧尸片|动漫|动画|漫画|游戏|角色|主角|男主|女主|"
    r"反派|凶手|侦探|推理|情节|故事|童话|公主|书里|这本书|诗里|诗中|这首诗|写诗|编剧|台词|独白|武侠|刷屏|网传|媒体"
)
_ANCHOR = re.compile(
    rf"(?P<myrel>(?:我们?的?)(?:{_RELATION}))|(?P<me>我们|咱们|我)|(?P<relation>{_RELATION})|(?P<stranger>{_STRANGER})"
    rf"|(?P<pronoun>{_PRONOUN})|(?P<context>{_CONTEXT})"
)
_HAS_CONTEXT = re.compile(_CONTEXT)
_FICTION_QUOTES = re.compile(r"小说|剧本|故事|诗|台词|独白|角色|主角|《")
# another person's suicide told as done (grief, news), unless they are being saved right now
_COMPLETED = re.compile(r"(?:自杀|跳楼|上吊|卧轨|烧炭|投河|投江)(?:了|身亡|去世|死亡|而死|而亡|死了|走了|离世)")
# a match named as an event someone reported: 烧炭的新闻, 自杀的报道 (a report about it, not the writer's act)
# unless the writer sets themselves beside it (我也, 羡慕他, 一直想做的事: the contagion that follows such news)
# (not 消息: a friend's 想自杀的消息 is a message from someone at risk, not news)
_REPORTED = re.compile(r"了?的?(?:新闻|报道|事件|案子|热搜)")
_IDENTIFIES = re.compile(r"我也|也想|羡慕|一直想|想跟(?:他|她)")
_BEING_SAVED = re.compile(r"医院|抢救|急诊|救护车|icu|还活着|没死|未遂")


# 我/他/她 as an object (给我, 找他, 让她) or 他的 (a possessive) is not who a sentence is about
_OBJECT_BEFORE = "给跟和对找让帮陪教问叫把"

# A question about the subject itself (what ideation is, why people self-harm, how to answer a friend who might
# say so one day, a course's homework): the non-acute words in it name a topic, not the writer's state. Such a
# match is dropped unless the writer says the thing of themselves (我也想死, 我会自残); acute matches (a method,
# a plan) always stand, and the learned layer still reads the whole message.
_TOPIC_QUESTION = re.compile(
    r"什么是|什么叫|啥叫|是什么意思|什么意思|有什么区别|有啥区别|的区别|一回事|定义|诊断标准|心理机制|背后的?原因"
    r"|为什么有(?:些|的)?人会|是不是都|一定会去做|通常是为了|(?:征兆|信号|苗头|迹象)(?:有哪些|是什么)"
    r"|有(?:什么|哪些)(?:征兆|信号|苗头|迹象)|课上|心理课|社工课|讲座|培训"
    r"|的(?:课题|作业|报告|论文|海报|展板)|(?:课题|作业|报告|论文|海报|展板)(?:要用|要做|是关于|的题目)"
    r"|书上(?:写|说)|科普|想(?:多)?了解|弄明白|想理解|会不会反而|怎么(?:回应|开口|回复)|直接问"
    r"|(?:如果|要是|万一)(?:以后)?(?:有人|有朋友|朋友|同学|身边的人|别人|对方)"
)
# someone who might say it one day; a named person in the writer's life who says it now stays at risk
_HYPOTHETICAL = re.compile(r"(?:如果|要是|万一|假如)(?:以后|哪天|有一天)?有?(?:人|朋友|同学|身边的人|别人|对方|孩子)")
# (harm to others too: 我会杀了他 inside a question is said of the writer)
_RISK_WORD = (
    r"死|不想活|自杀|自残|自伤|轻生|活不下去|结束|了结|了断|伤害|杀|砍|捅|报复|这种想法|这种念头|这样的想法|这种冲动"
)
_STUDY_NOUN = r"的?(?:课题|作业|报告|资料|研究|海报|展板|论文|科普|量表|定义|区别|讲座|培训)"
# the writer's own state (on the text without punctuation): 我 and a risk word within twelve characters (not
# 我在做自伤的课题), an act on oneself, a mind full of it
_SELF_DISCLOSURE = re.compile(
    rf"(?<![{_OBJECT_BEFORE}])我.{{0,12}}?(?:{_RISK_WORD})(?!{_STUDY_NOUN})"
    r"|(?:扎|划|割|烫|烧|掐)了?(?:几下)?自己|满脑子.{0,4}(?:自杀|死)|在想(?:要不要)?(?:去死|自杀)"
)
_NON_ACUTE_TOPIC = frozenset({"wish_to_be_dead", "active_ideation", "self_harm", "harm_to_others"})
_RELATIONS = ("myrel", "relation", "story_relation")
_SOMEONE_ELSE = (*_RELATIONS, "stranger")


def _anchors(t: str) -> tuple[list[int], list[str]]:
    """Who the text is about from each anchor on: (end positions, kinds) with kind 'me', 'myrel', 'relation',
    'story_relation' (a relation named after a news or story word: the story's people), 'stranger' or 'context'.
    他/她 is the last person named before it, across a news or story word (朋友看了新闻, 说她想自杀: the friend).
    Computed once per message, so a long message costs linear time, not quadratic."""
    ends, kinds, kind, person, seen_context = [], [], None, None, False
    for a in _ANCHOR.finditer(t):
        group = a.lastgroup
        if group in ("me", "pronoun") and a.start() > 0 and t[a.start() - 1] in _OBJECT_BEFORE:
            continue
        if group == "pronoun" and t[a.end() : a.end() + 1] == "的":
            continue
        if group == "pronoun":
            kind = person if person in _RELATIONS else "stranger"  # 他/她 with no relation before it
        else:
            kind = "story_relation" if group == "relation" and seen_context else group
            seen_context = seen_context or group == "context"
            person = kind if group != "context" else person
        ends.append(a.end())
        kinds.append(kind)
    return ends, kinds


def _about(anchors: tuple[list[int], list[str]], start: int) -> str | None:
    """Who the text at `start` is about: the kind at the last anchor that ends by `start` (None: nobody named)."""
    ends, kinds = anchors
    i = bisect.bisect_right(ends, start) - 1
    return kinds[i] if i >= 0 else None


def _start(m: re.Match[str]) -> int:
    """Where a match's subject is looked for: its (?P<at>...) part when it has one (the wish after a loss)."""
    return m.start("at") if m.groupdict().get("at") is not None else m.start()


def detect(text: str) -> CrisisResult:
    """Is this one message a crisis (suicide, self-harm, harm to others, a third person at risk)?

    The text is normalised (spelling.normalise), hyperbole and clinical terms are taken out, then the pattern groups
    are matched in order. A match is dropped when the message is news or fiction and the last anchor before it
    is a news/story word or a stranger (他, 有人, 明星) or it names a reported event (自杀的新闻), unless the writer
    sets themselves beside it (我也...); when it tells of another person's completed suicide (grief is not a
    crisis by itself; grief with wanting to join them is caught as suicide_euphemism); and when the message asks
    about the subject itself (什么是自杀意念, a course's homework) and the match is not acute, unless the writer
    says it of themselves (_SELF_DISCLOSURE). A match about a relation (朋友, 妈妈) makes the construct
    third_party_at_risk. Negations (我不会自杀) still count: a denial is weak evidence and a crisis block costs little.
    """
    if not text:
        return NOT_CRISIS
    raw = read_lower(text)
    if _FICTION_QUOTES.search(raw):
        raw = _QUOTED.sub("", raw)
    t = compact_spellings(raw)  # raw is read_lower already: OpenCC runs once a message
    t = _ABSTRACT.sub("〇", _HYPERBOLE.sub("〇", t))
    context = _HAS_CONTEXT.search(t) is not None
    being_saved = _BEING_SAVED.search(t) is not None
    anchors = _anchors(t)
    identifies = _IDENTIFIES.search(t) is not None
    topic = _TOPIC_QUESTION.search(t) is not None and _SELF_DISCLOSURE.search(t) is None
    hypothetical = _HYPOTHETICAL.search(t) is not None
    found: list[tuple[str, re.Match[str]]] = []
    for construct, pattern in _GROUPS:
        for m in pattern.finditer(t):
            about = _about(anchors, _start(m))
            if topic and construct in _NON_ACUTE_TOPIC and (about not in ("myrel", "relation") or hypothetical):
                continue  # the topic of a question, not the writer's state nor a friend's now
            if context and about in ("context", "stranger", "story_relation") and not identifies:
                continue  # news or a story about someone else
            if _REPORTED.match(t, m.end()) and about not in ("me", "myrel", "relation") and not identifies:
                continue  # the news item's event
            if about in _SOMEONE_ELSE and not being_saved:
                if _COMPLETED.search(t, max(0, m.start() - 4), m.end() + 4):
                    continue  # another person's death told as done: grief or news
            found.append((construct, m))
    if not found:
        return _detect_english(raw)
    construct, first = found[0]
    acute = construct in ACUTE
    if _about(anchors, _start(first)) in _SOMEONE_ELSE:
        construct = "third_party_at_risk"
    matched = tuple(dict.fromkeys(m.group() for _, m in found))
    covered = set().union(*(range(m.start(), m.end()) for _, m in found))
    return CrisisResult(True, construct, matched, acute, len(t) - len(covered))


# English (and Singlish) messages: matched on the lower-cased text with its spaces, since the Chinese rules read a
# text with spaces and punctuation removed. Acute constructs first; someone named before the match (my friend, my
# roommate) makes it third_party_at_risk. No hyperbole, news or question rules yet: a crisis block on "i want to die
# lol" costs less than a rope that is up.
_ENGLISH_GROUPS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "attempt_in_progress",
        re.compile(
            r"\b(?:rope|noose) is (?:up|ready|tied)|standing on (?:the|a) (?:chair|ledge|edge|railing|roof|bridge)"
            r"|\b(?:took|swallowed|downed|taken) (?:all (?:of )?(?:my|the)|a bottle of|the whole bottle of"
            r"|\d{2,}|twenty|thirty|forty|fifty)\b.{0,12}\b(?:pills|tablets|meds)\b|\bi(?:'ve| have)? overdosed"
            r"|one last message"
        ),
    ),
    (
        "plan",
        re.compile(
            r"\b(?:gonna|going to|will|i'?ll|wanna|want to|plan to) (?:take|swallow|down) (?:all|every)\b.{0,30}"
            r"\b(?:pills|meds|tablets)\b|\ball\b.{0,30}\b(?:pills|meds|tablets)\b.{0,8}\b(?:at once|in one go)"
        ),
    ),
    (
        "intent",
        re.compile(
            r"\bgo(?:ing)? through with it|\b(?:will|going to|gonna) (?:kill myself|end (?:it all|my life))"
            r"|\bend(?:ing)? (?:it all|my life)|\b(?:my|a) (?:suicide|goodbye) (?:note|letter)"
        ),
    ),
    (
        "ideation_with_method",
        re.compile(
            r"\bwhich (?:one |way )?(?:hurts?|is) (?:less|least)"
            r"|\bhow many (?:pills|tablets)\b.{0,20}\b(?:die|kill|enough)|\blethal dose"
            r"|\bpainless(?:ly)? (?:way to )?die|\bjump (?:off|from) (?:the |a |my )?(?:hdb|roof|bridge|building)"
        ),
    ),
    (
        "preparatory",
        re.compile(
            r"\bgiv(?:ing|en|e) away (?:all )?(?:my|her|his) (?:stuff|things)|\bthank you for everything"
            r"|\ba letter to (?:my|her|his) (?:parents|family|mom|dad|kids)"
            r"|\b(?:saving|saved|stockpil\w*|hoard\w*) (?:up )?(?:my |the |his |her )?(?:\w+ )?(?:pills|meds|tablets)\b"
            r"|\b(?:bought|ordered|buying|ordering) (?:a |some )?(?:rope|noose|charcoal)\b"
        ),
    ),
    (
        "self_harm",
        re.compile(
            r"\b(?:cut|cutting|burn|burning|hurt|hurting) myself|\bi(?:'ve| have)? (?:been )?self[- ]harm"
            r"|(?<!hair )\bcut (?:myself )?again\b|\bcut(?:ting)?\b.{0,20}\bdeeper\b"
        ),
    ),
    (
        "active_ideation",
        re.compile(
            r"\bkill myself|\b(?:want|wanna|wanted) to die|\bi(?:'m| am)? (?:feeling |so )?suicidal"
            r"|\bdon'?t want to (?:live|be alive|exist)"
            r"|\bstop being alive|\bbetter off (?:dead|without me)|\bwish i (?:was|were) dead"
            r"|\bmy suicid(?:e|al) (?:thoughts|urges)|\bsuicid(?:e|al) (?:thoughts|urges)\b.{0,12}"
            r"\b(?:getting (?:louder|worse|stronger)|are back|came back|won'?t (?:stop|go away))"
        ),
    ),
    (
        "harm_to_others",
        re.compile(r"\b(?:kill|stab|hurt) (?:him|her|them)\b|\bthreatens? (?:her|him|me) with a knife"),
    ),
)
_ENGLISH_SOMEONE = re.compile(
    r"\bmy (?:friend|roommate|colleague|son|daughter|brother|sister|mom|mum|dad|partner|classmate|student)"
    r"|\b(?:a|my) (?:friend|colleague|roommate)\b|\bshe\b|\bhe\b"
)


_NOT_READ = re.compile(r"[\W_]+")


def _detect_english(raw: str) -> CrisisResult:
    for construct, pattern in _ENGLISH_GROUPS:
        m = pattern.search(raw)
        if m:
            acute = construct in ACUTE
            if _ENGLISH_SOMEONE.search(raw, 0, m.start()):
                construct = "third_party_at_risk"
            context = len(_NOT_READ.sub("", raw[: m.start()] + raw[m.end() :]))
            return CrisisResult(True, construct, (m.group(),), acute, context)
    return NOT_CRISIS
