"""The fine-tune grid as one Slurm job array (slurm/finetune_array.sh, launch --stage finetune)
and the whole pipeline, its three stages chained by dependencies, run end to end at tiny size
and reported (slurm/pipeline.sh, launch without --stage), on the local 4-node cluster of
tools/local_slurm.sh (no GPUs: the tests take the CPU path). The grid's own tests run without
Slurm; the others skip without a cluster, unless MUSCLE_SLURM=1 says one was expected.
"""

import csv
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from muscle_hpc import config, registry, report
from muscle_hpc.stages import common, finetune

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
IMAGENET_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-0676ba61.pth"}
# This cluster has no GPUs: the CPU path the scripts and the launcher take when told.
CPU_SBATCH = ["--gpus-per-node=0"]
CPU_LAUNCH = ["--gpus-per-node", "0"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
# Small enough for a few seconds of training on one CPU core.
TINY = ["tasks.pneumonia.batch_size=4", "tasks.pneumonia.epochs=2", "run.max_steps_per_epoch=2",
        "data.num_workers=1", "eval.bootstrap=10", "run.log_every_steps=1"]


GRID = [(sel.task, sel.init, sel.backbone)
        for sel in finetune.grid(finetune.load(finetune.DEFAULT_CONFIG, []))]


def test_the_grid_is_every_task_init_backbone_once_in_index_order():
    assert len(GRID) == len(set(GRID)) == 40
    assert set(GRID) == set(itertools.product(registry.TASK_NAMES, registry.INIT_NAMES,
                                              registry.BACKBONE_NAMES))
    backbones = list(registry.BACKBONE_NAMES)
    for i, (task, init, bb) in enumerate(GRID):
        assert i == (backbones.index(bb) * 20 + registry.TASK_NAMES.index(task) * 5
                     + registry.INIT_NAMES.index(init))


def test_list_prints_the_40_elements_in_index_order(capsys):
    assert finetune.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in lines if not line.startswith("#")] == \
        [[str(i), *GRID[i]] for i in range(40)]


# --- on Slurm -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    if not shutil.which("scontrol") or subprocess.run(["scontrol", "ping"],
                                                      capture_output=True).returncode:
        if os.environ.get("MUSCLE_SLURM") == "1":
            pytest.fail("MUSCLE_SLURM=1 but no Slurm answers (bash tools/local_slurm.sh start)")
        pytest.skip("no Slurm cluster (bash tools/local_slurm.sh start)")


@pytest.fixture
def cancel_after(slurm):
    """Job ids a test submits; all cancelled when it ends, passed or not."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids])


def template_path(key: str, root: Path, bb: str) -> Path:
    """Where the fine-tune config expects ``key``'s backbone (what the earlier stages write)."""
    cfg = config.load(CONFIGS / "finetune.yaml", [], config.FinetuneConfig)
    return Path(config.expand_path(key, getattr(cfg.pretrained, key), root=root, backbone=bb))


@pytest.fixture(scope="module")
def fake_inputs(slurm, tmp_path_factory):
    """A run root holding every backbone the earlier stages would write (r18 and r50), and a
    TORCH_HOME with torchvision's ImageNet files: random weights of the right shapes."""
    from muscle_hpc.models.backbone import build_backbone, export_torchvision

    base = tmp_path_factory.mktemp("ft_inputs")
    root, torch_home = base / "run", base / "torch"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    for bb, arch in ((b.name, b.arch) for b in registry.BACKBONES.values()):
        exported = base / f"{bb}.pth"
        torch.save(export_torchvision(build_backbone(arch)), exported)
        for key in ("mdmoco", "muscle", "muscle_minus"):
            path = template_path(key, root, bb)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(exported, path)
        torch.save(getattr(torchvision.models, arch)().state_dict(),
                   torch_home / "hub" / "checkpoints" / IMAGENET_FILES[arch])
    return root, torch_home


def job_env(torch_home: Path | None = None) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if torch_home:
        env["TORCH_HOME"] = str(torch_home)
    return env


def sbatch_array(logs: Path, array: str, *args: str, env: dict, cancel: list) -> str:
    logs.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["sbatch", "--parsable", *CPU_SBATCH, f"--array={array}",
                          "--cpus-per-task=1",
                          f"--output={logs}/%a.log", "slurm/finetune_array.sh", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    job = out.stdout.strip().split(";")[0]
    cancel.append(job)
    return job


def element_states(job: str) -> dict[int, str]:
    """{array index: state} of the elements that have started (sacct lists the pending rest as
    one ``JOB_[a-b]`` line)."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "JobID,State"],
                         capture_output=True, text=True).stdout
    states = {}
    for line in out.splitlines():
        jobid, _, state = line.partition("|")
        index = jobid.partition("_")[2]
        if index.isdigit():
            states[int(index)] = state.split()[0] if state else "PENDING"
    return states


def wait_array(job: str, n: int, timeout: float) -> dict[int, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        states = element_states(job)
        if len(states) == n and all(s in ENDED for s in states.values()):
            return states
        time.sleep(2)
    raise AssertionError(f"array {job} not done in {timeout} s: {element_states(job)}")


def expected_images(task: str, shards: Path) -> int:
    manifest = json.loads((shards / config.FinetuneConfig().definition(task).dataset /
                           "manifest.json").read_text())
    return manifest["splits"]["train"]["count"]


def expected_init(init: str, bb: str, root: Path, torch_home: Path) -> str:
    arch = registry.BACKBONES[bb].arch
    if init == "scratch":
        return "Kaiming"
    if init == "imagenet":
        return str(torch_home / "hub" / "checkpoints" / IMAGENET_FILES[arch])
    return str(template_path(common.PRETRAINED_KEY[init], root, bb))


def test_the_array_script_runs_each_index_on_its_own_grid_element(fake_inputs, task_shards,
                                                                    tmp_path, cancel_after):
    """Array indices reach the stage as grid elements: each task, init and backbone at least
    once (that the 40 indices cover the grid once is test_finetune's)."""
    root, torch_home = fake_inputs
    indices = [0, 6, 12, 18, 21, 27, 33, 39]
    job = sbatch_array(tmp_path / "logs", ",".join(map(str, indices)), "configs/finetune.yaml",
                       "--check", f"data.root={task_shards}", f"run.root={root}",
                       "run.allow_cpu=true",
                       env=job_env(torch_home), cancel=cancel_after)
    states = wait_array(job, len(indices), timeout=600)
    assert set(states.values()) == {"COMPLETED"}, states
    seen = set()
    for index in indices:
        task, init, bb = GRID[index]
        log = (tmp_path / "logs" / f"{index}.log").read_text()
        assert f"(array {job}_{index}) (restart 0)" in log, log
        said = [line for line in log.splitlines() if line.startswith("finetune: index ")]
        assert said == [f"finetune: index {index}: task {task}, init {init} "
                        f"({expected_init(init, bb, root, torch_home)}), backbone {bb}, "
                        f"finetune, fraction 1 ({expected_images(task, task_shards)} "
                        f"training images), 1 rank(s), "
                        f"output {root / 'finetune' / f'{task}_{bb}_{init}'}"], log
        seen.add((task, init, bb))
    assert {t for t, _, _ in seen} == set(registry.TASK_NAMES)
    assert {i for _, i, _ in seen} == set(registry.INIT_NAMES)
    assert {b for _, _, b in seen} == set(registry.BACKBONE_NAMES)


def test_an_array_element_trains_and_requeues_alone_after_the_time_limit_signal(
        fake_inputs, task_shards, tmp_path, cancel_after):
    root = tmp_path / "run"
    index = GRID.index(("pneumonia", "scratch", "r18"))
    # 2 whole epochs of 16 steps: the signal lands early in the first one. (Near an epoch's
    # end the loader's close can stall ~60 s, see muscle_hpc/data/loaders.py close_epoch.)
    job = sbatch_array(tmp_path / "logs", str(index), "configs/finetune_demo.yaml",
                       f"data.root={task_shards}", f"run.root={root}", *TINY,
                       "tasks.pneumonia.batch_size=2", "run.max_steps_per_epoch=0",
                       env=job_env(), cancel=cancel_after)
    log = tmp_path / "logs" / f"{index}.log"
    end = time.monotonic() + 180
    while "step 2/" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < end, log.read_text() if log.exists() else "no log"
        time.sleep(0.3)
    # What Slurm does before the time limit with --signal=B:USR2@120: signal the batch shell.
    subprocess.run(["scancel", "--signal=USR2", "--batch", f"{job}_{index}"], check=True)
    assert wait_array(job, 1, timeout=240) == {index: "COMPLETED"}, log.read_text()[-3000:]
    text = log.read_text()
    stopped = int(text.split("stopped by signal 12 after step ")[1].split(";")[0])
    assert "requeueing job" in text and f"(array {job}_{index}) (restart 1)" in text, text
    assert f"resuming at step {stopped}" in text, text
    results = json.loads((root / "finetune" / "pneumonia_r18_scratch" / "results.json")
                         .read_text())
    assert (results["task"], results["init"], results["backbone"]) == ("pneumonia", "scratch",
                                                                       "r18")
    assert results["epochs"] == 2 and len(results["history"]) == 2


def test_an_external_task_runs_as_an_array_element_and_appears_in_the_report(
        fake_inputs, task_shards, tmp_path, cancel_after):
    """A dataset pre-training never saw (the demo's knee, converted from its folders) and a
    task defined in YAML alone (configs/external_demo.yaml): its grid element runs through the
    array script from MUSCLE's backbone, and the report gives it a table."""
    from data_prep import convert, layouts

    root, _ = fake_inputs
    shards = tmp_path / "shards"
    knee = task_shards.parent / "downloads" / "external" / "knee"
    convert.convert_dataset(layouts.build_spec("knee", "folders", knee, {}), knee, shards,
                            size=(128, 80), log=lambda *_: 0)
    cfg = finetune.load(CONFIGS / "external_demo.yaml", [])
    index = finetune.grid(cfg).index(registry.FinetuneRun("knee", "muscle", "r18", "finetune", 1.0))
    run = tmp_path / "run"
    shutil.copytree(root / "continual_r18", run / "continual_r18")
    job = sbatch_array(tmp_path / "logs", str(index), "configs/external_demo.yaml",
                       f"data.root={shards}", f"run.root={run}", "tasks.knee.epochs=1",
                       "run.max_steps_per_epoch=2", "data.num_workers=1", "eval.bootstrap=10",
                       env=job_env(), cancel=cancel_after)
    log = tmp_path / "logs" / f"{index}.log"
    assert wait_array(job, 1, timeout=300) == {index: "COMPLETED"}, log.read_text()[-3000:]
    result = json.loads((run / "finetune" / "knee_r18_muscle" / "results.json").read_text())
    assert (result["task"], result["kind"], result["classes"]) == \
        ("knee", "classification", ["mild", "normal", "severe"])  # the folders' names
    assert report.main([str(run)]) == 0
    table = (run / "report" / "table_knee.md").read_text()
    assert f"| ResNet-18 | MUSCLE | {report.pct(result['test']['acc'])} | " in table, table


def launch(*args: str, env: dict, cancel: list, timeout: float = 120):
    """``python -m muscle_hpc.launch ARGS``; the ids it submitted go to ``cancel``, also when
    it runs out of time."""
    try:
        p = subprocess.run([sys.executable, "-m", "muscle_hpc.launch", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        cancel.extend(submitted_ids(out))
        raise
    cancel.extend(submitted_ids(p.stdout))
    return p


def all_jobs() -> set[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-a", "-o", "JobID", "-S", "now-1days"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def submitted_ids(stdout: str) -> list[str]:
    return re.findall(r"^launch: \S+ (?:job|array) (\d+)", stdout, re.MULTILINE)


def test_launch_finetune_submits_an_array_of_the_selected_elements(fake_inputs, task_shards,
                                                                   tmp_path, cancel_after):
    root = tmp_path / "run"
    mdmoco = template_path("mdmoco", root, "r18")
    mdmoco.parent.mkdir(parents=True)
    os.link(template_path("mdmoco", fake_inputs[0], "r18"), mdmoco)
    args = ["--stage", "finetune", "--config", str(CONFIGS / "finetune_demo.yaml"), *CPU_LAUNCH,
            "--nodes", "1", "--time", "10", "--tasks", "pneumonia", "--backbones", "r18",
            f"data.root={task_shards}", f"run.root={root}", *TINY]

    before = all_jobs()
    p = launch(*args, "--inits", "scratch,muscle", env=job_env(), cancel=cancel_after)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.splitlines() == [
        f"launch: error: finetune pneumonia_r18_muscle: pretrained.muscle: "
        f"{template_path('muscle', root, 'r18')} not found (run the continual stage first)"]
    assert all_jobs() <= before and not (root / "submitit").exists()  # nothing submitted

    p = launch(*args, "--inits", "scratch,mdmoco", "--wait", env=job_env(), timeout=300,
               cancel=cancel_after)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "(2 element(s)) on Slurm: 1 node(s) x 1 task(s) each" in p.stdout
    assert "finished (2 elements)" in p.stdout
    for init, weights in (("scratch", None), ("mdmoco", str(mdmoco))):
        results = json.loads((root / "finetune" / f"pneumonia_r18_{init}" / "results.json")
                             .read_text())
        assert (results["task"], results["init"], results["backbone"]) == ("pneumonia", init,
                                                                           "r18")
        assert results["init_weights"] == weights


def show_job(job: str) -> dict[str, str]:
    """``scontrol show job``'s fields of the job (for an array, its first record)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                         check=True).stdout.splitlines()[0]
    fields = {}
    for item in re.split(r" (?=[A-Za-z_/:]+=)", out):
        key, _, value = item.partition("=")
        fields[key] = value
    return fields


def depends_on(job: str) -> set[str]:
    """The ids ``job`` waits for with afterok (``afterok:5(unfulfilled),afterok:6(...)``)."""
    dependency = show_job(job)["Dependency"]
    assert dependency.startswith("afterok:"), dependency
    return set(re.findall(r"afterok:(\d+)", dependency))


def wait_pipeline(ids: list[str], timeout: float) -> dict[str, str]:
    """{job id: state} once every job of the pipeline has ended, or one has failed (the jobs
    after it would wait for ever)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(ids), "-o",
                              "JobID,State"], capture_output=True, text=True).stdout
        states = {job: (state.split() or ["PENDING"])[0]
                  for job, _, state in (line.partition("|") for line in out.splitlines())}
        ended = [s for s in states.values() if s in ENDED]
        # A pending array is one line JOB_[a-b] until its elements start.
        done = "[" not in "".join(states) and len(ended) == len(states) >= len(ids)
        if done or any(s != "COMPLETED" for s in ended):
            return states
        time.sleep(2)
    raise AssertionError(f"pipeline {ids} not done in {timeout} s")


def assert_chained(ids: list[str]) -> None:
    """MD-MoCo, the two continual jobs after it, the fine-tune array after both. Read while
    they wait: Slurm forgets a dependency once it is met."""
    mdmoco, cl, cl_minus, array = ids
    assert depends_on(cl) == depends_on(cl_minus) == {mdmoco}
    assert depends_on(array) == {cl, cl_minus}


# --- the whole pipeline, end to end -------------------------------------------------------
# Every stage of both pipeline tests at its smallest: MD-MoCo 4 steps on the 34 images of
# moco_shards, continual 2 steps per task (8 in all), one fine-tune epoch of 2 steps; one CPU
# rank per job. EVERY_STAGE goes to all three stages. About 2 min per pipeline on 2 idle cores;
# their timeouts allow for a loaded machine.
EVERY_STAGE = ["run.log_every_steps=1"]
CL_STEPS = 8


def tiny_stages(moco_shards: Path, task_shards: Path) -> list[str]:
    """The per-stage options of ``launch --stage all`` and ``slurm/pipeline.sh`` (the same
    flags) for the tiny pipeline."""
    stages = {
        "mdmoco": [f"data.root={moco_shards}", "data.datasets=nih,shenzhen",
                   "data.batch_size=8", "model.K=32", "model.bn_groups=2", "optim.epochs=1",
                   "run.max_steps=0",
                   "run.monitor_every_steps=0"],  # moco_shards hold no task set for the kNN
        "cl": [f"data.root={task_shards}", "cl.rounds=1", "run.visit_steps=2",
               "run.validate=false"],  # 4 tasks' valid sets after each visit: most of its time
        "finetune": [f"data.root={task_shards}", *TINY, "tasks.pneumonia.epochs=1"],
    }
    args = ["--mdmoco-config", str(CONFIGS / "mdmoco_demo.yaml"),
            "--cl-config", str(CONFIGS / "continual_demo.yaml"),
            "--finetune-config", str(CONFIGS / "finetune_demo.yaml")]
    for stage, overrides in stages.items():
        args += [arg for ov in overrides for arg in (f"--{stage}-override", ov)]
    return [*args, *EVERY_STAGE]


def assert_pipeline_ran(root: Path, inits: list[str]) -> None:
    """Every stage wrote what the next one reads, the continual jobs with their own method,
    and the report over ``root`` has a pneumonia row per fine-tuned init (and only those)."""
    assert (template_path("mdmoco", root, "r18")).exists()
    for key, method in (("muscle", "muscle"), ("muscle_minus", "muscle--")):
        run_dir = template_path(key, root, "r18").parent
        assert torch.load(run_dir / "checkpoint.pth", weights_only=True)["step"] == CL_STEPS
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["cl"]["method"] == method
    for init in inits:
        results = json.loads((root / "finetune" / f"pneumonia_r18_{init}" / "results.json")
                             .read_text())
        assert results["init_weights"] == str(template_path(common.PRETRAINED_KEY[init],
                                                            root, "r18"))
    p = subprocess.run([sys.executable, "-m", "muscle_hpc.report", str(root)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(root / "report" / "table2.csv") as f:
        rows = {(r["backbone"], r["init"]): r for r in csv.DictReader(f)}
    assert {bb for bb, _ in rows} == {"r18"}, rows
    assert {init for (_, init), r in rows.items() if r["pneumonia_n"]} == set(inits), rows
    markdown = (root / "report" / "table2.md").read_text().splitlines()
    for init, name in report.INIT_TITLES.items():  # "—": no result
        row = next(line for line in markdown if line.startswith(f"| ResNet-18 | {name} |"))
        assert (row.split("|")[3].strip() != "—") == (init in inits), row
    assert "r18" not in (root / "report" / "table3.csv").read_text()  # no lung or TBX run


@pytest.mark.timeout(600)
def test_pipeline_sh_runs_the_whole_pipeline_then_the_report(moco_shards, task_shards, tmp_path,
                                                            cancel_after):
    root = tmp_path / "run"
    # The job scripts ask for GPUs; SBATCH_GPUS_PER_NODE=0 (read by sbatch) is the CPU path.
    env = dict(job_env(), SBATCH_GPUS_PER_NODE="0",
               MUSCLE_SBATCH=f"--nodes=1 --ntasks-per-node=1 --cpus-per-task=1 "
                             f"--output={tmp_path}/%x-%j.out")
    index = GRID.index(("pneumonia", "muscle--", "r18"))
    p = subprocess.run(["bash", "slurm/pipeline.sh", "--backbone", "r18", "--root", str(root),
                        "--array", str(index), *tiny_stages(moco_shards, task_shards)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    ids = re.findall(r" (?:job|array) (\d+)", p.stdout)
    cancel_after.extend(ids)
    assert p.returncode == 0 and len(ids) == 4, p.stdout + p.stderr
    assert_chained(ids)
    states = wait_pipeline(ids, timeout=540)
    logs = "".join(f.read_text()[-2000:] for f in sorted(tmp_path.glob("*.out")))
    assert states == dict.fromkeys([*ids[:3], f"{ids[3]}_{index}"], "COMPLETED"), logs
    assert_pipeline_ran(root, ["muscle--"])


@pytest.mark.timeout(600)
def test_launch_without_stage_runs_the_whole_pipeline_then_the_report(
        moco_shards, task_shards, tmp_path, cancel_after):
    root = tmp_path / "run"
    args = ["--backbone", "r18", "--root", str(root), "--time", "10", *CPU_LAUNCH,
            "--tasks", "pneumonia", *tiny_stages(moco_shards, task_shards)]

    before = all_jobs()  # every stage is checked before anything is submitted
    p = launch(*args, env=job_env(tmp_path / "no_torch_home"), cancel=cancel_after)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stdout + p.stderr
    assert "pretrained.imagenet: no ImageNet resnet18 weights" in p.stderr
    assert all_jobs() <= before and not root.exists()

    inits = ["mdmoco", "muscle"]
    proc = subprocess.Popen([sys.executable, "-m", "muscle_hpc.launch", *args, "--inits",
                             ",".join(inits), "--wait"], cwd=ROOT, env=job_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = ""
        for line in proc.stdout:  # the submissions, read while the jobs wait on each other
            out += line
            if len(submitted_ids(out)) == 4:
                break
        ids = submitted_ids(out)
        cancel_after.extend(ids)
        assert out.splitlines()[0] == (
            f"launch: no --stage given: running the whole pipeline (all) for r18 under {root}/ "
            f"with {CONFIGS / 'mdmoco_demo.yaml'}, {CONFIGS / 'continual_demo.yaml'}, "
            f"{CONFIGS / 'finetune_demo.yaml'}; on CPU"), out
        assert len(ids) == 4 and "finetune array" in out and "(2 element(s))" in out, out
        assert_chained(ids)
        rest, _ = proc.communicate(timeout=540)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + rest
    assert "finished (2 elements)" in rest
    assert_pipeline_ran(root, inits)
