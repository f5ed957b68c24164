"""Every key of a schema described from its source (``python -m muscle_hpc.config --describe``):
its type, default and bounds, and the comments written beside its field; like the loader, this
module knows no stage."""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any

import yaml

from muscle_hpc.config.loader import entry_schema


def field_comments(schema: type) -> dict[str, str]:
    """Each field of ``schema`` (a dataclass) to the comment that explains it in the source:
    the comment lines right above the field and the one at the end of its line, joined. A
    subclass's fields come from its own source, inherited ones from the base that declares
    them; a class made at run time (``per_task_section``) has no source and no comments."""
    out: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            continue
        out.update(_comments_by_field(source))
    return {name: out.get(name, "") for name in (f.name for f in dataclasses.fields(schema))}


def _comments_by_field(class_source: str) -> dict[str, str]:
    out: dict[str, str] = {}
    above: list[str] = []  # comment lines since the last statement
    statement: list[tokenize.TokenInfo] = []  # the logical line read so far, comments aside
    trailing: list[str] = []  # comments within it
    body_col = None  # the class body's indentation: its first statement's
    for tok in tokenize.generate_tokens(io.StringIO(class_source).readline):
        if tok.type == tokenize.COMMENT:
            (trailing if statement else above).append(tok.string.lstrip("#").strip())
        elif tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            if statement:
                first = statement[0]
                if body_col is None and first.start[1] > 0:
                    body_col = first.start[1]
                if (first.type == tokenize.NAME and first.start[1] == body_col
                        and len(statement) > 1 and statement[1].string == ":"):
                    out[first.string] = " ".join(above + trailing)
            above, statement, trailing = [], [], []
        elif tok.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENCODING):
            statement.append(tok)
    return out


def _shown(v) -> str:
    """A default as it would be written in a config file."""
    if isinstance(v, str):
        return v if v else "''"
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()


def _bounds(meta) -> str:
    parts = []
    lo, hi = meta.get("lo"), meta.get("hi")
    if meta.get("choices") is not None:
        parts.append("one of " + ", ".join(map(_shown, meta["choices"])))
    if lo is not None or hi is not None:
        parts.append(f"in [{lo:g}, {hi:g}]" if lo is not None and hi is not None
                     else f">= {lo:g}" if lo is not None else f"<= {hi:g}")
    if meta.get("gt") is not None:
        parts.append(f"> {meta['gt']:g}")
    if meta.get("refuse"):
        parts.append("not " + ", ".join(map(str, meta["refuse"])))
    return "; ".join(parts)


def describe(schema: type, prefix: str = "", default: Any = None) -> list[str]:
    """Every key of ``schema``: ``key (type) = default  [bounds]`` and, indented below, the
    comment that explains it. A mapping section (``tasks``, entries named by the user) is
    described once as ``<prefix>.<name>.*`` and its default entries listed."""
    lines: list[str] = []
    default = schema() if default is None else default
    hints, comments = typing.get_type_hints(schema), field_comments(schema)
    for f in dataclasses.fields(schema):
        key, tp, value = prefix + f.name, hints[f.name], getattr(default, f.name)
        entry = entry_schema(tp)
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, key + ".", value)
            continue
        if entry is not None:
            lines.append(f"{key}.<name>: one entry per task, the paper's by default: "
                         f"{', '.join(value)}")
            lines += ["    " + t for t in textwrap.wrap(comments[f.name], 92)]
            lines += describe(entry, key + ".<name>.", entry())
            continue
        bounds = _bounds(f.metadata)
        type_text = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
        lines.append(f"{key} ({type_text}) = {_shown(value)}"
                     + (f"  [{bounds}]" if bounds else ""))
        lines += ["    " + t for t in textwrap.wrap(comments[f.name], 92)]
    return lines
