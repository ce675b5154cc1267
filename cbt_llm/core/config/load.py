"""Loading the config tree: YAML, CLI flags and dotted overrides merged and validated; an unknown key names the
nearest valid one."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cbt_llm.core.config.root import Config
from cbt_llm.core.errors import ConfigError


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        full = f"{prefix}{name}"
        keys.append(full)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, full + "."))
    return keys


def _suggest(bad: str) -> str:
    close = difflib.get_close_matches(bad, _valid_keys(Config), n=1, cutoff=0.5)
    if not close:  # try matching the last component only
        leaf = bad.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in _valid_keys(Config)}
        m = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[m[0]]] if m else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ['data.seq_len=1024', 'synth.compress=zstd'] into a nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. data.seq_len=1024)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        value = yaml.safe_load(raw) if raw != "" else ""
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _first_error_line(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown config key '{loc}'{_suggest(loc)}"
    return f"{source}: config field '{loc}': {e['msg']} (got {e.get('input')!r})"


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, extra: dict | None = None
) -> Config:
    """Load YAML (optional), merge `extra` (from CLI flags) and dotted overrides, validate.

    Raises ConfigError with one line naming the field and the fix.
    """
    tree: dict = {}
    source = "config"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file '{path}' not found; pass an existing YAML (see configs/)")
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections (synth:, data:, ...)")
        tree = loaded
    if extra:
        tree = _merge(tree, extra)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_first_error_line(err, source)) from None
