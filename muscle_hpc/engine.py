"""Blocks the stages' training loops share: the DeepSpeed engine, stopping on a signal, rolling
checkpoints that resume bit for bit, and step timing.

A stage loop is: draw a batch, set the LR from the step (``schedule.py``), forward through the
engine, ``engine.backward``, ``engine.step``; every N steps ``RollingCheckpoint.save``; after
every step ``StopOnSignal.agreed()``, and on a stop, save and exit. Nothing here knows which
stage it serves.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from .config import changed_keys
from .dist import rank_world

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

    def agreed(self) -> int:
        """The first signal any rank received (0: none), the same value on every rank."""
        _, world = rank_world()
        if world == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def save_or_stop(self, due: bool, save, stage: str, step: int, where) -> int:
        """The end of every step: ``save()`` when ``due`` or a rank got a signal; then the exit
        status to stop with (128 + signal), or 0 to go on."""
        signum = self.agreed()
        if signum or due:
            save()
        if not signum:
            return 0
        if rank_world()[0] == 0:
            print(f"{stage}: stopped by signal {signum} after step {step}; checkpoint in "
                  f"{where}", flush=True)
        return 128 + signum

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


def import_deepspeed():
    """``deepspeed``, told to use the CPU accelerator where there is no GPU (its
    autodetection needs a hint on hosts without CUDA) and to keep its INFO lines to itself."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    return deepspeed


def deepspeed_engine(model: torch.nn.Module, params, ds_config: dict, *, momentum: float,
                     weight_decay: float):
    """``model`` in a DeepSpeed engine that trains ``params`` with torch SGD. The LR is set per
    step by the caller (``schedule.set_lr(engine.optimizer, lr)``), so the optimizer starts at
    0 and a resume needs only the step. Parameters outside ``params`` (MoCo's key encoder) are
    never optimised; DeepSpeed broadcasts all parameters and buffers from rank 0 at start."""
    deepspeed = import_deepspeed()
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=momentum, weight_decay=weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def grad_norm(engine) -> float:
    """The global L2 norm of the gradients of the step about to be taken, after the gradient
    all-reduce. Call between ``engine.backward`` and ``engine.step``. ZeRO 1/2 compute it in
    their step (``engine.get_global_grad_norm()`` afterwards); without ZeRO the gradients are
    whole on every rank and are read here."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return float("nan")
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g.float()) for g in grads])))


def optimizer_state(engine) -> dict:
    return engine.optimizer.state_dict()


def load_optimizer_state(engine, state: dict) -> None:
    if engine.zero_optimization():
        # ZeRO takes a list indexed by rank; with its (default) rigid checkpoints each rank
        # reads only its own entry. The fp32 master partition comes from the checkpoint, not
        # rebuilt from the module.
        rank, _ = rank_world()
        engine.optimizer.load_state_dict([None] * rank + [state], load_optimizer_states=True,
                                         load_from_fp32_weights=True)
    else:
        engine.optimizer.load_state_dict(state)


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that steps: the engine's own without ZeRO; under ZeRO 1/2 the one
    DeepSpeed wraps, whose parameters are this rank's flat fp32 partitions (one per group)."""
    return engine.optimizer.optimizer if engine.zero_optimization() else engine.optimizer


def reset_optimizer_state(engine) -> None:
    """Forget SGD's momentum (a fresh start, as at step 0). Under ZeRO the state lives in the
    wrapped torch optimizer, keyed by this rank's flat partitions; it is rebuilt at the next
    step either way."""
    base_optimizer(engine).state.clear()


def _deepspeed_safe_globals() -> list:
    """Classes a ZeRO optimizer state dict pickles, allowed for ``weights_only`` loading."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, ZeroStageEnum, fragment_address]


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
        checkpoint.save(self._own_path(step, self.rank), {"step": step, **own})
        if self.world > 1:
            dist.barrier()
        if self.rank == 0:
            checkpoint.save(self.path, {"step": step, "world_size": self.world, **shared})
            for old in (self.run_dir / "checkpoint").glob("step*-rank*.pth"):
                if not old.name.startswith(f"step{step:09d}-"):
                    old.unlink(missing_ok=True)
        if self.world > 1:
            dist.barrier()  # nobody races ahead to the next save while rank 0 prunes

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

    def load(self, config: dict | None = None, may_change: tuple[str, ...] = ()
             ) -> tuple[dict, dict] | None:
        """``(shared, own)`` of the last complete checkpoint, or None when the run is new.
        Raises ``ValueError`` (one line) when the checkpoint cannot be resumed here: another
        world size, or, given the run's ``config`` (a ``to_dict`` tree, stored as
        ``shared["config"]``), a different value of any key not starting with one of
        ``may_change``. Needs no process group, so a stage refuses before the rendezvous."""
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
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
                        if not d.startswith(may_change)]
                if diff:
                    raise ValueError(f"{self.path} was written with another config "
                                     f"({'; '.join(diff)}); restore it or use a new run.dir")
            own_path = self._own_path(shared["step"], self.rank)
            try:
                own = checkpoint.load(own_path)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{own_path} cannot be read ({type(e).__name__})") from None
        if own is None:
            raise ValueError(f"{own_path} is missing: the checkpoint of step {shared['step']} "
                             f"is incomplete")
        return shared, own


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

    def window(self, images_per_step: int) -> tuple[float, float]:
        """(images/s, fraction of the time spent waiting for data) since the last call."""
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        out = images_per_step * self.steps / elapsed, self.wait / elapsed
        self.start, self.wait, self.steps = now, 0.0, 0
        return out
