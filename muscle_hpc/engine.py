"""The one training loop of the stages, and the blocks it is made of: stopping on a signal or
a non-finite value, rolling checkpoints that resume bit for bit, and step timing, around the
DeepSpeed engine of ``ds_engine``.

A stage draws its batches in its own plan (epochs, visits), sets the LR from the step
(``schedule.py``), runs its forward and loss, and hands the loss to ``TrainLoop.train_step``
(backward, gradient norm, optimizer step, report); ``TrainLoop.end_step`` then saves every N
steps, and stops every rank after the same step on a signal (checkpoint first) or a NaN/Inf
(no checkpoint). Nothing here knows which stage it serves.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist

from . import checkpoint, provenance
from .config import changed_keys, dump_yaml, to_dict
from .dist import DistEnv, gather_objects, mean, rank_world
from .ds_engine import deepspeed_safe_globals, grad_norm, load_optimizer_state, optimizer_state
from .tblog import RunLogger

if TYPE_CHECKING:
    from .runlock import RunLock

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class StopOnSignal:
    """SIGTERM (Slurm preemption, ``scancel``, torchrun's shutdown), SIGUSR2 or SIGUSR1
    (Slurm's warning before the time limit, ``--signal=USR2@120``) and SIGINT only raise a flag
    here; the loop checks it between steps, so a stop never lands mid-step or mid-write.

    ``agreed()`` is the flag of any rank (one tiny all-reduce per step): ranks receive a signal
    at slightly different times, and a checkpoint needs them all to stop after the same step.
    That costs one 8-byte collective per step, well under a millisecond, against a step of
    hundreds of milliseconds."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signum = 0
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, _frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user will not wait for the step
        self.signum = self.signum or signum

    def agreed(self, *flags: int) -> tuple[int, ...]:
        """(the first signal any rank received, 0: none; then each of ``flags``, the largest
        of any rank), the same on every rank: one all-reduce of a few integers."""
        values = (self.signum, *flags)
        if rank_world()[1] == 1:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(int(v) for v in t)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def select_kernels(deterministic: bool) -> None:
    """``run.deterministic``: GPU kernels that give the same bits every run, so a resumed GPU
    run repeats the uninterrupted one exactly (on CPU it always does). On: cuDNN's
    deterministic algorithms without autotuning, torch's deterministic implementations
    (``index_add_`` in shuffle-BN, torchvision's ``roi_align`` falls back to its Python form)
    with a warning for any op that has none, and cuBLAS's fixed workspace. Off (default):
    cuDNN autotunes each layer's algorithm for the fixed input size, the faster choice. Call
    before the first CUDA kernel; the cuBLAS setting must precede its first handle."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


class RollingCheckpoint:
    """The one checkpoint of a run directory, replaced as training goes on.

    ``RUN/checkpoint.pth`` (rank 0) holds what all ranks share (weights, MoCo queue, step,
    config); ``RUN/checkpoint/step<N>-rank<r>.pth`` holds what is each rank's own (its ZeRO
    optimizer partition, its RNG state). Every file is written atomically; rank 0 writes
    ``checkpoint.pth`` only after every rank has written its own file, and deletes the files of
    older steps only after that, so a kill at any moment leaves a complete checkpoint: the new
    one or the previous one. A resume must use the world size that wrote the checkpoint (the
    optimizer partitions and the data each rank reads depend on it)."""

    def __init__(self, run_dir: Path, rank: int, world: int):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "checkpoint.pth"
        self.rank, self.world = rank, world

    def _own_path(self, step: int, rank: int) -> Path:
        return self.run_dir / "checkpoint" / f"step{step:09d}-rank{rank}.pth"

    def save(self, step: int, shared: dict, own: dict) -> None:
        """Raises ``checkpoint.NoSpaceError`` on every rank when a file of any rank did not
        fit; the previous checkpoint then stands, and none of this step's files remain."""
        own_path = self._own_path(step, self.rank)
        full = self._agreed(_no_space(checkpoint.save, own_path, {"step": step, **own}))
        if not full:
            if self.rank == 0:
                full = _no_space(checkpoint.save, self.path,
                                 {"step": step, "world_size": self.world, **shared})
                if not full:
                    for old in (self.run_dir / "checkpoint").glob("step*-rank*.pth"):
                        if not old.name.startswith(f"step{step:09d}-"):
                            old.unlink(missing_ok=True)
            # Also keeps any rank from racing ahead to the next save while rank 0 prunes.
            full = self._agreed(full)
        if full:
            own_path.unlink(missing_ok=True)  # checkpoint.pth does not name this step
            raise checkpoint.NoSpaceError(full)

    def _agreed(self, message: str) -> str:
        """The first rank's non-empty ``message``, on every rank ("": none); a barrier."""
        return next((m for m in gather_objects([message]) if m), "")

    def save_training(self, step: int, engine, shared: dict) -> None:
        """``save`` of a training state: ``shared`` plus this rank's RNG state and the
        optimizer state, in ``shared`` without ZeRO, in each rank's own file under ZeRO
        (its partition)."""
        shared, own = dict(shared), {"rng": checkpoint.rng_state()}
        (own if engine.zero_optimization() else shared)["optimizer"] = optimizer_state(engine)
        self.save(step, shared, own)

    @staticmethod
    def restore_training(engine, resumed: tuple[dict, dict]) -> dict:
        """Undo ``save_training`` into ``engine`` and the RNGs; returns the shared part."""
        shared, own = resumed
        load_optimizer_state(engine, (own if engine.zero_optimization() else shared)["optimizer"])
        checkpoint.set_rng_state(own["rng"])
        return shared

    def load(self, config: dict | None = None, may_change: tuple[str, ...] = (),
             kept: tuple[str, ...] = ()) -> tuple[dict, dict] | None:
        """``(shared, own)`` of the last complete checkpoint, or None when the run is new.
        Raises ``ValueError`` (one line) when the checkpoint cannot be resumed here: another
        world size, or, given the run's ``config`` (a ``to_dict`` tree, stored as
        ``shared["config"]``), a different value of any key not starting with one of
        ``may_change`` or named in ``kept``, or a ``run.zero_stage`` that stores the optimizer
        state another way. Needs no process group, so a stage refuses before the rendezvous."""
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            try:
                shared = checkpoint.load(self.path)
            except Exception as e:  # noqa: BLE001 - any unpickling failure, said in one line
                raise ValueError(f"{self.path} cannot be read ({type(e).__name__}); "
                                 f"move it away to start over") from None
            if shared is None:
                return None
            if shared["world_size"] != self.world:
                raise ValueError(f"{self.path} was written by {shared['world_size']} ranks; "
                                 f"resume it with {shared['world_size']}, not {self.world} "
                                 f"(or start a new run directory)")
            if config is not None:
                diff = [d for d in changed_keys(shared["config"], config)
                        if not d.startswith(may_change) or d.split(":")[0] in kept]
                if diff:
                    raise ValueError(f"{self.path} was written with another config "
                                     f"({'; '.join(diff)}); restore it or use a new run.dir")
                was, now = (c.get("run", {}).get("zero_stage", 0) for c in (shared["config"],
                                                                             config))
                if (was > 0) != (now > 0):
                    raise ValueError(f"run.zero_stage: {self.path} was written with "
                                     f"run.zero_stage={was}, not {now}: ZeRO 1 and 2 save the "
                                     f"optimizer state split over the ranks, stage 0 whole, so "
                                     f"neither resumes the other; resume with run.zero_stage="
                                     f"{'0' if was == 0 else '1 or 2'}, or use a new run.dir")
            own_path = self._own_path(shared["step"], self.rank)
            try:
                own = checkpoint.load(own_path)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{own_path} cannot be read ({type(e).__name__})") from None
        if own is None:
            raise ValueError(f"{own_path} is missing: the checkpoint of step {shared['step']} "
                             f"is incomplete")
        return shared, own


def _no_space(write: Callable, *args) -> str:
    """``write(*args)``; the one line of its ``NoSpaceError``, else ""."""
    try:
        write(*args)
    except checkpoint.NoSpaceError as e:
        return str(e)
    return ""


class Window(NamedTuple):
    images_per_s: float
    data_wait: float  # the share of the wall time spent blocked on the loader
    seconds_per_step: float


class StepTimer:
    """Throughput and the share of wall time spent blocked on the loader, per logging window.
    Wrap the batch iterator with ``timed``; ``window`` reports and starts a new window."""

    def __init__(self):
        self.start, self.wait, self.steps = time.perf_counter(), 0.0, 0

    def timed(self, batches):
        it = iter(batches)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                self.wait += time.perf_counter() - t0
                self.steps += 1
                yield batch
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # a loader left early stops its threads now

    def window(self, images_per_step: int = 1) -> Window:
        """The window since the last call (or since the timer started)."""
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        out = Window(images_per_step * self.steps / elapsed, self.wait / elapsed,
                     elapsed / max(self.steps, 1))
        self.start, self.wait, self.steps = now, 0.0, 0
        return out


class StageError(Exception):
    """A stage cannot start or go on; its message is the one line the user sees (status 2)."""


class Start(NamedTuple):
    """What a stage's prelude (``stages.common.started``) hands to its loop."""
    stage: str
    env: DistEnv
    on_cuda: bool
    ckpt: RollingCheckpoint
    resumed: tuple[dict, dict] | None
    lock: RunLock | None  # rank 0's hold on the run directory; None on the other ranks
    ranks: list[dict]  # every rank's ``provenance.this_rank()``


# Not 2 (a refused start) nor 128 + N (stopped by a signal, checkpointed: requeue).
NONFINITE_EXIT = 1
LOST_LOCK_EXIT = 3
NO_SPACE_EXIT = 4


def duration(seconds: float) -> str:
    """``1h02m`` / ``4m05s`` / ``17s``: an ETA in a step line."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class TrainLoop:
    """What every stage's training loop shares, owned in one place: the step counter, the
    resume, TensorBoard (rank 0), the rolling checkpoint, the step body (backward, gradient
    norm, optimizer step), its report with the stage's ETA, and stopping on a signal
    (checkpoint first) or on a NaN/Inf loss or gradient norm (no checkpoint: the last good one
    stays). A stage keeps what is its own: its batch plan, its forward and loss, its extra
    checkpoint state (``state``, merged into every save) and its epoch/visit hooks.

    The non-finite check reads the loss and the gradient norm every step: one device sync per
    step (the norm was read at logging steps anyway), cheap against a step of hundreds of ms,
    and it is what lets every rank stop after the same step before a poisoned state is saved.
    Use as a context manager: leaving restores the signal handlers and closes TensorBoard.

    Args:
        stage: the name in messages (``mdmoco``, ``continual``, ``finetune``).
        cfg: the stage's config (``run.log_every_steps``, ``run.checkpoint_every_steps``).
        start: the prelude's ``Start``.
        engine, model: the DeepSpeed engine and the module whose state dict is saved.
        layout: how the data splits into steps; saved with every checkpoint, and a resume
            whose layout changed is refused (other shards, another step limit).
        total: steps of the whole stage; end: where this run stops (``run.max_steps``).
        state: the stage's own checkpoint entries, called at each save.
    """

    def __init__(self, stage: str, cfg, start: Start, engine, model, layout: dict, *,
                 total: int, end: int, state: Callable[[], dict] = dict):
        self.stage, self.cfg, self.engine, self.model = stage, cfg, engine, model
        self.ckpt, self.lock, self.rank = start.ckpt, start.lock, start.env.rank
        self.layout = layout
        self.total, self.end, self._state = total, end, state
        self.log_every = cfg.run.log_every_steps
        self.checkpoint_every = cfg.run.checkpoint_every_steps
        self.resumed = start.resumed is not None
        self.shared = self._resume_or_start(start)
        self.step = self.shared.get("step", 0)
        self.saved_at = self.step if self.resumed else None
        self.position = ""  # the stage's words for where it is: "epoch 3 ", "round 2/10 ..."
        self.sharded = engine.zero_optimization_stage() > 0
        self.log = RunLogger(self.ckpt.run_dir / "tb", self.rank,
                             purge_step=self.step + 1 if self.resumed else None)
        self.stop = StopOnSignal()
        self.timer = StepTimer()
        self._nonfinite = (0, 0)

    def _resume_or_start(self, start: Start) -> dict:
        """The resumed shared state, restored into the engine, the model and the RNGs; ``{}``
        for a new run, whose directory rank 0 creates with its ``config.yaml``. Either way
        rank 0 adds this start to ``provenance.json``: training is about to begin."""
        resumed = start.resumed
        for key, now in self.layout.items():
            if resumed is not None and resumed[0][key] != now:
                raise StageError(f"{self.ckpt.path}: {key} was {resumed[0][key]}, is {now} now "
                                 f"(the shards or a step limit changed); undo that or use a new "
                                 f"run directory")
        if self.rank == 0:
            self.ckpt.run_dir.mkdir(parents=True, exist_ok=True)
            provenance.record(self.ckpt.run_dir, start.ranks, start.env.world_size, start.stage)
            if resumed is None:
                dump_yaml(self.cfg, self.ckpt.run_dir / "config.yaml")
        if resumed is None:
            return {}
        shared = self.ckpt.restore_training(self.engine, resumed)
        self.model.load_state_dict(shared["model"])
        return shared

    def __enter__(self) -> TrainLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.stop.restore()
        self.log.close()

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def batches(self, batches):
        """``batches``, timed for the report, closed when the ``with`` block is left (a loader
        left early stops its threads). Starts a fresh timing window: the time between two
        epochs or visits (validation) is neither data wait nor step time."""
        self.timer.window()
        return closing(self.timer.timed(batches))

    def train_step(self, loss: torch.Tensor, lr: float, images_per_step: int,
                   report: Callable[[], str] | None = None, loss_prefix: str = "train/") -> None:
        """Backward, gradient norm, optimizer step, ``step += 1``; at every
        ``run.log_every_steps``-th step the report: the loss (mean over ranks, under
        ``loss_prefix``), LR, throughput, data wait, gradient norm and ETA to TensorBoard and
        one line on rank 0, with the stage's ``report()`` (which logs its own scalars and
        returns its words for the line)."""
        engine = self.engine
        engine.backward(loss)
        # Under ZeRO the gradients are partitioned; its step computes the global norm.
        norm = None if self.sharded else grad_norm(engine)
        engine.step()
        if norm is None:
            norm = engine.get_global_grad_norm()
        self.step += 1
        self._nonfinite = (int(not math.isfinite(float(loss.detach()))),
                           int(norm is not None and not math.isfinite(float(norm))))
        if self.step % self.log_every:
            return
        mean_loss = mean(loss.detach().float())
        window = self.timer.window(images_per_step)
        eta = (self.end - self.step) * window.seconds_per_step
        words = report() if report is not None else ""
        self.log.scalars(self.step, loss_prefix, loss=mean_loss)
        self.log.scalars(self.step, "train/", lr=lr, images_per_s=window.images_per_s,
                         data_wait=window.data_wait, grad_norm=norm, eta_s=eta)
        self.say(f"step {self.step}/{self.total} {self.position}loss {mean_loss:.4f} {words}"
                 f"lr {lr:.5f} img/s {window.images_per_s:.1f} wait {window.data_wait:.0%} "
                 f"eta {duration(eta)}")

    def end_step(self, due: bool = False) -> int:
        """After every step, on every rank: 0 to go on, else the exit status to stop with.
        A NaN/Inf on any rank stops every rank without saving (``NONFINITE_EXIT``), and so
        does a run directory lost to another launch (``LOST_LOCK_EXIT``); else a save every
        ``run.checkpoint_every_steps``, when ``due``, or when a rank got a signal, which then
        stops every rank after this same step (128 + signal). A save that finds its file
        system full stops every rank, the previous checkpoint intact (``NO_SPACE_EXIT``)."""
        lost = int(self.lock is not None and self.lock.lost is not None)
        signum, loss_bad, norm_bad, lost = self.stop.agreed(*self._nonfinite, lost)
        if lost:  # another launch took the run directory over: it is theirs now
            if self.lock is not None:
                print(f"{self.stage}: error: {self.lock.lost}", file=sys.stderr, flush=True)
            return LOST_LOCK_EXIT
        if loss_bad or norm_bad:
            which = " and ".join(w for w, bad in (("loss", loss_bad), ("gradient norm", norm_bad))
                                 if bad)
            if self.rank == 0:
                print(f"{self.stage}: error: non-finite {which} at step {self.step} "
                      f"{self.position}(NaN/Inf on a rank); stopped without saving: "
                      f"{self._last_checkpoint()}", file=sys.stderr, flush=True)
            return NONFINITE_EXIT
        if signum or due or self.step % self.checkpoint_every == 0:
            try:
                self.save()
            except checkpoint.NoSpaceError as e:
                if self.rank == 0:
                    print(f"{self.stage}: error: checkpoint of step {self.step} not saved: {e}; "
                          f"{self._last_checkpoint()}", file=sys.stderr, flush=True)
                return NO_SPACE_EXIT
        if not signum:
            return 0
        self.say(f"{self.stage}: stopped by signal {signum} after step {self.step}; checkpoint "
                 f"in {self.ckpt.path}")
        return 128 + signum

    def _last_checkpoint(self) -> str:
        return (f"the last checkpoint, of step {self.saved_at}, is in {self.ckpt.path}"
                if self.saved_at is not None else "no checkpoint was written yet")

    def save(self) -> None:
        shared = {"model": self.model.state_dict(), "config": to_dict(self.cfg), **self.layout,
                  **self._state()}
        self.ckpt.save_training(self.step, self.engine, shared)
        self.saved_at = self.step
        self.log.flush()
