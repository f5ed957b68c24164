"""A fine-tune's ``results.json``: one versioned schema, made by ``record`` (the fine-tune stage
writes it) and read by ``parse`` (the report and ``bench.learning`` read it).

Schema 2 (``"schema": 2``) holds the run's identity (``registry.FinetuneRun``: task, init,
backbone, protocol, ``train_fraction``), the task's definition as the stage ran it (kind,
title, classes, ``selected_by``: its headline metric, dataset), the test metrics (``test``:
each metric, ``<metric>_ci`` as [lo, hi] where bootstrapped, ``n`` images) and what the report
does not read (valid scores, history, epochs, ``init_weights``, the ROC curve). Files without
a ``schema`` key are schema 1, written before it existed: the same keys, without ``dataset``,
and without ``protocol`` before the linear probe (a whole-network fine-tune). A file of a newer
schema is refused, naming it, rather than read by guesswork.

Standard library only: the report reads results on a login node without the training stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from muscle_hpc import registry
from muscle_hpc.registry import FinetuneRun

SCHEMA = 2


@dataclass
class Result:
    """A fine-tune's test results as the report reads them. ``definition``: its task as it ran
    (the paper's four: the registry's)."""

    run: FinetuneRun
    definition: registry.Task
    path: Path
    test: dict[str, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    n: int | None = None
    roc: object = None  # as read; checked when plotted, a bad curve costs only its plot


def record(run: FinetuneRun, definition: registry.Task, test: dict, **rest) -> dict:
    """The results.json of ``run``: its identity, ``definition`` and ``test`` metrics (with
    ``n``), then ``rest`` (valid scores, history, extra results) as given."""
    return {"schema": SCHEMA, "task": run.task, "init": run.init, "backbone": run.backbone,
            "arch": run.arch, "protocol": run.protocol, "train_fraction": run.fraction,
            "kind": definition.kind, "title": definition.title, "dataset": definition.dataset,
            "classes": list(definition.classes), "selected_by": definition.headline,
            "test": test, **rest}


def as_number(value, where: str) -> float:
    if value is None:  # what a writer without NaN support would put for NaN
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} is {value!r}, not a number")
    return float(value)


def parse(data, path: Path) -> Result:
    """The result in ``data`` (a loaded results.json at ``path``); ValueError says what is
    wrong with it."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    schema = data.get("schema", 1)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise ValueError(f"schema {schema!r} is not a schema version")
    if schema > SCHEMA:
        raise ValueError(f"written in results schema {schema} by a newer muscle-hpc; this one "
                         f"reads schemas 1-{SCHEMA}")
    for key, known in (("task", None), ("backbone", registry.BACKBONES),
                       ("init", registry.INITS), ("protocol", registry.PROTOCOLS)):
        if key not in data:
            if key == "protocol" and schema == 1:  # written before the linear probe existed
                continue
            raise ValueError(f"no '{key}'")
        if not isinstance(data[key], str) or (known is not None and data[key] not in known):
            raise ValueError(f"unknown {key} {data[key]!r}")
    fraction = as_number(data.get("train_fraction", 1.0), "train_fraction")
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction {fraction} is not in (0, 1]")
    run = FinetuneRun(data["task"], data["init"], data["backbone"],
                      data.get("protocol", "finetune"), fraction)
    definition = registry.TASKS.get(run.task) or own_task(data)
    if data.get("kind", definition.kind) != definition.kind:
        raise ValueError(f"kind {data['kind']!r} is not {run.task}'s ({definition.kind})")
    # the folder is the result's identity in the grid; a copied file must not fill another cell
    if path.parent.name != run.name:
        raise ValueError(f"says {run.name}, its folder is {path.parent.name}")
    test = data.get("test")
    if not isinstance(test, dict):
        raise ValueError("no 'test' metrics")
    result = Result(run, definition, path, {}, roc=data.get("roc"))
    for m in definition.metrics:
        if m not in test:
            raise ValueError(f"no 'test.{m}'")
        result.test[m] = as_number(test[m], f"test.{m}")
        ci = test.get(f"{m}_ci")
        if ci is not None:
            if not isinstance(ci, list | tuple) or len(ci) != 2:
                raise ValueError(f"test.{m}_ci is {ci!r}, not [lo, hi]")
            result.ci[m] = (as_number(ci[0], f"test.{m}_ci"), as_number(ci[1], f"test.{m}_ci"))
    if isinstance(test.get("n"), int) and not isinstance(test["n"], bool):
        result.n = test["n"]
    return result


def own_task(data: dict) -> registry.Task:
    """A task of the user's, as its results.json defines it (kind, classes, title, headline:
    what the stage ran it with)."""
    kind, classes = data.get("kind"), data.get("classes", [])
    if kind not in registry.KINDS:
        raise ValueError(f"unknown task {data['task']!r} without a known 'kind' ({kind!r})")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"'classes' is {classes!r}, not a list of names")
    headline = data.get("selected_by", registry.HEADLINES[kind])
    if headline not in registry.task_metrics(kind, tuple(classes)):
        raise ValueError(f"selected_by {headline!r} is not one of its metrics")
    title = data.get("title") if isinstance(data.get("title"), str) else data["task"]
    dataset = data.get("dataset") if isinstance(data.get("dataset"), str) else ""
    return registry.Task(data["task"], dataset, kind, title, tuple(classes), headline=headline)
