"""MURA v1.1 abnormality classification: musculoskeletal radiographs, normal vs abnormal."""

from .base import ClassificationTask

TASK = ClassificationTask(name="mura", dataset="mura", classes=("negative", "positive"))
