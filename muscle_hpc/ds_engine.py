"""The DeepSpeed engine the stages train in: its JSON config (``deepspeed_config``), the
precision a run computes in (``bf16_enabled``), where it may run (``check_device``), the engine
around torch SGD (``deepspeed_engine``) and the optimizer state a checkpoint saves and loads.
``engine.TrainLoop`` drives it; nothing here knows which stage it serves."""

from __future__ import annotations

import logging
import os

import torch

from muscle_hpc.config import ConfigError
from muscle_hpc.dist import rank_world

# deepspeed is imported where it is used: after DS_ACCELERATOR is set (import_deepspeed).


def bf16_enabled(run, on_cuda: bool) -> bool:
    """Whether a stage whose run section is ``run`` computes in bf16: ``run.precision``, where
    ``auto`` is bf16 on CUDA and fp32 on CPU (CPU bf16 is slow on most hosts)."""
    return run.precision == "bf16" or (run.precision == "auto" and on_cuda)


def check_device(run, on_cuda: bool) -> None:
    """A stage without a GPU starts only when ``run.allow_cpu`` says CPU is intended."""
    if not on_cuda and not run.allow_cpu:
        raise ConfigError("run.allow_cpu: no GPU (none visible here, or none requested) and "
                          "the config does not say CPU is intended; request GPUs (sbatch or "
                          "launch --gpus-per-node), or set run.allow_cpu=true to train on CPU")


def deepspeed_config(run, batch_size: int, world_size: int, on_cuda: bool) -> dict:
    """The DeepSpeed JSON for a stage whose run section is ``run`` and whose global batch is
    ``batch_size`` (the stage's config check has made it a multiple of ``world_size``). The
    optimizer and LR schedule are not in it: the stage builds SGD itself and sets the LR per
    step (``schedule.py``), so a resume needs only the step. No gradient accumulation or
    clipping, as in MoCo v2. DeepSpeed only books the batch; the loader sets the real one.

    bf16 is DeepSpeed's ``torch_autocast`` (bf16 compute, bf16 gradient all-reduce for conv
    and linear weights, fp32 weights), not its ``bf16`` mode, which stores the module in bf16:
    MoCo's key encoder is not in the optimizer, so it would have no fp32 master copy, and its
    momentum update (a step of 0.001 of the weight for m = 0.999) is below bf16's resolution
    (2^-8): the key encoder would freeze. The price is fp32 weight memory, small for ResNets."""
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": run.zero_stage},
        # MoCo's SGD is not on DeepSpeed's ZeRO list; it shards it correctly all the same
        # (measured: ZeRO 1 and 2 initialise and step on CPU with torch.optim.SGD).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": bf16_enabled(run, on_cuda), "dtype": "bfloat16"},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,  # quiet; we log ourselves
        "wall_clock_breakdown": False,
    }


def import_deepspeed():
    """``deepspeed``, told to use the CPU accelerator where there is no GPU (its
    autodetection needs a hint on hosts without CUDA) and to keep its INFO lines to itself."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    return deepspeed


def deepspeed_engine(model: torch.nn.Module, params, ds_config: dict, *, momentum: float = 0.0,
                     weight_decay: float, adam: bool = False):
    """``model`` in a DeepSpeed engine that trains ``params`` with torch SGD (``momentum``), or
    torch Adam (its default betas) with ``adam``. The LR is set per step by the caller
    (``schedule.set_lr(engine.optimizer, lr)``), so the optimizer starts at 0 and a resume
    needs only the step. Parameters outside ``params`` (MoCo's key encoder) are never
    optimised; DeepSpeed broadcasts all parameters and buffers from rank 0 at start."""
    deepspeed = import_deepspeed()
    optimizer = (torch.optim.Adam(params, lr=0.0, weight_decay=weight_decay) if adam else
                 torch.optim.SGD(params, lr=0.0, momentum=momentum, weight_decay=weight_decay))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def grad_norm(engine) -> float:
    """The global L2 norm of the gradients of the step about to be taken, after the gradient
    all-reduce (0 when no parameter has one). Call between ``engine.backward`` and
    ``engine.step``. ZeRO 1/2 compute it in their step (``engine.get_global_grad_norm()``
    afterwards); without ZeRO the gradients are whole on every rank and are read here. Read at
    every step (the non-finite check), so the per-tensor norms are one ``_foreach`` call rather
    than a kernel per parameter."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    return float(torch.linalg.vector_norm(torch.stack(norms)))


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


def deepspeed_safe_globals() -> list:
    """Classes a ZeRO optimizer state dict pickles, allowed for ``weights_only`` loading."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, ZeroStageEnum, fragment_address]
