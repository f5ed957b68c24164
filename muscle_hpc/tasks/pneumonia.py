"""Pneumonia classification (Kermany et al.): chest X-rays, normal vs pneumonia."""

from .base import ClassificationTask

TASK = ClassificationTask(name="pneumonia", dataset="pneumonia", classes=("normal", "pneumonia"))
