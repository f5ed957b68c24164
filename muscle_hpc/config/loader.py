"""Typed YAML configs with ``a.b=value`` overrides, checked before anything runs; this module
knows no stage, task or dataset.

A config is a tree of frozen dataclasses (a *schema*); ``load(path, overrides, schema)`` reads
the YAML, applies the overrides (each value parsed by ``yaml.safe_load``, so ``model.K=4096``,
``model.mlp=false`` and ``data.datasets=[nih,mura]`` mean what they say) and converts every
value to its field's type. Any mistake is a ``ConfigError`` of one line naming the key: a typo
in a key fails here, with the closest valid key suggested, instead of silently using a default
hours into a Slurm job. Fields declare ranges and choices with ``opt()``, checked here once;
what relates fields to each other or to the world size is each stage schema's own check.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

# What a name that becomes a directory may be (a task or dataset of the user's).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ConfigError(ValueError):
    """A config mistake, said in one line that names the key."""


def opt(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
        gt: float | None = None, choices: tuple | None = None, refuse: dict | None = None,
        empty: str | None = None):
    """A dataclass field with checks: ``lo <= v <= hi``, ``v > gt``, ``v in choices`` (for a
    list, every item), and ``refuse``: values refused with their own reason. ``empty``: what
    the empty string means, for the message when a string key is given no value."""
    meta = {"lo": lo, "hi": hi, "gt": gt, "choices": choices, "refuse": refuse or {},
            "empty": empty}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def expand_path(key: str, template: str, **values: str) -> str:
    """``template`` with ``{name}`` filled from ``values``; any other placeholder is refused."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{key}: {template!r} has a placeholder other than "
                          f"{', '.join('{' + k + '}' for k in values)} ({e})") from None


# --- loading -------------------------------------------------------------------------------

def load(path: str | Path | None, overrides: list[str], schema: type):
    """``schema`` filled from the YAML at ``path`` (``None``: defaults only), then overrides.
    A file may start from another: ``base: finetune.yaml`` (relative to the file) reads that
    one first and lays this one's sections over it, key by key."""
    data = {} if path is None else read_with_bases(Path(path), ())
    for item in overrides:
        _apply_override(data, item, schema)
    return _build(schema, data, "")


def read_with_bases(p: Path, including: tuple[Path, ...] = ()) -> dict:
    """The YAML at ``p`` as a dict, laid over the file its ``base:`` names (and so on)."""
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found"
                          + (f" (the base of {including[-1]})" if including else "")) from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: YAML syntax error{_where(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, "
                          f"not {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{p}: base: expected the path of a config file, got {base!r}")
    base_path = p.parent / base
    if base_path.resolve() in {q.resolve() for q in (*including, p)}:
        raise ConfigError(f"{p}: base: {base} includes itself")
    return _merged(read_with_bases(base_path, (*including, p)), data)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out




def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: str | Path | None = None) -> str:
    """The resolved config as YAML (what ``load`` reads back to an equal config); written to
    ``path`` when given, so a run dir records exactly what ran."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two ``to_dict`` trees."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{at}: {problem}"


def entry_schema(tp) -> type | None:
    """The entry schema of a mapping section (``dict[str, Schema]``: entries named by the
    user, such as ``tasks.my_task``), else None."""
    if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
        return typing.get_args(tp)[1]
    return None


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of ``schema``, sections included (a mapping section's: those of its
    default entries, for suggestions)."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        out.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            out += schema_keys(hints[f.name], key + ".")
        elif entry_schema(hints[f.name]) and f.default_factory is not dataclasses.MISSING:
            entry = entry_schema(hints[f.name])
            for name in f.default_factory():
                out += [f"{key}.{name}", *schema_keys(entry, f"{key}.{name}.")]
    return out


def key_type(schema: type, key: str):
    """The type of ``key``'s value (a section's schema for a section), or None if ``schema``
    has no such key; any name is an entry of a mapping section."""
    tp, parts = schema, key.split(".")
    for part in parts:
        entry = entry_schema(tp)
        if entry is not None:  # ``part`` names an entry
            tp = entry
            continue
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _unknown(key: str, schema: type) -> ConfigError:
    keys = {k.lower(): k for k in schema_keys(schema)}  # model.k is a typo of model.K, not model.m
    close = difflib.get_close_matches(key.lower(), keys, n=1, cutoff=0.6)
    if not close:  # a wrong section name hides a right leaf name: compare leaves alone
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1].lower(),
                                                               leaves, n=1, cutoff=0.8)]
    hint = f" (did you mean {keys[close[0]]}?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}")


def _apply_override(data: dict, item: str, schema: type) -> None:
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"{item!r}: an override must be key=value, e.g. model.K=4096")
    leaf = key_type(schema, key)
    if leaf is None:
        raise _unknown(key, schema)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if leaf is not str:
            raise ConfigError(f"{key}: value {text!r} is not valid YAML{_where(e)}") from None
        value = text  # a path template such as {root}/x.pth is not YAML, and need not be
    if isinstance(value, dict) and leaf is str:
        value = text
    *sections, name = key.split(".")
    node = data
    for depth, s in enumerate(sections):
        nxt = node.setdefault(s, {})
        if nxt is None:
            nxt = node[s] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(sections[:depth + 1])}: expected a section (mapping), "
                              f"got {type(nxt).__name__}")
        node = nxt
    node[name] = value


def _build(schema: type, data: Any, prefix: str, root: type | None = None, base=None):
    """``schema`` from ``data``; a key ``data`` lacks takes ``base``'s value (a default
    entry of a mapping section), else the field's default."""
    root = root or schema  # unknown keys are matched against the whole tree
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a section (mapping), "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    for k in data:
        if k not in names:
            raise _unknown(f"{prefix}{k}", root)
    values = {}
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if f.name not in data:
            if base is not None:
                values[f.name] = getattr(base, f.name)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: missing (no default)")
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            values[f.name] = _build(tp, data[f.name], key + ".", root)
        elif entry_schema(tp):
            values[f.name] = _build_entries(entry_schema(tp), data[f.name], key, root,
                                            f.default_factory())
        elif data[f.name] is None and tp is str:
            raise ConfigError(_no_value(key, f.metadata))
        else:
            values[f.name] = _check(key, _convert(key, tp, data[f.name]), f.metadata)
    return schema(**values)


def _no_value(key: str, meta) -> str:
    # Often a shell's doing: it turns key='' into key= before we see it.
    empty = meta.get("empty") or "an empty string"
    return (f"{key}: no value given: give one, or {key}='' for {empty} (on a shell command "
            f"line: {key}=\"''\")")


def _build_entries(entry: type, data: Any, key: str, root: type, defaults: dict) -> dict:
    """A mapping section: its default entries, each updated by the YAML's keys for it, then
    the YAML's new entries in its order."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a mapping of names to sections, "
                          f"got {type(data).__name__}")
    out = dict(defaults)
    for name, section in data.items():
        if not isinstance(name, str):
            raise ConfigError(f"{key}: entry names are strings, got {name!r}")
        out[name] = _build(entry, section, f"{key}.{name}.", root, defaults.get(name))
    return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(key: str, tp, v):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _convert(key, tp, v)
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(v).__name__} {v!r}")
        return {_convert(f"{key} key", args[0], k): _convert(f"{key}.{k}", args[1], x)
                for k, x in v.items()}
    if origin is list:
        if isinstance(v, str):  # data.datasets=nih,mura
            v = [s.strip() for s in v.split(",") if s.strip()]
        if not isinstance(v, list):
            raise ConfigError(f"{key}: expected a list, got {type(v).__name__} {v!r}")
        return [_convert(f"{key}[{i}]", args[0], x) for i, x in enumerate(v)]
    if tp is bool:
        if isinstance(v, bool):
            return v
    elif tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
    elif tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(v)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(v, str):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
    else:
        raise ConfigError(f"{key}: unsupported field type {_type_name(tp)} in the schema")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(v).__name__} {v!r}")


def _check(key: str, v, meta):
    if isinstance(v, dict):  # a mapping's checks are its reader's (check_definition)
        return v
    if isinstance(v, list):
        for x in v:
            _check(key, x, meta)
        if len(set(v)) != len(v):
            raise ConfigError(f"{key}: duplicate entries in {v}")
        if not v:
            raise ConfigError(f"{key}: must not be empty")
        return v
    refuse = meta.get("refuse") or {}
    if v in refuse and not isinstance(v, bool):
        raise ConfigError(f"{key}: {refuse[v]}")
    choices = meta.get("choices")
    if choices is not None and v not in choices:
        raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(str, choices))}")
    lo, hi, gt = meta.get("lo"), meta.get("hi"), meta.get("gt")
    if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{key}: must be {bounds}, got {v}")
    if v is not None and gt is not None and not v > gt:
        raise ConfigError(f"{key}: must be > {gt}, got {v}")
    return v

