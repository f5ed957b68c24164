"""A task's definition (``registry.Task``) from a fine-tune config's ``tasks.<name>`` entry,
and the rules a definition obeys: enough classes for its kind, a headline among its metrics,
mirror classes for a task that is flipped. The registry holds the paper's four definitions as
data; these rules make any definition, the paper's or the user's, one that holds together."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from muscle_hpc import registry
from muscle_hpc.config.loader import NAME_PATTERN, ConfigError

if TYPE_CHECKING:
    from muscle_hpc.config.finetune import FtTask

_DEFINITION_KEYS = ("dataset", "kind", "classes", "title", "headline", "box_categories",
                    "target")


def task_definition(name: str, entry: FtTask) -> registry.Task:
    """``tasks.<name>`` as a ``registry.Task``: the paper's definition with the keys the entry
    sets, or the entry's own for a new task. Raises ``ConfigError`` on one that is incomplete
    or contradicts itself (a kind without its classes, a headline the kind does not report)."""
    given = {k: getattr(entry, k) for k in _DEFINITION_KEYS if getattr(entry, k)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    if entry.flip_pairs is not None:  # {} is a statement too: no class mirrors another
        given["flip_pairs"] = tuple(entry.flip_pairs.items())
    key = f"tasks.{name}"
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{key}: a task name is letters, digits, '_' and '-' (it names run "
                          f"directories), not {name!r}")
    if name in registry.TASKS:
        defn = dataclasses.replace(registry.TASKS[name], batch_size=entry.batch_size, **given)
    else:
        missing = [k for k in ("dataset", "kind") if k not in given]
        if missing:
            raise ConfigError(f"{key}: not one of the paper's tasks "
                              f"({', '.join(registry.TASK_NAMES)}), so it needs "
                              f"{' and '.join(missing)} (see the README, your own data)")
        defn = registry.Task(name=name, title=given.pop("title", name),
                             classes=given.pop("classes", ()), batch_size=entry.batch_size,
                             **given)
    if defn.classes or defn.kind == "regression":
        check_definition(defn)
    return defn


def with_classes(defn: registry.Task, names) -> registry.Task:
    """``defn`` with the class names its dataset's manifest gives, for a task of the user's
    that lists none (``tasks.<name>.classes`` may be left out: the converter recorded them)."""
    if defn.classes or defn.kind == "regression":
        return defn
    defn = dataclasses.replace(defn, classes=tuple(names))
    check_definition(defn, " (from its dataset's manifest)")
    return defn


def check_definition(defn: registry.Task, where: str = "") -> None:
    """A definition must hold together: enough classes for its kind, distinct names, one box
    category per detection class, a headline among its metrics. Raises ``ConfigError``."""
    key = f"tasks.{defn.name}"
    least = {"classification": 2, "multilabel": 1, "regression": 0, "segmentation": 2,
             "detection": 1}[defn.kind]
    if len(defn.classes) < least:
        raise ConfigError(f"{key}.classes: a {defn.kind} task needs at least {least} "
                          f"(segmentation: the background first), got {list(defn.classes)}"
                          f"{where}")
    if defn.kind == "regression" and defn.classes:
        raise ConfigError(f"{key}.classes: a regression task has none (it predicts the "
                          f"shard field {defn.target!r})")
    if len(set(defn.classes)) != len(defn.classes) or any(
            not c or "/" in c or "\n" in c for c in defn.classes):
        raise ConfigError(f"{key}.classes: names must be distinct, non-empty, without '/': "
                          f"{list(defn.classes)}{where}")
    if defn.kind == "detection" and len(defn.box_categories) != len(defn.classes):
        raise ConfigError(f"{key}.box_categories: one shard category id per class "
                          f"({len(defn.classes)}), got {list(defn.box_categories)}")
    if defn.headline not in defn.metrics:
        raise ConfigError(f"{key}.headline: {defn.headline!r} is not one of its metrics "
                          f"({', '.join(defn.metrics)})")
    paired = [c for pair in defn.flip_pairs or () for c in pair]
    foreground = defn.classes[1:] if defn.kind == "segmentation" else defn.classes
    if set(paired) - set(foreground) or len(set(paired)) != len(paired):
        raise ConfigError(f"{key}.flip_pairs: {{class: its mirror class}}, each of "
                          f"{list(foreground)} at most once and never its own mirror; got "
                          f"{dict(defn.flip_pairs or ())}{where}")


def check_flips(defn: registry.Task, flip_prob: float) -> None:
    """A task whose classes name a side and have no mirror class cannot be flipped: the
    flip would put each on the other side of the body under its own name. Raises
    ``ConfigError``."""
    lonely = defn.unpaired_sides
    if flip_prob > 0 and lonely:
        which = (f"class {lonely[0]} names a side and has" if len(lonely) == 1 else
                 f"classes {', '.join(lonely)} name a side and have")
        raise ConfigError(f"tasks.{defn.name}.flip_pairs: {which} no mirror class among "
                          f"{list(defn.classes)}, so a flip (data.flip_prob={flip_prob:g}) "
                          f"would show it on the other side under its own name; give "
                          f"tasks.{defn.name}.flip_pairs ({{class: its mirror}}, {{}} if none "
                          f"mirrors) or set data.flip_prob=0")
