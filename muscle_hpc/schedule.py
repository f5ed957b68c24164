"""Learning-rate schedules as pure functions of the global step (so a resume needs only the step).

- ``cosine``: MoCo v2's cosine decay, applied per step instead of per epoch (same end points,
  no staircase), with an optional linear warm-up.
- ``cyclic_cosine``: MUSCLE eq. 1, η_t = η_min + ½(η_max − η_min)(1 + cos(2π t / T)); it starts at
  η_max, reaches η_min at T/2 and climbs back to η_max at T, so each period restarts smoothly.
- ``visit_order``: MUSCLE's reshuffled rounds, the task order of each round.
"""

from __future__ import annotations

import math

import numpy as np


def cosine(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0,
           final_lr: float = 0.0) -> float:
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def cyclic_cosine(step: int, period: int, lr_max: float, lr_min: float) -> float:
    if period <= 0:
        raise ValueError("period must be positive")
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(2.0 * math.pi * step / period))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def visit_order(tasks, round_index: int, seed: int, reshuffle: bool = True) -> list[str]:
    """The order in which round ``round_index`` visits ``tasks`` (``tasks`` as given when not
    ``reshuffle``, MUSCLE⁻⁻).

    Each round draws a fresh permutation from ``(seed, round)`` alone, so every rank computes
    the same order without talking to the others and a resumed run recomputes it. A draw is
    redone while it repeats the previous round's order or starts with the task that ended the
    previous round (two visits of one task in a row would not alternate tasks at all)."""
    tasks = list(tasks)
    if not reshuffle or len(tasks) < 2:
        return tasks
    previous = None
    for r in range(round_index + 1):
        rng = np.random.default_rng([seed, r, 0x5155])
        while True:
            order = [tasks[i] for i in rng.permutation(len(tasks))]
            if previous is None or (order != previous and order[0] != previous[-1]):
                break
        previous = order
    return previous
