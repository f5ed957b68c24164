"""Submit the stages to Slurm through submitit; without Slurm, run them here the same way.

    python -m muscle_hpc.launch --stage mdmoco|cl --config FILE [options] [key=value ...]
    python -m muscle_hpc.launch --stage finetune --config FILE [--tasks T,..] [--inits I,..]
        [--backbones B,..] [options] [key=value ...]
    python -m muscle_hpc.launch [--stage all] [--backbone r18|r50] [--root DIR] [--data-root DIR]
        [--mdmoco-config F] [--cl-config F] [--finetune-config F] [--finetune-nodes N]
        [--mdmoco-override K=V] [--cl-override K=V] [--finetune-override K=V] [options]
        [key=value ...]
    options: [--nodes N] [--gpus-per-node G] [--cpus-per-task C] [--partition P] [--account A]
        [--time MIN] [--max-requeues R] [--folder DIR] [--wait]

``--stage finetune`` submits one Slurm job array, one element per element of the config's grid
(task, init, backbone, protocol, fraction: its ``grid`` section) that the filters keep (default:
all; the paper's 40 with the default grid). ``--stage all`` submits the whole pipeline for one
backbone under ``--root``: MD-MoCo (``ROOT/mdmoco_BB``), then MUSCLE and MUSCLE⁻⁻
(``ROOT/continual_BB``, ``ROOT/continual_BB_muscle--``, both from MD-MoCo's backbone) with
``--dependency=afterok`` on it, then the fine-tune array (``run.root=ROOT``, on
``--finetune-nodes``) after both; these are the directories the fine-tune config's
``pretrained`` templates name. Plain key=value overrides go to every stage of ``all``, the
``--X-override`` ones to one stage. Default configs: configs/mdmoco_BB.yaml,
configs/continual_BB.yaml, configs/finetune.yaml. Without ``--stage`` the launcher runs ``all``
and says so.

One task per GPU. ``--gpus-per-node`` defaults, on Slurm, to what slurm/*.sh ask for: 8 (1 per
element for ``--stage finetune``; with ``all``, MD-MoCo and continual get it and each fine-tune
element one of them, as in slurm/pipeline.sh); without Slurm, to the GPUs seen here.
``--gpus-per-node 0`` runs on CPUs, one task per node (gloo): say it on a cluster without GPUs,
with ``run.allow_cpu=true``.

Every job's config, overrides, shards and initial weights are checked here, for the world size
the job will have, before anything is submitted (for ``all``, the backbones the earlier stages
will write are taken on trust; ImageNet weights must exist, or leave imagenet out of
``--inits``). Each task gets rank, world size and rendezvous from submitit's job environment
and runs the stage's ``main`` (NCCL on GPU, gloo on CPU), which neither knows nor cares how it
was started. Without Slurm, the jobs run on this machine through submitit's local executor:
several jobs (an array, ``all``) one after another, each waited for.

Preemption and time limits: Slurm sends SIGUSR2 (submitit's ``--signal=USR2@120``) or SIGTERM;
the stage checkpoints after the current step on every rank; on SIGUSR2 submitit's handler requeues
the job (``checkpoint()`` below), on SIGTERM Slurm requeues it itself (preemption,
``scontrol requeue``). The requeued job resumes from the rolling checkpoint. At most
``--max-requeues`` requeues, then the job ends as uncompleted. An array element is requeued alone.

Why one module over ~450 lines: every stage's launch goes through one set of checks, one plan and
one submission path, and the checks sit beside the plans they guard.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import signal
import sys
from pathlib import Path
from typing import NamedTuple

from data_prep.datasets.base import printable

# The stages, torch and submitit are imported where they are used: the launcher starts on a
# login node and --help, --list and a refused option must answer in a moment.

STAGES = {"mdmoco": "muscle_hpc.stages.mdmoco", "cl": "muscle_hpc.stages.continual",
          "finetune": "muscle_hpc.stages.finetune"}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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
                # (On SIGTERM Slurm requeues it itself.)
                signal.raise_signal(stopped_by)
            sys.exit(code)
        raise RuntimeError(f"{self.stage} exited with status {code} (see this task's log)")

    def checkpoint(self):
        import submitit

        if self.requeues >= self.max_requeues:
            return None  # submitit then ends the job as uncompleted
        return submitit.helpers.DelayedSubmission(
            StageJob(self.stage, self.argv, self.max_requeues, self.requeues + 1))


class Step(NamedTuple):
    """One Slurm job, or one job array (an element per argv), of the submission."""
    stage: str
    label: str  # the job name's suffix and what the messages call it
    argvs: list[list[str]]
    nodes: int
    gpus_per_node: int  # one task per GPU; 0: one CPU task per node
    after: tuple[int, ...] = ()  # indices of the steps that must end OK first
    array: bool = False  # several argvs as one job array (one argv is a plain job)

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)


def comma_list(choices):
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or repr(text)}: not one of "
                                             f"{', '.join(choices)}")
        return items
    return parse


def default_gpus(stage: str) -> int:
    """GPUs per node when --gpus-per-node is not given. On Slurm, what slurm/*.sh ask for (a
    user on a GPU cluster expects GPUs, and a CPU default would train on CPU without a word);
    without Slurm, this machine's GPUs. A fine-tune element takes one."""
    if shutil.which("sbatch"):
        gpus = 8
    else:
        import torch

        gpus = torch.cuda.device_count()
    return min(gpus, 1) if stage == "finetune" else gpus


def parse_args(argv):
    from muscle_hpc.registry import BACKBONE_NAMES, INIT_NAMES

    p = argparse.ArgumentParser(prog="python -m muscle_hpc.launch",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=(*STAGES, "all"),
                   help="default: all, the whole pipeline with the default configs")
    p.add_argument("--config", help="the stage's YAML (not with --stage all)")
    p.add_argument("--nodes", type=int, default=1,
                   help="per job, per array element (all: MD-MoCo's and continual's)")
    p.add_argument("--gpus-per-node", type=int,
                   help="one task per GPU; 0: one CPU task per node (gloo). Default on Slurm: "
                        "8 (1 for --stage finetune), as slurm/*.sh; without Slurm: the GPUs "
                        "seen here (at most 1 for finetune)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", type=int, default=24 * 60, help="minutes")
    p.add_argument("--max-requeues", type=int, default=10)
    p.add_argument("--folder", help="submitit's logs (default: RUN_DIR/submitit, "
                                    "run.root/submitit for finetune, ROOT/submitit for all)")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and report the result")
    g = p.add_argument_group("finetune: which elements of the config's grid (comma lists; "
                             "default all)")
    g.add_argument("--tasks", type=lambda text: [t for t in text.split(",") if t],
                   help="tasks of the config (default: its grid.tasks)")
    g.add_argument("--inits", type=comma_list(INIT_NAMES))
    g.add_argument("--backbones", type=comma_list(BACKBONE_NAMES),
                   help="not with --stage all (see --backbone)")
    g = p.add_argument_group("all: the pipeline for one backbone")
    g.add_argument("--backbone", choices=BACKBONE_NAMES, help="default: r50")
    g.add_argument("--root", help="where every stage writes (default: runs)")
    g.add_argument("--data-root", help="data.root of every stage (default: each config's)")
    g.add_argument("--finetune-nodes", type=int, help="per fine-tune element (default: 1)")
    for stage, name in (("mdmoco", "MD-MoCo"), ("cl", "continual"), ("finetune", "fine-tune")):
        g.add_argument(f"--{stage}-config", help=f"the {name} YAML")
        g.add_argument(f"--{stage}-override", action="append", default=[], metavar="K=V",
                       help=f"an override for the {name} stage only (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    args.stage_given = args.stage is not None
    if not args.stage_given:
        if args.config:  # a forgotten --stage, not a wish for the whole pipeline
            p.error("--config needs --stage mdmoco|cl|finetune")
        args.stage = "all"
    if args.gpus_per_node is None:
        args.gpus_per_node = default_gpus(args.stage)

    def given(*names):  # the first of these options given on the command line
        return next((f"--{n.replace('_', '-')}" for n in names if getattr(args, n)), None)

    if args.stage == "all":
        if given("config", "backbones"):
            p.error(f"{given('config', 'backbones')} is not for --stage all: give "
                    f"--mdmoco-config/--cl-config/--finetune-config and --backbone")
    else:
        if not args.config:
            p.error(f"--stage {args.stage} needs --config")
        only_all = given("backbone", "root", "data_root", "finetune_nodes", "mdmoco_config",
                         "cl_config", "finetune_config", "mdmoco_override", "cl_override",
                         "finetune_override")
        if only_all:
            p.error(f"{only_all} is for --stage all")
        if args.stage != "finetune" and given("tasks", "inits", "backbones"):
            p.error(f"{given('tasks', 'inits', 'backbones')} is for --stage finetune or all")
    defaults = dict(inits=list(INIT_NAMES),
                    backbones=list(BACKBONE_NAMES),
                    backbone="r50", root="runs", finetune_nodes=1)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("nodes", "time", "finetune_nodes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.gpus_per_node < 0 or args.max_requeues < 0:
        p.error("--gpus-per-node and --max-requeues must be >= 0")
    return args


def finetune_argvs(args, config_path, overrides, world, on_cuda, backbones,
                   produced_later=False) -> list[list[str]]:
    """The argv of every selected grid element, each one's inputs checked as its job would.
    Raises ``ConfigError``/``ShardError`` naming the element."""
    from muscle_hpc import config
    from muscle_hpc.data.shards import ShardError
    from muscle_hpc.ds_engine import check_device
    from muscle_hpc.stages import finetune

    cfg = finetune.load(config_path, overrides)
    unknown = [t for t in args.tasks or () if t not in cfg.tasks]
    if unknown:
        raise config.ConfigError(f"--tasks: {unknown[0]} is not a task of {config_path} "
                                 f"({', '.join(cfg.tasks)})")
    argvs = []
    for sel in finetune.grid(cfg):
        if (args.tasks and sel.task not in args.tasks) or sel.init not in args.inits or \
                sel.backbone not in backbones:
            continue
        try:
            finetune.prepare(cfg, world, on_cuda, sel, produced_later)
            check_device(cfg.run, on_cuda)
        except (config.ConfigError, ShardError) as e:
            raise type(e)(f"finetune {sel.name}: {e}") from None
        argvs.append(["--config", str(config_path), *sel.argv(), *overrides])
    return argvs


def plan_stage(args, world: int, on_cuda: bool) -> tuple[list[Step], Path]:
    """One stage: its job (or array) and the default log folder. Raises on a refused input."""
    from muscle_hpc import config
    from muscle_hpc.ds_engine import check_device

    if args.stage == "finetune":
        argvs = finetune_argvs(args, args.config, args.overrides, world, on_cuda, args.backbones)
        root = config.load(args.config, args.overrides, config.FinetuneConfig).run.root
        step = Step("finetune", "finetune", argvs, args.nodes, args.gpus_per_node,
                    array=len(argvs) > 1)
        return [step], Path(root)
    stage = importlib.import_module(STAGES[args.stage])
    cfg = stage.prepare(stage.load(args.config, args.overrides), world, on_cuda).cfg
    check_device(cfg.run, on_cuda)
    argv = ["--config", str(args.config), *args.overrides]
    return [Step(args.stage, args.stage, [argv], args.nodes, args.gpus_per_node)], \
        Path(cfg.run.dir)


def plan_all(args, tasks_per_node: int, on_cuda: bool) -> tuple[list[Step], Path]:
    """The pipeline for ``args.backbone`` under ``args.root``, every stage checked first.
    MD-MoCo and continual get ``--gpus-per-node`` on ``--nodes``; each fine-tune element one
    GPU on each of its ``--finetune-nodes``, as slurm/finetune_array.sh asks (a grid element
    is small: 8 GPUs each would split its batch eight ways and hold 160 GPUs for the grid)."""
    from muscle_hpc import config, registry
    from muscle_hpc.ds_engine import check_device
    from muscle_hpc.stages import continual, mdmoco

    bb, root = args.backbone, Path(args.root)
    arch = registry.BACKBONES[bb].arch
    world = args.nodes * tasks_per_node
    common = [f"data.root={args.data_root}"] if args.data_root else []
    common += args.overrides
    # The run directories last: they are the layout the fine-tune templates expect.
    moco_dir = registry.mdmoco_dir(root, bb)
    moco_config = args.mdmoco_config or CONFIGS.parent / registry.default_config("mdmoco", bb)
    moco_ov = [*common, *args.mdmoco_override, f"run.dir={moco_dir}"]
    cl_config = args.cl_config or CONFIGS.parent / registry.default_config("continual", bb)
    init = f"model.init={registry.exported_backbone(moco_dir)}"
    cl_ovs = {method: [*common, *args.cl_override, f"cl.method={method}", init,
                       f"run.dir={registry.continual_dir(root, bb, method)}"]
              for method in registry.CL_METHODS}
    ft_config = args.finetune_config or CONFIGS.parent / registry.default_config("finetune", bb)
    ft_ov = [*common, *args.finetune_override, f"run.root={root}"]

    cfg = mdmoco.prepare(mdmoco.load(moco_config, moco_ov), world, on_cuda).cfg
    check_device(cfg.run, on_cuda)
    checked = [(moco_config, cfg.model.arch)]
    for ov in cl_ovs.values():
        # MD-MoCo's backbone does not exist yet: check all but model.init.
        cfg = continual.prepare(continual.load(cl_config, [*ov, "model.init=''"]), world,
                                on_cuda).cfg
        check_device(cfg.run, on_cuda)
        checked.append((cl_config, cfg.model.arch))
    for path, got in checked:
        if got != arch:
            raise config.ConfigError(f"{path}: model.arch is {got}, not {arch} (--backbone {bb})")
    gpus, ft_gpus = args.gpus_per_node, min(args.gpus_per_node, 1)
    ft_argvs = finetune_argvs(args, ft_config, ft_ov, args.finetune_nodes, on_cuda, [bb],
                              produced_later=True)
    steps = [Step("mdmoco", "mdmoco", [["--config", str(moco_config), *moco_ov]], args.nodes,
                  gpus),
             Step("cl", "cl", [["--config", str(cl_config), *cl_ovs["muscle"]]], args.nodes,
                  gpus, after=(0,)),
             Step("cl", "cl-muscle--", [["--config", str(cl_config), *cl_ovs["muscle--"]]],
                  args.nodes, gpus, after=(0,)),
             Step("finetune", "finetune", ft_argvs, args.finetune_nodes, ft_gpus, after=(1, 2),
                  array=len(ft_argvs) > 1)]
    return steps, root


def array_id(jobs) -> str:
    return jobs[0].job_id.split("_")[0]


def submit(executor, step: Step, max_requeues: int):
    """Submit ``step`` (an array through ``executor.batch()``); its jobs."""
    executor.update_parameters(name=f"muscle-{step.label}", nodes=step.nodes,
                               tasks_per_node=step.tasks_per_node)
    if step.gpus_per_node:
        executor.update_parameters(gpus_per_node=step.gpus_per_node)
    if not step.array:
        return [executor.submit(StageJob(step.stage, step.argvs[0], max_requeues))]
    with executor.batch():
        jobs = [executor.submit(StageJob(step.stage, argv, max_requeues)) for argv in step.argvs]
    return jobs


def describe(step: Step, jobs, folder: Path, where: str, after) -> str:
    shape = f"{step.nodes} node(s) x {step.tasks_per_node} task(s)"
    deps = f", after job(s) {', '.join(after)}" if after else ""
    if step.array:
        return (f"launch: {step.label} array {array_id(jobs)} ({len(jobs)} element(s)) on "
                f"{where}: {shape} each{deps}; logs in {folder / array_id(jobs)}_*")
    return (f"launch: {step.label} job {jobs[0].job_id} on {where}: {shape}{deps}; "
            f"logs in {folder / str(jobs[0].job_id)}")


def wait_for(step: Step, jobs) -> bool:
    """Wait for ``jobs`` (one step); say how it went. True if every task returned 0."""
    ok = True
    for job in jobs:
        try:
            results = job.results()
        except Exception as e:  # noqa: BLE001 - a failed job, said in one line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            print(f"launch: job {job.job_id} failed: {reason}", file=sys.stderr, flush=True)
            ok = False
            continue
        ok = ok and all(r == 0 for r in results)
        if not step.array:
            print(f"launch: job {job.job_id} finished ({len(results)} tasks)", flush=True)
    if step.array and ok:
        print(f"launch: {step.label} array {array_id(jobs)} finished ({len(jobs)} elements)",
              flush=True)
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    from muscle_hpc import config, registry
    from muscle_hpc.data.shards import ShardError

    on_slurm = shutil.which("sbatch") is not None
    tasks_per_node = max(args.gpus_per_node, 1)
    on_cuda = args.gpus_per_node > 0
    if not args.stage_given:
        bb = args.backbone
        configs = [str(given or registry.default_config(stage, bb)) for given, stage in (
            (args.mdmoco_config, "mdmoco"), (args.cl_config, "continual"),
            (args.finetune_config, "finetune"))]
        devices = f"{args.gpus_per_node} GPU(s) per node" if on_cuda else "on CPU"
        print(f"launch: no --stage given: running the whole pipeline (all) for {bb} under "
              f"{args.root}/ with {', '.join(configs)}; {devices}", flush=True)
    try:
        if not on_slurm and max(args.nodes, args.finetune_nodes) > 1:
            raise config.ConfigError("--nodes > 1 needs Slurm (no sbatch found here)")
        if args.stage == "all":
            steps, root = plan_all(args, tasks_per_node, on_cuda)
        else:
            steps, root = plan_stage(args, args.nodes * tasks_per_node, on_cuda)
    except (config.ConfigError, ShardError) as e:
        print(f"launch: error: {printable(str(e))}", file=sys.stderr)
        return 2

    import submitit

    folder = Path(args.folder or root / "submitit")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm" if on_slurm else "local",
                                     slurm_max_num_timeout=args.max_requeues)
    params = dict(timeout_min=args.time)  # tasks and GPUs per node: per step, in submit
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if on_slurm:
        # A rank that dies takes the others down at once (no wait for a collective timeout).
        params.update(slurm_signal_delay_s=120, slurm_srun_args=["--kill-on-bad-exit=1"])
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.account:
            params["slurm_account"] = args.account
    executor.update_parameters(**params)
    if not on_slurm:
        return run_here(executor, steps, args, folder)

    submitted = []
    for step in steps:
        after = [array_id(submitted[i]) for i in step.after]
        executor.update_parameters(slurm_additional_parameters=(
            {"dependency": "afterok:" + ":".join(after)} if after else {}))
        try:
            submitted.append(submit(executor, step, args.max_requeues))
        except submitit.core.utils.FailedJobError as e:
            refused(step, e, args.gpus_per_node, [job for js in submitted for job in js])
            return 1
        print(describe(step, submitted[-1], folder, "Slurm", after), flush=True)
    if not args.wait:
        return 0
    for k, (step, jobs) in enumerate(zip(steps, submitted)):
        if not wait_for(step, jobs):
            later = [job for js in submitted[k + 1:] for job in js]
            for job in later:  # afterok can never be met now: do not leave them pending
                job.cancel(check=False)
            if later:
                print(f"launch: cancelled the {len(later)} later job(s)", file=sys.stderr)
            return 1
    return 0


def refused(step: Step, error: Exception, gpus: int, earlier) -> None:
    """sbatch refused ``step``: say why in one line, and cancel the jobs submitted before it
    (they would run for a pipeline that cannot finish)."""
    reason = " ".join(str(error).split()) or type(error).__name__
    hint = (f" (it asked for {gpus} GPU(s) per node; on a cluster without GPUs give "
            f"--gpus-per-node 0)" if gpus else "")
    for job in earlier:
        job.cancel(check=False)
    cancelled = f"; cancelled the {len(earlier)} job(s) submitted before" if earlier else ""
    print(f"launch: error: sbatch refused the {step.label} job: {reason}{hint}{cancelled}",
          file=sys.stderr, flush=True)


def run_here(executor, steps, args, folder) -> int:
    """Without Slurm: one job as before (waited for with --wait); several (an array, all) in
    turn, each waited for (one at a time is what a small machine runs well)."""
    where = "this machine (no Slurm found), with submitit's local executor"
    if len(steps) == 1 and not steps[0].array:
        jobs = submit(executor, steps[0], args.max_requeues)
        print(describe(steps[0], jobs, folder, where, ()), flush=True)
        return 0 if not args.wait or wait_for(steps[0], jobs) else 1
    print(f"launch: no Slurm found: running the {sum(len(s.argvs) for s in steps)} jobs one "
          f"after another on this machine, with submitit's local executor", flush=True)
    for step in steps:
        for argv in step.argvs:
            one = step._replace(argvs=[argv], array=False)
            jobs = submit(executor, one, args.max_requeues)
            print(describe(one, jobs, folder, "this machine", ()), flush=True)
            if not wait_for(one, jobs):
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
