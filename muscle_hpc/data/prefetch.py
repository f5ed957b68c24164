"""What every loader of this package shares: which rank it serves, and the background thread
that makes its batches ahead of the training loop (in pinned memory when they go to a GPU)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist


def rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed=True needs torch.distributed to be initialised first")
    return dist.get_rank(), dist.get_world_size()


def pins(device) -> bool:
    """Whether batches bound for ``device`` are made in pinned host memory."""
    return device is not None and torch.device(device).type == "cuda"


def prefetch(batches: Iterator, depth: int, device=None) -> Iterator:
    """Run ``batches`` in a daemon thread, ``depth`` ahead; errors re-raise in the consumer.
    On a CUDA ``device`` the thread makes it current before any CUDA call (pinned memory)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            if pins(device):
                torch.cuda.set_device(device)
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    t = threading.Thread(target=produce, daemon=True, name="muscle-loader")
    t.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # A consumer that leaves early (a break, a signal) waits for the producer to finish
        # its batch and close its readers: a thread left inside numba or FFCV code when the
        # interpreter exits aborts the process ("terminate called without an active exception").
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)
