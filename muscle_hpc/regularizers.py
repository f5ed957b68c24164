"""L2-SP, MUSCLE's cross-task memorisation (eq. 2).

At the start of each task visit the current backbone weights are kept as the anchor w⁰; while
the task trains, the loss adds ``weight · Ω(w)``, Ω(w) = α‖w − w⁰‖² + (1 − α)‖w‖², summed
over every backbone parameter. α = 1 only pulls toward the previous task's solution, α = 0 is
plain weight decay. The anchor is a full fp32 copy of the backbone on every rank (ResNet-50:
94 MB): L2-SP reads whole weights, which is one reason the stages refuse ZeRO stage 3.
"""

from __future__ import annotations

import torch
from torch import nn


class L2SP:
    def __init__(self, alpha: float, weight: float):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha, self.weight = alpha, weight
        self.anchor: dict[str, torch.Tensor] = {}

    def set_anchor(self, module: nn.Module) -> None:
        """Freeze the current weights of ``module`` as w⁰."""
        self.anchor = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    def load_anchor(self, anchor: dict[str, torch.Tensor], device) -> None:
        self.anchor = {n: t.to(device=device, dtype=torch.float32) for n, t in anchor.items()}

    def omega(self, module: nn.Module) -> torch.Tensor:
        """Ω(w) of eq. 2 (without ``weight``), differentiable in ``module``'s parameters."""
        if not self.anchor:
            raise RuntimeError("L2SP.omega before set_anchor")
        drift, size = [], []
        for n, p in module.named_parameters():
            w = p.float()
            drift.append((w - self.anchor[n]).pow(2).sum())
            size.append(w.pow(2).sum())
        return self.alpha * torch.stack(drift).sum() + (1 - self.alpha) * torch.stack(size).sum()

    def penalty(self, module: nn.Module) -> torch.Tensor:
        return self.weight * self.omega(module)
