"""Dataset plug-ins: one module per dataset, each defining ``SPEC`` (see ``base.py``)."""

from importlib import import_module

from .base import DatasetSpec

NAMES = ("nih", "shenzhen", "montgomery", "indiana", "boneage", "pneumonia", "mura",
         "chestmasks", "tbx11k")


def get_spec(name: str) -> DatasetSpec:
    if name not in NAMES:
        raise KeyError(f"unknown dataset {name!r}; choose from {', '.join(NAMES)}")
    return import_module(f"{__name__}.{name}").SPEC
