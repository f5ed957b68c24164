"""TensorBoard on rank 0 only, one run folder across resumes.

Other ranks get a logger that does nothing, so stage code calls it unconditionally. On resume,
``purge_step`` drops whatever the killed run logged after its last checkpoint, so curves do not
fold back on themselves.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

# TensorBoard's writer (~3 s with torch) and reader are imported where used: only rank 0 writes.


class RunLogger:
    def __init__(self, log_dir: Path, rank: int = 0, purge_step: int | None = None):
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, step: int, prefix: str = "", **values) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{prefix}{name}", float(value), step)

    def image_grid(self, tag: str, images: torch.Tensor, step: int, nrow: int = 8) -> None:
        """Images (N, C, H, W) of any range, each rescaled to [0, 1] for display."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid

        x = images.detach().float().cpu()
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        grid = make_grid((x - lo) / (hi - lo).clamp_min(1e-6), nrow=nrow, padding=2)
        self.writer.add_image(tag, grid, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``log_dir``: tag -> [(step, value)], by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return dict(out)


def read_image_tags(log_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]
