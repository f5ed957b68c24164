"""Task behaviour by kind: ``build(definition)`` turns a ``registry.Task`` definition (name,
dataset, kind, classes, ...) into the object the stages use (head, shard check, targets,
records, metrics; ``base.py``). ``TASKS`` holds the paper's four tasks, built from the
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

TASKS = {name: build(t) for name, t in registry.TASKS.items()}

__all__ = ["KINDS", "TASKS", "ClassificationTask", "DetectionTask", "MultilabelTask",
           "RegressionTask", "SegmentationTask", "build"]
