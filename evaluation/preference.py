"""pref-accuracy: how often a model prefers the chosen answer of a held-out preference pair, one rule for every model
so an SFT and a DPO model compare.

    pairs      eval.pairs (a file in the pair format prepare's data.format: preference reads: ours, OpenAI's
               preference fine-tuning JSONL or TRL's), else <eval.data_dir>/heldout_pairs.jsonl when that folder
               holds preference data (prepare writes its validation pairs there), else no pref-accuracy at all.
               Pairs are parsed by prepare's own reader (data_pipeline.sources.formats, format preference); a bad
               line goes to rejects.jsonl with its reason. A prompt without a system turn gets the model's system
               prompt (export.json's, else data.system_prompt), as its questions do; heldout_pairs.jsonl carries
               the one prepare trained with
    rule       under each local model, the mean log-probability per token of each answer (its tokens and end token,
               the conversation rendered with the model's own chat template exactly as prepare encodes a training
               sequence: cbt_llm.inference.logprobs); a pair counts when the chosen answer's mean is strictly higher
               (a tie counts against). The score is the share of pairs, with n and a Wilson 95% interval
    not computed  for an endpoint (an OpenAI-compatible API gives no log-probabilities of a given answer) and for a
               --predictions file: "n/c" in the table, the reason in report.md

Each pair's two means go to preference.jsonl ({model, id, crisis, chosen_mean, rejected_mean, chosen_tokens,
rejected_tokens, correct}). Local models are data parallel as generation is: under torchrun every rank scores its
share of the batches and rank 0 gathers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.record import RecordError
from data_pipeline.io import iter_lines
from data_pipeline.shards import MANIFEST_FILE, load_manifest, objective_of
from data_pipeline.sources.formats import PairExample, to_examples
from evaluation.stats import wilson

METRIC = "pref-accuracy"
VERSION = "pref-accuracy:v1"
CI_METHOD = "wilson|z:1.96"
# put where a pair's prompt has no system turn, then replaced by each model's own system prompt
_NO_SYSTEM = "\x00cbt-llm:no-system-turn\x00"


@dataclass
class PairSet:
    pairs: list[PairExample]
    source: str
    sha256: str
    rejects: list[dict]

    @property
    def signature(self) -> str:
        return (
            f"{VERSION}|pairs:{self.source} sha256:{self.sha256[:12]} n{len(self.pairs)}"
            "|rule:mean log-prob per token of answer+end token (chat template as prepare encodes), "
            "chosen strictly higher; a tie counts against"
        )

    def facts(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "n": len(self.pairs), "rejects": len(self.rejects)}

    def items(self, system: str) -> list[tuple[list[dict], str]]:
        """(prompt messages, answer) of every pair's chosen then rejected answer, the system turn filled in."""
        out = []
        for p in self.pairs:
            msgs = [
                {**m, "content": system} if m["role"] == "system" and m["content"] == _NO_SYSTEM else m
                for m in p.messages
            ]
            out += [(msgs, p.chosen), (msgs, p.rejected)]
        return out


def pairs_path(cfg: Config) -> tuple[Path | None, bool]:
    """(the pairs file, whether eval.pairs named it); (None, False) when there is none to read."""
    ec = cfg.eval
    if ec.pairs:
        return Path(ec.pairs), True
    data = Path(ec.data_dir)
    try:  # a glance first: an SFT folder (or none) is no business of this metric
        glance = json.loads((data / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, False
    if not isinstance(glance, dict) or objective_of(glance) != "preference":
        return None, False
    man = load_manifest(data)  # a preference folder is read: checked whole
    if "heldout_pairs" not in man:
        raise ConfigError(f"eval.data_dir: '{data}' has no heldout_pairs.jsonl (an older prepare); re-run prepare")
    return data / man["heldout_pairs"]["path"], False


def load_pairs(path: Path) -> PairSet:
    """The pairs of a file (prepare's preference reader: three shapes), in file order, and the bad lines."""
    if not path.is_file():
        raise ConfigError(f"eval.pairs: '{path}' not found; a JSONL of preference pairs (e.g. heldout_pairs.jsonl)")
    pairs: list[PairExample] = []
    rejects: list[dict] = []
    seen: set[str] = set()
    for n, line in iter_lines(path):
        source = f"{path}:{n}"
        try:
            obj = json.loads(line.decode("utf-8"))
            (ex,) = to_examples(obj, "preference", _NO_SYSTEM, source)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            rejects.append({"id": None, "source": source, "reason": f"pairs: not valid JSON ({exc})"})
            continue
        except RecordError as exc:
            rid = obj.get("id") if isinstance(obj, dict) else None
            rejects.append({"id": rid, "source": source, "reason": f"pairs: {exc.reason}: {exc.detail}"})
            continue
        if ex.example_id in seen:
            rejects.append({"id": ex.example_id, "source": source, "reason": f"pairs: duplicate id {ex.example_id}"})
            continue
        seen.add(ex.example_id)
        pairs.append(ex)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return PairSet(pairs, str(path), sha, rejects)


def load_pair_set(cfg: Config) -> PairSet | None:
    """The held-out pairs this eval scores (see the module docstring), or None when there are none."""
    path, named = pairs_path(cfg)
    if path is None:
        return None
    pairs = load_pairs(path)
    if not pairs.pairs:
        field = "eval.pairs" if named else "eval.data_dir"
        raise ConfigError(f"{field}: no usable pair in '{path}' ({len(pairs.rejects)} rejected)")
    return pairs


def score_pairs(generator, pair_set: PairSet, system: str, ec, rank: int, world: int) -> list[dict] | None:
    """One row per pair under a local generator's model (rank 0; None elsewhere)."""
    from cbt_llm.inference.logprobs import answer_logprobs

    lps = answer_logprobs(
        generator.model,
        generator.tokenizer,
        pair_set.items(system),
        device=generator.device,
        batch_tokens=ec.logprob_batch_tokens,
        rank=rank,
        world_size=world,
        progress=rank == 0,
        desc="eval: pref-accuracy log-probs",
    )
    if lps is None:
        return None
    rows = []
    for p, c, r in zip(pair_set.pairs, lps[0::2], lps[1::2]):
        rows.append(
            {
                "id": p.example_id,
                "crisis": p.crisis,
                "chosen_mean": c.mean,
                "rejected_mean": r.mean,
                "chosen_tokens": c.tokens,
                "rejected_tokens": r.tokens,
                "correct": c.mean > r.mean,
            }
        )
    return rows


def metric(rows: list[dict], pair_set: PairSet) -> dict:
    """pref-accuracy from score_pairs' rows: the share correct, n, k and a Wilson 95% interval."""
    n, k = len(rows), sum(r["correct"] for r in rows)
    return {
        "score": k / n if n else None,
        "n": n,
        "k": k,
        "per_sample": [float(r["correct"]) for r in rows],
        "ci95": list(wilson(k, n)) if n else None,
        "ci_method": CI_METHOD if n else None,
        "signature": pair_set.signature,
        **({} if n else {"note": "not computed: no pair scored"}),
    }


def not_computed(pair_set: PairSet, why: str) -> dict:
    return {"score": None, "n": 0, "ci95": None, "signature": pair_set.signature, "note": f"not computed: {why}"}
