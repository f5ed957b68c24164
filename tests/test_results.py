"""results.json: one schema, written by ``results.record`` and read by ``results.parse``."""

import json
import math
from pathlib import Path

import pytest

from muscle_hpc import registry, results
from muscle_hpc.registry import FinetuneRun


def written(run: FinetuneRun, definition: registry.Task, test: dict) -> dict:
    """What the fine-tune stage writes, through JSON and back (NaN included)."""
    return json.loads(json.dumps(results.record(run, definition, test, best_epoch=3,
                                                history=[])))


def test_a_record_reads_back_as_the_run_and_the_definition_it_was_written_with():
    run = FinetuneRun("knee", "muscle", "r50", "linear", 0.1)
    knee = registry.Task("knee", "knee_xr", "classification", "Knee grade",
                         ("normal", "mild", "severe"), headline="acc")
    test = {m: 0.5 for m in knee.metrics} | {"auc_ci": [0.4, 0.6], "n": 12}
    test["sen_mild"] = math.nan
    data = written(run, knee, test)
    assert data["schema"] == results.SCHEMA == 2
    r = results.parse(data, Path("finetune") / run.name / "results.json")
    assert r.run == run
    assert (r.definition.name, r.definition.dataset, r.definition.kind, r.definition.title,
            r.definition.classes, r.definition.headline) == \
        ("knee", "knee_xr", "classification", "Knee grade", ("normal", "mild", "severe"), "acc")
    assert r.definition.metrics == knee.metrics
    assert math.isnan(r.test["sen_mild"]) and r.ci == {"auc": (0.4, 0.6)} and r.n == 12
    paper = results.parse(written(FinetuneRun("lung", "scratch", "r18"), registry.TASKS["lung"],
                                  {"dice": 0.9, "miou": 0.8}),
                          Path("lung_r18_scratch/results.json"))
    assert paper.definition is registry.TASKS["lung"]


def test_a_file_without_a_schema_is_read_as_schema_1_written_before_the_linear_probe():
    old = {"task": "pneumonia", "init": "scratch", "backbone": "r18", "kind": "classification",
           "test": {"acc": 0.5, "sen": 0.5, "spe": 0.5, "auc": 0.5}}
    r = results.parse(old, Path("pneumonia_r18_scratch/results.json"))
    assert r.run == FinetuneRun("pneumonia", "scratch", "r18", "finetune", 1.0)


@pytest.mark.parametrize("change, reason", [
    ({"schema": 3}, "written in results schema 3 by a newer muscle-hpc; this one reads "
                    "schemas 1-2"),
    ({"schema": "2"}, "schema '2' is not a schema version"),
    ({"schema": 2, "protocol": None}, "unknown protocol None"),
])
def test_a_schema_this_version_cannot_read_is_refused_naming_it(change, reason):
    data = written(FinetuneRun("lung", "scratch", "r18"), registry.TASKS["lung"],
                   {"dice": 0.9, "miou": 0.8})
    data.update(change)
    with pytest.raises(ValueError) as e:
        results.parse(data, Path("lung_r18_scratch/results.json"))
    assert str(e.value) == reason
    del data["protocol"]  # schema 2 always says it; only schema 1 may leave it out
    data["schema"] = 2
    with pytest.raises(ValueError, match="^no 'protocol'$"):
        results.parse(data, Path("lung_r18_scratch/results.json"))
