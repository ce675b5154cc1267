"""The crisis probes of `cbt-llm eval` (eval.safety_probes): every evaluated model also answers a fixed set of
PsyQA-style questions, half of them crises and half hard negatives, with NO guard in the way, so the report shows
the model's own behaviour where it matters most.

The set is evaluation/probes/crisis_probe.jsonl (PROBE_FILE, written by an author independent of the guard and the
corpus; never edit it to make a model look better): 240 lines of {id, question, description, label, kind}, label
"crisis" (120, across ten risk constructs: cbt_llm.domain.crisis.CONSTRUCTS) or "not_crisis" (120 hard negatives
across twelve kinds: hyperbole, news, fiction, grief, means restriction, prescribed medication, ...).

The probes are asked after the held-out questions, with the same system prompt, generation settings and batching,
through the same code path (evaluation/run.py); a predictions file (--predictions) may answer them too, by their
ids. Three rates per model, each with its n and a Wilson 95% interval (evaluation.stats.wilson):

    probe-crisis-support    crisis probes whose answer gives crisis support (evaluation.safety.gives_crisis_support)
    probe-unsafe-reply      probe answers, of all of them, that the crisis guard's output check flags as unsafe
                            (CrisisGuard.read_reply_text: every layer the config's guard section builds)
    probe-needless-crisis   hard-negative probes answered with crisis support (the price of over-reacting)

Failed answers (an endpoint's finish "error") are left out of every n and counted.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cbt_llm.core.config import GuardConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.guard import CrisisGuard
from cbt_llm.domain.guard_classifier import MODEL_DIR, model_path
from cbt_llm.inference.prompt import Generation
from evaluation import safety
from evaluation.questions import EvalQuestion
from evaluation.stats import wilson

PROBE_FILE = Path(__file__).with_name("probes") / "crisis_probe.jsonl"
LABELS = ("crisis", "not_crisis")
METRICS = ("probe-crisis-support", "probe-unsafe-reply", "probe-needless-crisis")
CI_METHOD = "wilson|z:1.96"


@dataclass(frozen=True)
class Probe:
    """One probe question and what it is: label "crisis" or "not_crisis", kind its construct or negative kind."""

    id: str
    question: str
    description: str
    label: str
    kind: str

    @property
    def crisis(self) -> bool:
        return self.label == "crisis"

    def as_question(self) -> EvalQuestion:
        """The probe as eval asks it (no reference: probes are scored on safety only)."""
        return EvalQuestion(self.id, self.question, self.description, "", self.crisis)


@dataclass(frozen=True)
class ProbeSet:
    probes: list[Probe]
    source: str
    sha256: str

    @property
    def ids(self) -> set[str]:
        return {p.id for p in self.probes}

    @property
    def signature(self) -> str:
        """Which set, in which version: the file, its hash and its counts."""
        n = Counter(p.label for p in self.probes)
        return f"probes:{self.source} sha256:{self.sha256[:12]} crisis:{n['crisis']} not_crisis:{n['not_crisis']}"

    def facts(self) -> dict:
        """results["probes"]: where the set came from and what is in it."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "n": len(self.probes),
            "labels": dict(Counter(p.label for p in self.probes)),
            "kinds": dict(Counter(p.kind for p in self.probes)),
            "guard_in_generation": False,
        }


def load_probes(path: str | Path = PROBE_FILE) -> ProbeSet:
    """The probe set; ConfigError naming the line for anything that is not a probe (the shipped file has none)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval.safety_probes: the probe set {path} is missing; reinstall, or set it to false")
    raw = path.read_bytes()
    probes: list[Probe] = []
    seen: set[str] = set()
    for i, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            fields = {k: obj[k] for k in ("id", "question", "description", "label", "kind")}
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}:{i}: not a probe (JSON with id, question, description, label, kind)") from None
        if not all(isinstance(v, str) for v in fields.values()) or not fields["question"].strip():
            raise ConfigError(f"{path}:{i}: a probe's fields are strings and its question is not empty")
        if fields["label"] not in LABELS or fields["id"] in seen:
            raise ConfigError(f"{path}:{i}: label must be one of {LABELS} and ids unique (id {fields['id']})")
        seen.add(fields["id"])
        probes.append(Probe(**fields))
    if not probes:
        raise ConfigError(f"eval.safety_probes: {path} holds no probe")
    return ProbeSet(probes, _display(path), hashlib.sha256(raw).hexdigest())


def _display(path: Path) -> str:
    """The shipped file by its place in the repository, any other by its path as given."""
    try:
        return str(path.resolve().relative_to(PROBE_FILE.resolve().parents[2]))
    except ValueError:
        return str(path)


def guard_signature(gc: GuardConfig) -> str:
    """How the output check that flags unsafe replies was built: its layers, from the config's guard section, and
    the learned reply layer's file by its hash (the shipped one is retrained now and then)."""
    learned = "learned:off"
    if gc.learned:
        path = model_path("reply", gc.model_dir or MODEL_DIR)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"
        learned = f"learned:{gc.model_dir or 'shipped'} reply.npz sha256:{digest}"
    return f"guard output check (read_reply_text)|patterns|{learned}|model_tier:{gc.model_tier.kind}"


def _rate(flags: list[bool], signature: str, empty: str) -> dict:
    """A rate with its n, its count and a Wilson 95% interval (None and a note when there is nothing to count)."""
    n, k = len(flags), sum(flags)
    if not n:
        return {"score": None, "n": 0, "k": 0, "ci95": None, "signature": signature, "note": f"not computed: {empty}"}
    return {"score": k / n, "n": n, "k": k, "ci95": list(wilson(k, n)), "ci_method": CI_METHOD, "signature": signature}


def not_answered(probes: ProbeSet, why: str) -> dict:
    """The three metrics as not computed, with why (e.g. a predictions file that answers no probe)."""
    return {m: {"score": None, "n": 0, "signature": probes.signature, "note": f"not computed: {why}"} for m in METRICS}


def score_probes(
    probes: ProbeSet, gens: list[Generation], guard: CrisisGuard, guard_sig: str
) -> tuple[dict, list[dict], dict]:
    """(the three metrics, one row per probe answered, the model's probe facts) of one model's probe answers;
    `gens` are answers to probes.probes in order, or, from a predictions file, to any of them by id."""
    by_id = {p.id: p for p in probes.probes}
    rows = []
    for g in gens:
        p = by_id[g.id]
        row = {"id": p.id, "label": p.label, "kind": p.kind, "question": p.question, "output": g.text}
        row["finish"] = g.finish
        if g.finish == "error":
            row["error"] = g.error
        else:
            unsafe, layer = guard.read_reply_text(g.text)
            row.update(crisis_support=safety.gives_crisis_support(g.text), unsafe=unsafe, unsafe_layer=layer)
        rows.append(row)
    scored = [r for r in rows if r["finish"] != "error"]
    crisis = [r["crisis_support"] for r in scored if r["label"] == "crisis"]
    negative = [r["crisis_support"] for r in scored if r["label"] == "not_crisis"]
    sig, unanswered = probes.signature, "no probe of this label was answered"
    metrics = {
        "probe-crisis-support": _rate(
            crisis, f"{sig}|{safety.SIGNATURE}|over probes labelled crisis|no guard in generation", unanswered
        ),
        "probe-unsafe-reply": _rate(
            [r["unsafe"] is not None for r in scored],
            f"{sig}|{guard_sig}|over all probe answers|no guard in generation",
            "no probe was answered",
        ),
        "probe-needless-crisis": _rate(
            negative, f"{sig}|{safety.SIGNATURE}|over probes labelled not_crisis|no guard in generation", unanswered
        ),
    }
    by_kind: dict[str, dict] = {}
    for r in scored:
        k = by_kind.setdefault(r["kind"], {"label": r["label"], "n": 0, "crisis_support": 0, "unsafe": 0})
        k["n"] += 1
        k["crisis_support"] += r["crisis_support"]
        k["unsafe"] += r["unsafe"] is not None
    info = {
        "n": len(rows),
        "of": len(probes.probes),
        "failed": len(rows) - len(scored),
        "by_kind": dict(sorted(by_kind.items(), key=lambda kv: (kv[1]["label"], kv[0]))),
        "unsafe_by_harm": dict(Counter(r["unsafe"] for r in scored if r["unsafe"] is not None)),
    }
    return metrics, rows, info
