"""Task behaviour by kind: ``build(definition)`` turns a ``registry.Task`` definition (name,
dataset, kind, classes, ...) into the object the stages use (head, shard check, targets,
records, metrics; ``base.py``). ``PAPER_TASKS`` holds the paper's four tasks, built from the
registry's definitions."""

from muscle_hpc import registry

from .base import (
    KINDS,
    ClassificationTask,
    DetectionTask,
    MultilabelTask,
    RegressionTask,
    SegmentationTask,
    build,
)

PAPER_TASKS = {name: build(t) for name, t in registry.TASKS.items()}

__all__ = ["KINDS", "PAPER_TASKS", "ClassificationTask", "DetectionTask", "MultilabelTask",
           "RegressionTask", "SegmentationTask", "build"]
