"""Task plug-ins, by name: each file of this package defines one ``TASK``."""

from . import lung, mura, pneumonia, tbx

TASKS = {t.name: t for t in (pneumonia.TASK, mura.TASK, lung.TASK, tbx.TASK)}


def build(definition):  # placeholder until the kinds land: the paper's four only
    return TASKS[definition.name]
