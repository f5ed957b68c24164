"""A task's metrics on one split, with every rank evaluating its share of the split.

Ranks read disjoint parts of the split (together all of it, nothing dropped), turn their
predictions into the task's small per-sample records, and gather those; every rank then
computes the same metrics. No collective runs inside the model, so ranks may hold different
numbers of samples.
"""

from __future__ import annotations

import torch

from muscle_hpc import dist
from muscle_hpc.data.loaders import TaskLoader


@torch.no_grad()
def evaluate_records(model, task, loader: TaskLoader, device, bf16: bool = False,
                     on_batch=None) -> list:
    """``task``'s per-sample records of ``model`` (a ``MultiTaskNet``) over ``loader``'s split,
    gathered from every rank. ``on_batch(batch, outputs)`` sees each of this rank's batches."""
    was_training = model.training
    model.eval()
    records = []
    try:
        for batch in loader.epoch_batches(0):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                outputs = model.predict(task.name, batch["image"].to(device, non_blocking=True))
            records += task.records(outputs, batch)
            if on_batch is not None:
                on_batch(batch, outputs)
    finally:
        model.train(was_training)
    return dist.gather_objects(records)


def evaluate(model, task, loader: TaskLoader, device, metric_cfg, bf16: bool = False
             ) -> dict[str, float]:
    """``task``'s metrics of ``model`` over ``loader``'s split (the same on every rank), read
    as ``metric_cfg`` (a ``MetricsConfig``) says."""
    return task.score(evaluate_records(model, task, loader, device, bf16), metric_cfg)
