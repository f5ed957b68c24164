"""Submit a stage to Slurm through submitit; without Slurm, run it here the same way.

    python -m muscle_hpc.launch --stage mdmoco|cl --config FILE --nodes N [--gpus-per-node G]
        [--partition P] [--time MIN] [--account A] [--cpus-per-task C] [--max-requeues R]
        [--wait] [key=value ...]

The config, the overrides and the shards are checked here, for the world size the job will
have, before anything is submitted. Each task gets rank, world size and rendezvous from
submitit's job environment and runs the stage's ``main`` (NCCL on GPU, gloo on CPU), which
neither knows nor cares how it was started.

Preemption and time limits: Slurm sends SIGUSR2 (submitit's ``--signal=USR2@120``) or SIGTERM;
the stage checkpoints after the current step on every rank; on SIGUSR2 submitit's handler requeues
the job (``checkpoint()`` below), on SIGTERM Slurm requeues it itself (preemption,
``scontrol requeue``). The requeued job resumes from the rolling checkpoint. At most
``--max-requeues`` requeues, then the job ends as uncompleted.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import signal
import sys
from pathlib import Path

STAGES = {"mdmoco": "muscle_hpc.stages.mdmoco", "cl": "muscle_hpc.stages.continual"}


class StageJob:
    """What each task of the submitted job runs (pickled by submitit). ``checkpoint`` is what
    submitit calls on preemption: the stage has already saved its state, so the resubmission
    is this same job, which resumes from it."""

    def __init__(self, stage: str, argv: list[str], max_requeues: int, requeues: int = 0):
        self.stage, self.argv = stage, list(argv)
        self.max_requeues, self.requeues = max_requeues, requeues

    def __call__(self) -> int:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        code = importlib.import_module(STAGES[self.stage]).main(self.argv)
        if code == 0:
            return 0
        if code > 128:  # stopped by a signal, checkpoint written
            stopped_by = code - 128
            if stopped_by != signal.SIGTERM and callable(signal.getsignal(stopped_by)):
                # The stage held submitit's preemption signal until its checkpoint was safe;
                # hand it to submitit's own handler now, which requeues the job and exits.
                # (On SIGTERM Slurm requeues the job itself.)
                signal.raise_signal(stopped_by)
            sys.exit(code)
        raise RuntimeError(f"{self.stage} exited with status {code} (see this task's log)")

    def checkpoint(self):
        import submitit

        if self.requeues >= self.max_requeues:
            return None  # submitit then ends the job as uncompleted
        return submitit.helpers.DelayedSubmission(
            StageJob(self.stage, self.argv, self.max_requeues, self.requeues + 1))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m muscle_hpc.launch",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=tuple(STAGES))
    p.add_argument("--config", required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="one task per GPU; 0: one CPU task per node (gloo)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", type=int, default=24 * 60, help="minutes")
    p.add_argument("--max-requeues", type=int, default=10)
    p.add_argument("--folder", help="submitit's logs (default: RUN_DIR/submitit)")
    p.add_argument("--wait", action="store_true", help="wait for the job and report its result")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    for name in ("nodes", "time"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.gpus_per_node < 0 or args.max_requeues < 0:
        p.error("--gpus-per-node and --max-requeues must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from muscle_hpc import config
    from muscle_hpc.data.shards import ShardError

    stage = importlib.import_module(STAGES[args.stage])
    tasks_per_node = max(args.gpus_per_node, 1)
    world = args.nodes * tasks_per_node
    try:
        cfg = stage.prepare(args.config, args.overrides, world, on_cuda=args.gpus_per_node > 0)[0]
    except (config.ConfigError, ShardError) as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2

    import submitit

    on_slurm = shutil.which("sbatch") is not None
    folder = Path(args.folder or Path(cfg.run.dir) / "submitit")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm" if on_slurm else "local",
                                     slurm_max_num_timeout=args.max_requeues)
    params = dict(name=f"muscle-{args.stage}", nodes=args.nodes, tasks_per_node=tasks_per_node,
                  timeout_min=args.time)
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if on_slurm:
        # A rank that dies takes the others down at once (no wait for a collective timeout).
        params.update(slurm_signal_delay_s=120, slurm_srun_args=["--kill-on-bad-exit=1"])
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.account:
            params["slurm_account"] = args.account
    elif args.nodes > 1:
        print("launch: error: --nodes > 1 needs Slurm (no sbatch found here)", file=sys.stderr)
        return 2
    executor.update_parameters(**params)
    argv_stage = ["--config", str(args.config), *args.overrides]
    job = executor.submit(StageJob(args.stage, argv_stage, args.max_requeues))
    where = "Slurm" if on_slurm else "this machine (no Slurm found), with submitit's local executor"
    print(f"launch: {args.stage} job {job.job_id} on {where}: {args.nodes} node(s) x "
          f"{tasks_per_node} task(s); logs in {folder / str(job.job_id)}", flush=True)
    if not args.wait:
        return 0
    try:
        results = job.results()
    except Exception as e:  # noqa: BLE001 - a failed job, said in one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        print(f"launch: job {job.job_id} failed: {reason}", file=sys.stderr)
        return 1
    print(f"launch: job {job.job_id} finished ({len(results)} tasks)")
    return 0 if all(r == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

