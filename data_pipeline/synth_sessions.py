"""`cbt-llm synth template --sessions`: an offline generator of multi-turn CBT counselling sessions.

One session is an intake (persona, setting, presenting problem, situation, automatic thought, distortion and a
planned technique) and 8-40 alternating turns, counsellor first, that follow the session arc

    agenda -> explore -> identify -> socratic -> technique -> homework -> summary

(agenda and rapport, the situation, the automatic thought, Socratic questioning, a CBT technique, homework,
summary and feedback). Short sessions fold neighbouring stages into one turn (meta.arc says "homework+summary");
long ones add follow-up turns inside explore, socratic and technique. Some clients resist ("这没用", "我做不到")
and the counsellor's next turn, in the same stage, meets it with a smaller step. A `crisis_fraction` of sessions
are crisis sessions: the client discloses suicidal or self-harm thoughts early, and the counsellor's next turn
asks about safety directly and gives the hotlines of cbt_llm/crisis.py; the session stays on safety before any
technique, the homework keeps the safety plan and the summary repeats the national line.

Text is composed, not templated whole: the topic banks of data_pipeline.synth_content (personas, situations,
feelings, thoughts per distortion, strategies) fill the slots of this module's session banks, so a session
varies in wording, length, stage split and technique. Output: OpenAI-messages JSONL, one session per line:
{"id", "messages": [system, assistant, user, ...], "meta": {"intake", "arc" (stage per counsellor turn),
"crisis", "seed", ...}}.

Determinism, sharding, workers, zstd, progress and summary follow data_pipeline.synth_template: session i is a
pure function of (seed, i, crisis_fraction, min_turns, max_turns); its draws come from BLAKE2b digests of
(seed, i, block), read as a mixed-radix number; shard k of n holds a contiguous range of sessions.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import zstandard

from cbt_llm.config import ConfigError, SynthConfig
from cbt_llm.crisis import SHOWN_CRISIS_LINES, hotline
from cbt_llm.report import print_summary, write_metrics
from data_pipeline import synth_content as C
from data_pipeline.schema import DISTORTIONS
from data_pipeline.synth_template import (
    SUCCESS_NAME,
    SUMMARY_NAME,
    _available_cpus,
    _encode,
    run_shard_jobs,
    shard_jobs,
)

PROMPT_VERSION = "sessions-v1"
SOURCE = "synth-template-sessions"
STAGES = ("agenda", "explore", "identify", "socratic", "technique", "homework", "summary")
SAFETY = "safety"
_BATCH = 512  # sessions per write (about 1.5 MB)
_ZSTD_LEVEL = 3
_PPM = 1_000_000
_RESIST_PPM = 350_000  # share of sessions (with a spare turn) in which the client resists once

SYSTEM_PROMPT = (
    "你是一名经验丰富的心理咨询师，专长于认知行为疗法（CBT）。你正在和来访者进行一次多轮的咨询会谈："
    "先问候并共同设定议程，了解具体情境，识别情绪背后的自动化思维，用温和的苏格拉底式提问检验它，"
    "和来访者一起练习一项CBT技术，商定家庭作业，最后总结并请来访者反馈。每次只说一段话，多倾听、多提问，"
    "用温暖、通俗的中文交流。如果来访者提到自杀、自伤或伤害他人的念头，先直接询问其安全状况并提供心理援助热线，"
    "安全永远优先于任何技术练习。"
)

# ---------------------------------------------------------------------------------------------- hotlines
# From cbt_llm/crisis.py, so a new number reaches the sessions without an edit here.
_LINES = "、".join(f"{h.name} {h.number}" for h in SHOWN_CRISIS_LINES)
_NATIONAL = f"{SHOWN_CRISIS_LINES[0].name} {SHOWN_CRISIS_LINES[0].number}"
_EMERGENCY = f"{hotline('ambulance').number}（急救）或 {hotline('police').number}（报警）"

# ---------------------------------------------------------------------------------------------- intake
# A setting fits the persona's life stage; "线上咨询室" fits everyone.
SETTINGS: dict[str, tuple[str, ...]] = {
    "teen": ("学校的心理辅导室", "线上咨询室", "社区心理服务站"),
    "college": ("学校心理咨询中心", "线上咨询室", "医院心理门诊"),
    "worker": ("单位的员工心理援助室", "线上咨询室", "社区心理服务站", "医院心理门诊"),
    "parent": ("社区心理服务站", "线上咨询室", "医院心理门诊"),
    "senior": ("社区心理服务站", "医院心理门诊", "线上咨询室"),
}

# technique -> (Chinese name, intro, steps asked one per turn, the client's answers, homework)
TECHNIQUES: dict[str, dict] = {
    "thought_record": {
        "zh": "思维记录",
        "intro": (
            "我们来试一个叫“思维记录”的练习。它有几栏：情境、情绪和强度、自动化思维、支持和反对的证据，"
            "最后写一个更平衡的想法。",
            "接下来我想和你一起填一张“思维记录表”，把情境、情绪、想法和证据分开写下来，看得会更清楚。",
        ),
        "steps": (
            "情境和想法我们已经有了。现在试着把支持和反对的证据都考虑进去，写一个更平衡的想法，你会怎么说？",
            "写下这个平衡的想法之后，再回头看原来那句话，你现在有多相信它？情绪的强度又有什么变化？",
            "如果下次同样的情境再出现，你打算先在表格的哪一栏停下来看一看？",
        ),
        "answers": (
            "也许可以这样说：{balanced}",
            "我试着写：{balanced}这样一写，好像没那么绝对了。",
            "嗯……{balanced}我大概只有{b2}%相信原来那句话了。",
        ),
        "homework": (
            "在情绪明显变化的时候，至少完成三次思维记录",
            "每天晚上花十分钟，把当天最难受的一刻写进思维记录表",
        ),
    },
    "behavioural_experiment": {
        "zh": "行为实验",
        "intro": (
            "我们可以设计一个小小的“行为实验”，把这个想法当成一个需要检验的假设，而不是已经确定的事实。",
            "与其在脑子里反复争论，不如做一个“行为实验”，让现实来告诉我们答案。",
        ),
        "steps": (
            "如果这个想法是对的，你预测会发生什么？把预测写具体一些，再给它的可能性打个分。",
            "我们定一个这周就能做的小实验，比如{s1}。你觉得什么时候、在哪里做比较合适？",
            "做完之后，我们要对比结果和预测。你打算怎么记录实际发生的事？",
        ),
        "answers": (
            "我猜结果会很糟，大概有{b1}%的把握吧。不过听你这么说，可以试试看。",
            "周三下午我比较有空，可以那时候试一次。",
            "我可以在手机备忘录里记下来：预测是什么，实际发生了什么。",
        ),
        "homework": (
            "完成我们设计的那个小实验，记下预测和实际结果",
            "找两个不同的场合各做一次实验，看看结果和预测差多少",
        ),
    },
    "decatastrophising": {
        "zh": "去灾难化",
        "intro": (
            "我们一起做一个“去灾难化”的练习：把最坏、最好和最可能的结果都摆到桌面上来看。",
            "当担心一路往最坏处走的时候，有一个叫“去灾难化”的方法，可以帮我们把结果看得更全面。",
        ),
        "steps": (
            "你心里最坏的结果是什么？如果它真的发生了，你能怎么应对？",
            "那最好的结果呢？最可能的结果又是什么？",
            "一年以后回头看，这件事对你的影响大概会有多大？",
        ),
        "answers": (
            "最坏的就是……{thought}。真要发生了，我大概也只能先找人商量。",
            "最可能的嘛，大概只是会难受一阵子，然后慢慢过去。",
            "一年以后……可能就没那么重要了，我现在想起来，{balanced}",
        ),
        "homework": (
            "每当担心升级时，写下最坏、最好和最可能的三种结果",
            "为最可能的那种结果写一个具体的应对计划",
        ),
    },
    "evidence_examination": {
        "zh": "检验证据",
        "intro": (
            "我们把这个想法当成法庭上的一个说法，分两栏列出支持它和不支持它的证据。",
            "接下来我们来“检验证据”：只写事实，不写感受，看看这个想法站不站得住。",
        ),
        "steps": (
            "先说支持这个想法的证据，有哪些是实实在在发生过的事？",
            "再找找不支持它的证据，哪怕很小的一件事也算。",
            "把两栏放在一起看，你会怎样更准确地描述这件事？",
        ),
        "answers": (
            "支持的证据……我能想到的就是{situation}。",
            "不支持的证据，嗯，好像也有不是这样的时候，{others}也夸过我几次。",
            "更准确的说法可能是：{balanced}",
        ),
        "homework": (
            "每天记一条不支持这个想法的证据",
            "准备一个小本子，专门记录和这个想法不相符的经历",
        ),
    },
    "cognitive_continuum": {
        "zh": "认知连续体",
        "intro": (
            "我们画一条从0到100的线，0是完全失败，100是完美，这个练习叫“认知连续体”。",
            "有一个叫“认知连续体”的方法，专门对付只看两个极端的想法。",
        ),
        "steps": (
            "你会把自己这次的表现放在这条线的哪个位置？",
            "线上的50分、70分分别是什么样子？你身边有没有人处在中间的位置？",
            "把这些放在一起看，你还会把自己放在原来的位置吗？",
        ),
        "answers": (
            "一开始我想说0分，但仔细想想，大概有{b2}分吧。",
            "我有个朋友也就是六七十分的样子，可我从没觉得他失败。",
            "可能要往中间挪一挪，{balanced}",
        ),
        "homework": (
            "遇到“全有或全无”的想法时，用0到100分给事情重新打分",
            "每天挑一件事，在连续体上标出它真实的位置",
        ),
    },
    "responsibility_pie": {
        "zh": "责任饼图",
        "intro": (
            "我们来画一个“责任饼图”，把影响这件事的因素都列出来，再给每个因素分一块饼。",
            "有一个叫“责任饼图”的练习，可以帮我们看清一件事到底由哪些因素造成。",
        ),
        "steps": (
            "先把所有可能影响这件事的因素列出来，{others}、环境、时机都算上，你能想到哪些？",
            "现在给每个因素分配一个比例，最后再写你自己的那一份。",
            "看着这张饼图，你自己那一块和你原来以为的相比，有什么不同？",
        ),
        "answers": (
            "有{others}的原因，有当时的环境，还有运气吧。",
            "这么分下来，我自己那块大概只有{b3}%。",
            "原来我以为全是我的错，现在看好像不是这样。{balanced}",
        ),
        "homework": (
            "再次自责时，画一个责任饼图，最后再写自己的那一份",
            "这周挑一件让你自责的事，用责任饼图重新分配一次",
        ),
    },
    "double_standard": {
        "zh": "双重标准技术",
        "intro": (
            "我想请你试一个叫“双重标准技术”的练习：用你对待好朋友的标准来对待自己。",
            "很多人对别人很宽容，对自己却很严苛，我们来用“双重标准技术”看看这一点。",
        ),
        "steps": (
            "如果你最好的朋友遇到完全一样的事，也对自己说了这句话，你会怎么回应他？",
            "你对朋友说的这些话，有哪些其实也适用于你自己？",
            "如果用这种语气对自己说话，你的感受会有什么变化？",
        ),
        "answers": (
            "我大概会跟他说，别对自己这么狠，{balanced}",
            "好像……都适用，只是我从来没这么对自己说过。",
            "会轻松一点吧，没那么压得喘不过气了。",
        ),
        "homework": (
            "每当批评自己时，写下你会对好朋友说的话",
            "每天用对待朋友的语气给自己写一句话",
        ),
    },
    "behavioural_activation": {
        "zh": "行为激活",
        "intro": (
            "情绪低的时候，等有动力再行动往往等不来。我们来试试“行为激活”：先行动，动力会慢慢跟上。",
            "有一个叫“行为激活”的方法，通过安排一些小活动，让情绪一点点回暖。",
        ),
        "steps": (
            "有哪些事以前会给你带来一点愉快或成就感？哪怕很小的事都可以。",
            "我们从中挑一两件，安排进这周的具体时间里，比如{s1}，你觉得哪件最容易开始？",
            "做之前和做之后，可以给心情打个分。你觉得自己会怎么记录？",
        ),
        "answers": (
            "以前我喜欢出去散步，还有做饭，现在都很久没做了。",
            "散步可能最容易，晚饭后走二十分钟应该可以。",
            "我可以在日历上打个勾，顺便写个心情分数。",
        ),
        "homework": (
            "按计划完成两件小活动，做前做后各给心情打一次分",
            "每天安排一件能带来一点成就感的小事，做完打个勾",
        ),
    },
}

# Which techniques fit which distortion (the first is the textbook match).
TECHNIQUES_FOR: dict[str, tuple[str, ...]] = {
    "all_or_nothing": ("cognitive_continuum", "thought_record", "double_standard"),
    "overgeneralization": ("evidence_examination", "behavioural_experiment", "thought_record"),
    "catastrophizing": ("decatastrophising", "behavioural_experiment", "thought_record"),
    "mind_reading": ("behavioural_experiment", "evidence_examination", "thought_record"),
    "should_statements": ("double_standard", "thought_record", "evidence_examination"),
    "labeling": ("evidence_examination", "double_standard", "thought_record"),
    "emotional_reasoning": ("thought_record", "evidence_examination", "behavioural_experiment"),
    "personalization": ("responsibility_pie", "thought_record", "double_standard"),
}
_LOW_MOOD_TOPICS = ("low_mood", "loneliness", "grief")  # behavioural activation also fits these

BALANCED_THOUGHTS: tuple[str, ...] = (
    "虽然这次不太顺利，但这不代表以后都会这样。",
    "我确实有做得不够的地方，但也有做到的部分。",
    "我的担心可以理解，但它不一定会成真。",
    "我现在感觉很糟，可感觉不等于事实。",
    "事情有很多原因，不全是我一个人的责任。",
    "我已经尽力了，允许自己有做不到的时候。",
    "一件事没做好，不等于我这个人不好。",
)

# ---------------------------------------------------------------------------------------------- counsellor
GREETINGS: tuple[str, ...] = (
    "你好，欢迎来到{setting}，我是今天和你会谈的咨询师。",
    "你好，很高兴见到你。",
    "你好，欢迎你来。我们今天的会谈大约五十分钟。",
    "你好，先找个舒服的姿势坐好，不用着急。",
    "你好，谢谢你今天按时过来。",
)
RAPPORT: tuple[str, ...] = (
    "来这里之前，心里会不会有点紧张？这很正常。",
    "你能主动来谈一谈，这一步本身就不容易。",
    "这里说的内容都会保密，你可以放心地说。",
    "今天不需要准备得很好，想到什么都可以说。",
    "",
)
AGENDA_QUESTIONS: tuple[str, ...] = (
    "我们先一起定一下今天的议程：你最希望今天谈谈什么？",
    "在开始之前，我想先和你商量一下今天想重点谈的事，最近最困扰你的是什么？",
    "今天我们先花几分钟定个议程。最近有什么事让你特别想来聊一聊？",
    "我们先约定一下今天要谈的重点，好吗？你可以先说说最近遇到的困扰。",
)
REFLECTIONS: tuple[str, ...] = (
    "听起来{burden}已经困扰你一段时间了。",
    "谢谢你愿意说出来，{burden}确实会让人很辛苦。",
    "嗯，我能感觉到这段时间你过得不轻松。",
    "我听到了，{dur}你一直在和{burden}相处，辛苦了。",
    "你说自己{f1}，这种滋味一定不好受。",
)
AGENDA_CONFIRM: tuple[str, ...] = (
    "那我们今天就把重点放在{topic}这件事上，好吗？",
    "我们今天就围绕{topic}来谈。",
    "",
)
EXPLORE_QUESTIONS: tuple[str, ...] = (
    "能不能说一个最近的具体例子？当时发生了什么？",
    "我们找一个最近的具体情境来看看：那是在什么时候、什么地方？",
    "最近一次特别难受是什么时候？能描述一下当时的情形吗？",
    "你能举一个这周发生的例子吗？越具体越好。",
)
EXPLORE_FOLLOWUPS: tuple[str, ...] = (
    "那个时候你身体上有什么感觉？如果用0到100分给情绪打分，大概是多少？",
    "当时你做了什么？事后又是怎么度过的？",
    "这种情况一般多久出现一次？有没有哪些时候会好一些？",
    "这件事对你的睡眠、学习或工作有什么影响？",
)
# The feelings the client just named, reflected before the identify question.
IDENTIFY_REFLECTIONS: tuple[str, ...] = (
    "你说当时{f1}，{f2}。",
    "那一刻你{f2}，这种感受很重要。",
    "听起来那时候你{f1}。",
    "",
)
IDENTIFY_LEADS: tuple[str, ...] = (
    "我们把当时的情境放慢一点看。",
    "在认知行为疗法里，我们特别关注情绪出现那一刻脑子里闪过的想法。",
    "情绪往往不是事情本身直接带来的，而和我们当下怎么想有关。",
    "我们来看看这件事里藏着什么想法。",
)
IDENTIFY_QUESTIONS: tuple[str, ...] = (
    "在情绪最强烈的那一刻，你脑子里闪过的第一个念头是什么？",
    "当时你心里对自己说了什么？",
    "如果把那一刻的想法原原本本写下来，会是一句什么话？",
    "那一刻，你觉得这件事说明了什么？",
)
SOCRATIC_QUESTIONS: tuple[str, ...] = (
    "支持这个想法的证据有哪些？不支持它的证据又有哪些？",
    "如果你最好的朋友有同样的想法，你会对他说什么？",
    "这个想法对你有什么帮助，又让你付出了什么代价？",
    "有没有另一种看待这件事的方式？",
    "你现在有多相信这个想法？是什么让它显得这么真实？",
)
ACKS: tuple[str, ...] = ("嗯，", "我明白。", "谢谢你这么坦诚。", "好的，", "这一点很重要。", "")
TECHNIQUE_LEADS: tuple[str, ...] = (
    "你已经开始对这个想法有些松动了。",
    "刚才的讨论很有意义。",
    "我们已经看清了这个想法，接下来做一点练习。",
    "",
)
HOMEWORK_LEADS: tuple[str, ...] = (
    "我们来定一个这周的小作业。",
    "今天练习的东西，如果能带回生活里，效果会更好。",
    "离下次见面还有一周，我们商量一下这周可以做点什么。",
)
HOMEWORK_BODIES: tuple[str, ...] = (
    "我建议这周{hw}。另外，{s1}。",
    "这周可以{hw}，如果还有余力，{s1}。",
    "作业就定为：{hw}。",
)
HOMEWORK_QUESTIONS: tuple[str, ...] = (
    "你觉得这个安排可行吗？有什么可能会妨碍你完成？",
    "从0到10分，你有多大把握完成它？",
    "你愿意试试吗？我们可以再调整。",
)
SUMMARY_LEADS: tuple[str, ...] = (
    "我们今天谈了不少，我来简单总结一下：",
    "时间差不多了，我们一起回顾一下今天的内容：",
    "在结束之前，我想把今天的要点梳理一下：",
)
SUMMARY_BODIES: tuple[str, ...] = (
    "我们从{topic}谈起，找到了“{thought}”这个想法，用{tech}重新检验了它，这周的作业是{hw}。",
    "今天我们看到，让你难受的不只是事情本身，还有“{thought}”这个念头；我们练习了{tech}，也定好了{hw}。",
)
PROFESSIONAL_NOTES: tuple[str, ...] = (
    "如果这周情况加重、影响到日常生活，请及时寻求专业心理咨询师或精神科医生的帮助。",
    "这些练习不能代替专业治疗，如果困扰持续，可以到医院的心理科请医生做一个评估。",
    "如果中间遇到困难，也可以和信任的人聊聊，或者预约专业的心理咨询。",
)
FEEDBACK_QUESTIONS: tuple[str, ...] = (
    "今天的会谈对你来说哪里最有帮助？有没有哪里让你不太舒服？",
    "你觉得今天谈得怎么样？有什么想给我的反馈吗？",
    "回头看今天，你最想带走的是哪一点？",
)
CLOSINGS: tuple[str, ...] = (
    "谢谢你的反馈，这对我很重要。下次见面时，我们先一起看看作业完成得怎么样。照顾好自己。",
    "谢谢你今天这么投入。改变是一点一点发生的，我们下周见。",
    "听到这些我很高兴。你的不确定也很正常，我们下次接着来。",
)

# A folded turn asks each of these stages' question after the previous stage's (no statement: the client has
# not answered yet); other stages folded into a turn drop the previous stage's question instead.
FOLD_QUESTIONS: dict[str, tuple[str, ...]] = {
    "explore": ("也可以直接举一个最近的例子，说说当时发生了什么。", "如果方便，也说说最近一次特别难受时的具体情形。"),
    "identify": ("当时你脑子里闪过了什么念头？", "那一刻你心里对自己说了什么？"),
    "socratic": (
        "说完之后，我们也想一想：有没有不支持这个想法的证据？",
        "再想一想，如果好朋友这么想，你会对他说什么？",
    ),
}
AFTER_SAFETY: tuple[str, ...] = (
    "谢谢你和我一起把安全放在第一位。在你安全的前提下，我们再回到让你难受的那件事上。",
    "有了这个安全计划，我们可以慢慢来。接下来，我们回到你最近遇到的事情上。",
)

# ---------------------------------------------------------------------------------------------- resistance
RESISTANCE_WHY: tuple[str, ...] = (
    "我以前也试过类似的办法。",
    "我根本没有那个力气。",
    "道理我都懂，可就是控制不住。",
    "我怕自己又会半途而废。",
)
# (what the client says, how the counsellor meets it): every meeting acknowledges the push-back (MEET_MARKERS)
# and, with SMALLER_STEPS, offers a smaller step.
MEET_MARKERS: tuple[str, ...] = ("我听到", "我理解")
RESISTANCE: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "这没用，{why}",
        (
            "我听到你说这没用，这种试过却没见效的无力感很真实，我们不需要一下子做到。",
            "我听到你的怀疑了，这很正常，方法本来就需要按你的情况调整。",
        ),
    ),
    (
        "我做不到，{why}",
        (
            "我理解，觉得自己做不到的时候，任何建议都会显得很遥远。谢谢你直接告诉我。",
            "我听到你说做不到，这不是你不够努力，可能是这一步对现在的你来说太大了。",
        ),
    ),
    (
        "说实话，我觉得这些方法对我没什么作用，{why}",
        ("我理解你的怀疑，谢谢你愿意直说，这能帮我们找到更适合你的方式。",),
    ),
    (
        "说起来容易，可我就是没办法不这么想，{why}",
        ("我理解，一个想法跟了你这么久，不可能说放下就放下，这一点也不奇怪。",),
    ),
)
SMALLER_STEPS: dict[str, tuple[str, ...]] = {
    "socratic": (
        "我们不用一下子推翻这个想法，只找一个小小的例外就好，哪怕很小的一件事，能想到吗？",
        "我们先不争论它对不对，只把它当成一个猜测放在这里。有没有哪一次，事情没有按它说的发生？",
    ),
    "technique": (
        "我们把练习缩小一点：今天只做第一步，做不完也没关系，我们一起看看卡在哪里，好吗？",
        "要不先只做最容易的那一小步？感觉不对随时可以停下来。",
    ),
    "homework": (
        "我们把它缩小一点：这周只做一次，每次五分钟，你觉得呢？",
        "我们可以先把它当成一个观察，而不是任务：只要留意一次就算完成，可以吗？",
    ),
}
AFTER_MEET: dict[str, tuple[str, ...]] = {
    "socratic": (
        "嗯……如果只是找一个例外，我想起上个月有一次其实还挺顺利的。",
        "好吧，也许它只是个猜测，不一定是事实。",
    ),
    "technique": ("如果只做第一步，我应该可以试试。", "好吧，那我先试着做一点。"),
    "homework": ("如果只是这么小的一步，我应该可以试试。", "这样听起来没那么难，我愿意试试。"),
}

# ---------------------------------------------------------------------------------------------- client
GOALS: tuple[str, ...] = (
    "我希望今天能想明白该怎么调整。",
    "想请你帮我理一理。",
    "我想知道怎么才能不那么难受。",
    "我也不知道从哪里说起。",
    "",
)
EXAMPLE_OPENERS: tuple[str, ...] = ("就拿上周来说吧，", "比如前几天，", "最近一次是这样的：", "嗯……", "")
EXPLORE_FOLLOW_ANSWERS: tuple[str, ...] = (
    "大概有{emo}分吧，{f2}。",
    "我就一个人待着，什么也做不下去，{f1}。",
    "差不多每周都有好几次，只有忙起来的时候会好一点。",
    "影响挺大的，{f2}，做事也没法集中注意力。",
)
BELIEFS: tuple[str, ...] = (
    "这个想法我大概有{b1}%相信。",
    "说实话，我几乎完全相信它，大概{b1}%吧。",
    "我觉得它就是事实。",
    "",
)
SOCRATIC_ANSWERS: tuple[str, ...] = (
    "支持的证据……{situation}。可是仔细想想，好像也有不是这样的时候。",
    "如果是朋友，我大概会劝他别对自己这么苛刻。",
    "嗯，我好像确实把事情想得太绝对了。",
    "我也说不清，感觉上就是这样。不过你这么一问，我有点不确定了。",
    "也许……{others}并没有我想的那么在意。",
)
HOMEWORK_ANSWERS: tuple[str, ...] = (
    "可以，我有{conf}分的把握。",
    "应该可以，就是怕自己忙起来忘了，我设个提醒吧。",
    "好，我试试看。",
)
FEEDBACK: tuple[str, ...] = (
    "最有帮助的是把想法写下来，原来它没有我以为的那么可靠。",
    "谢谢你，我觉得轻松了一点，至少知道可以从哪里开始了。",
    "说实话有些地方我还不太确定，不过我愿意试试。",
    "被认真听完的感觉挺好的，下次我想再聊聊别的事。",
)

# ---------------------------------------------------------------------------------------------- crisis
# The only client texts with crisis words; tests check cbt_llm.crisis.detect flags every one.
CRISIS_DISCLOSURES: tuple[str, ...] = C.CRISIS_DESCRIPTION_SENTENCES + (
    "还有一件事我一直没敢说：最难受的时候，我想过自杀。",
    "有时候我觉得活着太累了，脑子里会冒出伤害自己的念头。",
)
SAFETY_ACKS: tuple[str, ...] = (
    "谢谢你愿意把这么难开口的事告诉我，这很重要。",
    "我很重视你刚才说的话，你的安全现在是最重要的，其他的我们可以先放一放。",
    "听到你这么痛苦，我很心疼。我想先停下来，认真谈谈这件事。",
)
# Each asks about safety in so many words (安全 or 伤害自己): the crisis protocol's direct question.
SAFETY_QUESTIONS: tuple[str, ...] = (
    "我想直接问你：你现在有没有伤害自己或结束生命的打算？有没有想过具体怎么做？",
    "我需要直接问一个问题：你现在安全吗？这些念头有多强烈，你有没有准备什么，或者定下时间？",
    "你现在是安全的吗？这些念头出现时，你有没有真的去做些什么的打算？",
)
SAFETY_LINES: tuple[str, ...] = (
    "如果任何时候你觉得自己可能控制不住，请马上拨打{lines}；有生命危险时请拨打{emergency}，或者直接去最近医院的急诊。",
    "不管什么时候，只要念头变强，你都可以拨打{lines}，那里有人二十四小时接听；遇到紧急情况请拨打{emergency}。",
)
SAFETY_ANSWERS: tuple[str, ...] = (
    "现在没有具体的计划，只是难受的时候会冒出这个念头。",
    "我不知道……晚上一个人的时候会比较强烈。",
    "我没有准备什么，就是觉得太累了。",
)
SAFETY_PLANS: tuple[str, ...] = (
    "谢谢你如实告诉我。我们先一起做一个安全计划：念头变强的时候，你可以先做些什么让自己安全一点？身边有哪位你信任的人，是你愿意现在就告诉他的？",
    "我们来约定一个安全计划：先把可能伤害自己的东西交给别人保管，再想一个念头变强时可以马上联系的人。你会想到谁？",
)
SAFETY_PLAN_EXTRAS: tuple[str, ...] = (
    "也请把{national}存进手机里。",
    "我们今天谈的其他内容，都会在你安全的前提下进行。",
    "",
)
CONFIDANTS: tuple[str, ...] = ("姐姐", "一个好朋友", "妈妈", "室友", "表哥", "以前的班主任")
SAFETY_PLAN_ANSWERS: tuple[str, ...] = (
    "我可以告诉{who}，{who}一直很关心我。",
    "我愿意今天就给{who}打个电话，把热线号码也存下来。",
    "好，我会把药交给{who}保管，难受的时候先给{who}打电话。",
)
CRISIS_HOMEWORK = "按我们的安全计划，念头变强时先联系信任的人或拨打热线"
CRISIS_SUMMARY_NOTES: tuple[str, ...] = (
    "最重要的是你的安全：念头变强时，请马上联系你信任的人，或拨打{national}，紧急时拨打{emergency}。",
    "请记住我们的安全计划，{national}随时可以打。我也建议你尽快到医院的精神心理科做一次当面评估。",
)


# ---------------------------------------------------------------------------------------------- draws


class _Draw:
    """Uniform choices read from BLAKE2b digests of (prefix, index, block) as one mixed-radix number.

    A 512-bit block gives about 60 choices; when fewer than 64 bits are left, the next block of the same
    session is read, so the draws depend on nothing but (seed, index)."""

    __slots__ = ("h", "key", "block")

    def __init__(self, key: bytes):
        self.key = key
        self.block = 0
        self.h = self._next()

    def _next(self) -> int:
        self.block += 1
        return int.from_bytes(hashlib.blake2b(self.key + bytes([self.block]), digest_size=64).digest(), "little")

    def below(self, n: int) -> int:
        if self.h < 1 << 64:
            self.h = self._next()
        self.h, r = divmod(self.h, n)
        return r

    def pick(self, options):
        return options[self.below(len(options))]


def _seed_prefix(seed: int) -> bytes:
    return f"cbt-llm/synth-sessions/v1/{seed}/".encode()


def _topic_table() -> tuple[tuple, ...]:
    """Per topic: key, zh, (persona, group) pairs, cores, situations, feelings, burden, area, others,
    strategies, thoughts per distortion and techniques per distortion."""
    rows = []
    for key, t in C.TOPICS.items():
        personas = tuple((p, g) for g in t["groups"] for p in C.PERSONA_GROUPS[g])
        thoughts = tuple(t["thoughts"][d] for d in DISTORTIONS)
        feelings = tuple(t["feelings"]) + C.GENERAL_FEELINGS
        techs = tuple(
            TECHNIQUES_FOR[d] + (("behavioural_activation",) if key in _LOW_MOOD_TOPICS else ()) for d in DISTORTIONS
        )
        rows.append(
            (key, t["zh"], personas, t["cores"], t["situations"], feelings, t["burden"], t["area"])
            + (t["others"], t["strategies"], thoughts, techs)
        )
    return tuple(rows)


_TOPICS = _topic_table()


# ---------------------------------------------------------------------------------------------- the arc

# Short sessions fold stages together in this order (homework into summary first); safety never folds.
_FOLDS = (
    ("homework", "summary"),
    ("agenda", "explore"),
    ("identify", "socratic"),
    ("explore", "identify"),
    ("technique", "homework"),
    ("socratic", "technique"),
)
_FOLLOWS = ("explore", "socratic", "technique")  # stages that take follow-up turns
_RESISTED = ("socratic", "technique", "homework")  # stages a client may push back on


def plan_arc(n: int, crisis_after: int | None, safety_turns: int) -> list[list[str]]:
    """The stages of each of n counsellor turns before any follow-up: STAGES, with `safety_turns` safety turns
    after turn `crisis_after` (crisis sessions), folded together until they fit in n turns."""
    units = [[s] for s in STAGES]
    if crisis_after is not None:
        units[crisis_after + 1 : crisis_after + 1] = [[SAFETY] for _ in range(safety_turns)]
    while len(units) > n:
        for a, b in _FOLDS:
            i = next((i for i in range(len(units) - 1) if units[i][-1] == a and units[i + 1][0] == b), None)
            if i is not None:
                units[i : i + 2] = [units[i] + units[i + 1]]
                break
        else:
            units.remove([SAFETY])  # everything folded: keep one safety turn, drop the plan turn
    return units


def _turn_specs(d: _Draw, turns: int, crisis: bool) -> tuple[list[tuple[list[str], str]], int | None, int | None]:
    """The counsellor turns as (stages, kind) with kind main/follow/meet/closing, the index of the turn whose
    reply discloses the crisis, and the index of the turn whose reply resists."""
    n_counsellor = (turns + 1) // 2
    closing = turns % 2  # an odd count ends on the counsellor: a closing turn after the client's feedback
    n = n_counsellor - closing
    crisis_after = d.below(2) if crisis else None
    units = plan_arc(n, crisis_after, 2 if n >= 8 else 1)
    disclose = next(i for i, u in enumerate(units) if u[0] == SAFETY) - 1 if crisis else None
    extra = n - len(units)  # > 0 only when nothing was folded
    resist = None
    if extra and d.below(_PPM) < _RESIST_PPM:
        resist = d.pick([i for i, u in enumerate(units) if u[-1] in _RESISTED])
        extra -= 1
    follow = [0] * len(units)
    eligible = [i for i, u in enumerate(units) if u[-1] in _FOLLOWS]
    for _ in range(extra):
        follow[d.pick(eligible)] += 1
    out: list[tuple[list[str], str]] = []
    disclose_at = resist_at = None
    for i, u in enumerate(units):
        out.append((u, "main"))
        if i == resist:
            resist_at = len(out) - 1
            out.append(([u[-1]], "meet"))
        out.extend(([u[-1]], "follow") for _ in range(follow[i]))
        if i == disclose:
            disclose_at = len(out) - 1  # the reply just before the safety turns
    if closing:
        out.append((["summary"], "closing"))
    return out, disclose_at, resist_at


# ---------------------------------------------------------------------------------------------- text


def _intake(d: _Draw, crisis_ppm: int) -> dict:
    """The drawn intake and the slots the session's text is filled from."""
    crisis = d.below(_PPM) < crisis_ppm
    key, zh, personas, cores, situations, feelings, burden, area, others, strategies, thoughts, techs = d.pick(_TOPICS)
    di = d.below(len(DISTORTIONS))
    (full, bare, lo, hi), group = d.pick(personas)
    age = lo + d.below(hi - lo + 1)
    i = d.below(len(feelings))
    j = d.below(len(feelings) - 1)
    s1 = d.pick(strategies)
    tech = d.pick(techs[di])
    b1 = 60 + 5 * d.below(8)
    slots = {
        "age": age,
        "full": full,
        "bare": bare,
        "setting": d.pick(SETTINGS[group]),
        "topic": zh,
        "core": d.pick(cores),
        "situation": d.pick(situations),
        "f1": feelings[i],
        "f2": feelings[j + (j >= i)],
        "burden": burden,
        "area": area,
        "others": others,
        "s1": s1,
        "dur": d.pick(C.DURATIONS),
        "thought": d.pick(thoughts[di]),
        "balanced": d.pick(BALANCED_THOUGHTS),
        "b1": b1,
        "b2": b1 - 20 - 5 * d.below(6),
        "b3": 10 + 5 * d.below(5),
        "emo": 60 + 5 * d.below(8),
        "conf": 6 + d.below(4),
        "tech": TECHNIQUES[tech]["zh"],
        "hw": d.pick(TECHNIQUES[tech]["homework"]),
        "lines": _LINES,
        "national": _NATIONAL,
        "emergency": _EMERGENCY,
        "who": d.pick(CONFIDANTS),
    }
    intake = {
        "age_band": f"{age // 10 * 10}-{age // 10 * 10 + 9}",
        "role": bare,
        "setting": slots["setting"],
        "topic": key,
        "presenting_problem": slots["core"],
        "situation": slots["situation"],
        "automatic_thought": slots["thought"],
        "distortion": DISTORTIONS[di],
        "technique": tech,
    }
    return {"crisis": crisis, "d": di, "tech": tech, "slots": slots, "intake": intake}


def _stage_text(d: _Draw, stage: str, kind: str, k: int, ctx: dict) -> tuple[str, str]:
    """(statement, question) of one stage in a counsellor turn; k counts this stage's earlier turns."""
    tech = TECHNIQUES[ctx["tech"]]
    if stage == "agenda":
        return d.pick(GREETINGS) + d.pick(RAPPORT), d.pick(AGENDA_QUESTIONS)
    if stage == "explore":
        if kind == "follow":
            return d.pick(ACKS), EXPLORE_FOLLOWUPS[(ctx["start"] + k) % len(EXPLORE_FOLLOWUPS)]
        return d.pick(REFLECTIONS) + d.pick(AGENDA_CONFIRM), d.pick(EXPLORE_QUESTIONS)
    if stage == "identify":
        return d.pick(IDENTIFY_REFLECTIONS) + d.pick(IDENTIFY_LEADS), d.pick(IDENTIFY_QUESTIONS)
    if stage == "socratic":
        if kind == "follow":
            q = (C.CHALLENGE_TEMPLATES[DISTORTIONS[ctx["d"]]] + SOCRATIC_QUESTIONS)[(ctx["start"] + k) % 7]
            return d.pick(ACKS), q
        key = C.KEY_THOUGHT_TEMPLATES[DISTORTIONS[ctx["d"]]]
        return d.pick(key), d.pick(SOCRATIC_QUESTIONS)
    if stage == "technique":
        if kind == "follow":
            return d.pick(ACKS), tech["steps"][min(k, len(tech["steps"]) - 1)]
        return d.pick(TECHNIQUE_LEADS) + d.pick(tech["intro"]), tech["steps"][0]
    if stage == "homework":
        body = d.pick(HOMEWORK_BODIES)
        if ctx["crisis"]:
            body += f"还有，最重要的一项：{CRISIS_HOMEWORK}。"
        return d.pick(HOMEWORK_LEADS) + body, d.pick(HOMEWORK_QUESTIONS)
    if stage == "summary":
        note = d.pick(CRISIS_SUMMARY_NOTES) if ctx["crisis"] else d.pick(PROFESSIONAL_NOTES)
        return d.pick(SUMMARY_LEADS) + d.pick(SUMMARY_BODIES) + note, d.pick(FEEDBACK_QUESTIONS)
    # safety: the first safety turn asks directly and gives the hotlines; a second one makes a safety plan
    if k == 0:
        return d.pick(SAFETY_ACKS) + d.pick(SAFETY_LINES), d.pick(SAFETY_QUESTIONS)
    return d.pick(SAFETY_PLAN_EXTRAS), d.pick(SAFETY_PLANS)


def _counsellor(d: _Draw, stages: list[str], kind: str, seen: dict, s: dict, ctx: dict) -> str:
    if kind == "closing":
        return d.pick(CLOSINGS)
    if kind == "meet":
        return d.pick(RESISTANCE[ctx["resist"]][1]) + d.pick(SMALLER_STEPS[stages[-1]])
    text = ""
    for i, st in enumerate(stages):
        if i and st in FOLD_QUESTIONS:
            text += d.pick(FOLD_QUESTIONS[st])
        else:
            statement, question = _stage_text(d, st, kind, seen.get(st, 0), ctx)
            text += statement + (question if _asked(stages, i) else "")
        seen[st] = seen.get(st, 0) + 1
    return text.format_map(s)


def _asked(stages: list[str], i: int) -> bool:
    """Is stage i's question asked in a (folded) turn: it is the last, or the next stage only adds a question."""
    return i == len(stages) - 1 or stages[i + 1] in FOLD_QUESTIONS


def _client(d: _Draw, stage: str, kind: str, k: int, s: dict, ctx: dict) -> str:
    """The client's answer to a counsellor turn whose last stage is `stage`."""
    if kind == "meet":  # agrees to the smaller step; in a technique, takes it at once
        text = d.pick(AFTER_MEET[stage])
        if stage == "technique":
            text += TECHNIQUES[ctx["tech"]]["answers"][0]
        return text.format_map(s)
    if stage == "agenda":
        text = d.pick(C.INTRO_TEMPLATES) + "{dur}我{core}，{f1}。" + d.pick(GOALS)
    elif stage == "explore":
        if kind == "follow":
            text = EXPLORE_FOLLOW_ANSWERS[(ctx["start"] + k - 1) % len(EXPLORE_FOLLOW_ANSWERS)]
        else:
            text = d.pick(EXAMPLE_OPENERS) + "{situation}。当时我{f1}，{f2}。"
    elif stage == "identify":
        text = d.pick(C.THOUGHT_OPENERS) + "“{thought}。”" + d.pick(BELIEFS)
    elif stage == "socratic":
        text = SOCRATIC_ANSWERS[(ctx["start"] + k) % len(SOCRATIC_ANSWERS)]
    elif stage == "technique":
        answers = TECHNIQUES[ctx["tech"]]["answers"]
        text = answers[min(k - 1, len(answers) - 1)]
    elif stage == "homework":
        text = d.pick(HOMEWORK_ANSWERS)
    elif stage == "summary":
        text = d.pick(FEEDBACK)
    elif k == 1:
        text = d.pick(SAFETY_ANSWERS)
    else:
        text = d.pick(SAFETY_PLAN_ANSWERS)
    return text.format_map(s)


def _compose(d: _Draw, seed: int, index: int, crisis_ppm: int, min_turns: int, max_turns: int) -> dict:
    """One session: the intake, the turn plan, then counsellor and client turns in order from the same draws."""
    it = _intake(d, crisis_ppm)
    turns = min_turns + d.below(max_turns - min_turns + 1)
    specs, crisis_at, resist_at = _turn_specs(d, turns, it["crisis"])
    s = it["slots"]
    ctx = {"tech": it["tech"], "d": it["d"], "crisis": it["crisis"], "start": d.below(7)}
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    arc, seen = [], {}
    resisted, crisis_turn = [], None
    for t, (stages, kind) in enumerate(specs):
        text = _counsellor(d, stages, kind, seen, s, ctx)
        if t and specs[t - 1][0] == [SAFETY] and stages != [SAFETY]:
            text = d.pick(AFTER_SAFETY) + text  # back to the session's arc once the safety turns are done
        messages.append({"role": "assistant", "content": text})
        arc.append("+".join(stages))
        if len(messages) - 1 == turns:
            break
        if t == resist_at:
            ctx["resist"] = d.below(len(RESISTANCE))  # the meeting turn answers this push-back
            text = RESISTANCE[ctx["resist"]][0].format(why=d.pick(RESISTANCE_WHY))
            resisted.append(len(messages))
        else:  # a folded turn is answered stage by stage, for each question it asked
            text = "".join(_client(d, st, kind, seen[st], s, ctx) for i, st in enumerate(stages) if _asked(stages, i))
        if t == crisis_at:
            text += d.pick(CRISIS_DISCLOSURES)
            crisis_turn = len(messages)
        messages.append({"role": "user", "content": text})
    return {
        "id": f"session-{seed}-{index:09d}",
        "messages": messages,
        "meta": {
            "intake": it["intake"],
            "arc": arc,
            "crisis": it["crisis"],
            "crisis_turn": crisis_turn,
            "resistance_turns": resisted,
            "turns": turns,
            "seed": seed,
            "generator": "template-sessions",
            "prompt_version": PROMPT_VERSION,
        },
    }


def session_at(seed: int, index: int, crisis_fraction: float = 0.02, min_turns: int = 8, max_turns: int = 24) -> dict:
    """The session at `index` for `seed`: a pure function of its arguments."""
    d = _Draw(_seed_prefix(seed) + index.to_bytes(8, "little"))
    return _compose(d, seed, index, round(crisis_fraction * _PPM), min_turns, max_turns)


def intake_at(seed: int, index: int, crisis_fraction: float = 0.02) -> tuple[dict, dict]:
    """The intake that session_at(seed, index, crisis_fraction) starts from (the same first draws), and the
    client behind it: {crisis, persona, age, feelings, duration}. `synth api --sessions` builds its client
    simulator from these, so the API sessions and the offline ones share one intake distribution."""
    it = _intake(_Draw(_seed_prefix(seed) + index.to_bytes(8, "little")), round(crisis_fraction * _PPM))
    s = it["slots"]
    client = {
        "crisis": it["crisis"],
        "persona": s["full"],
        "age": s["age"],
        "feelings": [s["f1"], s["f2"]],
        "duration": s["dur"],
    }
    return it["intake"], client


def iter_sessions(
    seed: int, start: int, stop: int, crisis_fraction: float = 0.02, min_turns: int = 8, max_turns: int = 24
):
    """Yield sessions start..stop-1 one at a time (nothing is accumulated)."""
    for i in range(start, stop):
        yield session_at(seed, i, crisis_fraction, min_turns, max_turns)


# ---------------------------------------------------------------------------------------------- writing


def _write_shard(job: dict, progress: Callable[[int], None] | None = None) -> dict:
    """Generate sessions [start, stop) into one shard; written under a hidden temp name, renamed when complete."""
    t0, c0 = time.perf_counter(), time.process_time()
    final = Path(job["path"])
    tmp = final.with_name(f".{final.name}.inprogress")
    sha = hashlib.sha256()
    topics: dict[str, int] = {}
    stages: dict[str, int] = {}
    crisis = resist = turns = jsonl_bytes = 0
    raw = open(tmp, "wb")
    out = (
        zstandard.ZstdCompressor(level=_ZSTD_LEVEL).stream_writer(raw, closefd=True)
        if job["compress"] == "zstd"
        else raw
    )

    def flush(batch: list[str]) -> None:
        nonlocal jsonl_bytes
        data = ("\n".join(batch) + "\n").encode()
        jsonl_bytes += len(data)
        sha.update(data)
        out.write(data)
        if progress:
            progress(len(batch))
        batch.clear()

    try:
        batch: list[str] = []
        for i in range(job["start"], job["stop"]):
            rec = session_at(job["seed"], i, job["crisis_fraction"], job["min_turns"], job["max_turns"])
            batch.append(_encode(rec))
            meta = rec["meta"]
            t = meta["intake"]["topic"]
            topics[t] = topics.get(t, 0) + 1
            for a in meta["arc"]:
                for st in a.split("+"):
                    stages[st] = stages.get(st, 0) + 1
            crisis += meta["crisis"]
            resist += bool(meta["resistance_turns"])
            turns += meta["turns"]
            if len(batch) == _BATCH:
                flush(batch)
        if batch:
            flush(batch)
    finally:
        out.close()
    os.replace(tmp, final)
    return {
        "shard": job["shard"],
        "file": final.name,
        "first_index": job["start"],
        "sessions": job["stop"] - job["start"],
        "bytes": final.stat().st_size,
        "jsonl_bytes": jsonl_bytes,  # uncompressed, what MB/s counts
        "content_sha256": sha.hexdigest(),  # of the uncompressed JSONL, so none and zstd runs compare
        "crisis": crisis,
        "resistance": resist,
        "turns": turns,
        "topics": topics,
        "stage_turns": stages,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def check_turns(cfg: SynthConfig) -> None:
    """min_turns <= max_turns (each field's own range is checked by the config type)."""
    if cfg.min_turns > cfg.max_turns:
        raise ConfigError(
            f"synth.min_turns ({cfg.min_turns}) is larger than synth.max_turns ({cfg.max_turns}); "
            "lower min_turns or raise max_turns"
        )


def run_synth_sessions(cfg: SynthConfig) -> dict:
    """Generate cfg.num_records sessions into cfg.num_shards shards under cfg.out_dir; return the summary.

    Writes the shards, `synth_summary.json` (counts, sessions/s, topic and stage histograms, per-shard sizes and
    content hashes) and an empty `_SUCCESS` marker last. Raises ConfigError on bad settings before any work.
    """
    check_turns(cfg)
    out, jobs = shard_jobs(cfg, min_turns=cfg.min_turns, max_turns=cfg.max_turns)
    workers = max(1, min(cfg.workers or _available_cpus(), cfg.num_shards))
    t0 = time.perf_counter()
    results = run_shard_jobs(jobs, _write_shard, workers, cfg.num_records, "session", "synth sessions")
    seconds = time.perf_counter() - t0
    summary = _summary(cfg, results, seconds, workers)
    write_metrics(out / SUMMARY_NAME, summary)
    (out / SUCCESS_NAME).write_text("")
    print_summary(
        "synth template --sessions",
        {
            "sessions": summary["sessions"],
            "seconds": round(seconds, 2),
            "sessions/s": round(summary["sessions"] / seconds) if seconds > 0 else 0,
            "MB/s (JSONL)": round(summary["jsonl_bytes"] / 2**20 / seconds, 1) if seconds > 0 else 0,
            "workers": workers,
            "shards": cfg.num_shards,
            "bytes": summary["bytes"],
            "mean turns": summary["mean_turns"],
            "crisis sessions": summary["crisis"],
            "sessions with resistance": summary["resistance"],
            "out_dir": str(out),
        },
    )
    return summary


def _summary(cfg: SynthConfig, results: list[dict], seconds: float, workers: int) -> dict:
    topics = {k: 0 for k in C.TOPICS}
    stages = {k: 0 for k in (*STAGES, SAFETY)}
    for r in results:
        for k, v in r.pop("topics").items():
            topics[k] += v
        for k, v in r.pop("stage_turns").items():
            stages[k] += v
    sessions = sum(r["sessions"] for r in results)
    cpu_seconds = sum(r["cpu_seconds"] for r in results)
    return {
        "sessions": sessions,
        "seconds": round(seconds, 3),
        "sessions_per_s": round(sessions / seconds, 1) if seconds > 0 else None,
        "sessions_per_cpu_s": round(sessions / cpu_seconds, 1) if cpu_seconds > 0 else None,
        "workers": workers,
        "shards": cfg.num_shards,
        "compress": cfg.compress,
        "bytes": sum(r["bytes"] for r in results),
        "jsonl_bytes": sum(r["jsonl_bytes"] for r in results),
        "crisis": sum(r["crisis"] for r in results),
        "crisis_fraction": cfg.crisis_fraction,
        "resistance": sum(r["resistance"] for r in results),
        "mean_turns": round(sum(r["turns"] for r in results) / sessions, 2),
        "min_turns": cfg.min_turns,
        "max_turns": cfg.max_turns,
        "seed": cfg.seed,
        "source": SOURCE,
        "prompt_version": PROMPT_VERSION,
        "topics": topics,
        "stage_turns": stages,
        "files": sorted(results, key=lambda r: r["shard"]),
    }
