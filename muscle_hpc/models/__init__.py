"""Backbones (torchvision ResNets on 1-channel X-rays) and MoCo v2."""

from .backbone import build_backbone, export_torchvision, load_imagenet_into
from .moco import MoCo, moco_collective_bytes

__all__ = ["MoCo", "build_backbone", "export_torchvision", "load_imagenet_into",
           "moco_collective_bytes"]
