"""Lung segmentation on the Chest X-ray Masks and Labels set (Shenzhen and Montgomery masks)."""

from .base import SegmentationTask

TASK = SegmentationTask(name="lung", dataset="chestmasks", classes=("background", "lung"))
