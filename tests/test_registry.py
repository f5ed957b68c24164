"""muscle_hpc/registry.py is the one list of datasets, tasks, inits, backbones and the run
layout: everything that names them either reads it or agrees with it, checked here. A new
task, dataset or init that is missing somewhere fails one of these tests, naming where."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from muscle_hpc import config, registry

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# What a layout is checked with: a run root that shell quoting, word splitting or evaluation
# would change.
ODD_ROOT = "runs dir/a=b/$(touch pwned)/'q'"


def choices(schema, name):
    return next(f for f in dataclasses.fields(schema) if f.name == name).metadata["choices"]


def run(*argv, **kwargs):
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


def key_values(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def comments(path: Path) -> str:
    """A script's comment lines as one line of words (so that a reflow does not matter)."""
    lines = path.read_text().splitlines()
    return " ".join(w for line in lines if line.startswith("#") for w in line[1:].split())


# --- the registry itself ------------------------------------------------------------------


def test_the_registry_imports_without_the_training_stack():
    # The launcher and slurm/pipeline.sh run it on login nodes, before anything heavy loads.
    p = run(sys.executable, "-c", "import sys, muscle_hpc.registry; print(sorted({'torch', "
            "'numpy', 'yaml', 'deepspeed', 'muscle_hpc.config'} & set(sys.modules)))")
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_the_grid_is_backbone_major_and_its_index_formula_holds():
    assert len(registry.GRID) == len(set(registry.GRID)) == \
        len(registry.TASKS) * len(registry.INITS) * len(registry.BACKBONES)
    for i, (task, init, bb) in enumerate(registry.GRID):
        assert registry.grid_index(task, init, bb) == i
        assert i in registry.grid_indices(bb)
    covered = [i for bb in registry.BACKBONE_NAMES for i in registry.grid_indices(bb)]
    assert covered == list(range(len(registry.GRID)))


def test_the_run_layout_is_the_documented_one():
    assert registry.mdmoco_dir("runs", "r50") == Path("runs/mdmoco_r50")
    assert registry.continual_dir("runs", "r50") == Path("runs/continual_r50")
    assert registry.continual_dir("runs", "r18", "muscle--") == Path("runs/continual_r18_muscle--")
    assert registry.FinetuneRun("lung", "muscle--", "r18").dir("runs") == \
        Path("runs/finetune/lung_r18_muscle--")
    assert registry.pretrained_template("muscle--") == \
        "{root}/continual_{backbone}_muscle--/backbone_torchvision.pth"
    made = [i.name for i in registry.INITS.values() if i.made_by]
    assert sorted(made) == sorted(["mdmoco", *registry.CL_METHODS])
    for init in made:
        assert registry.init_run_dir("R", "r18", init).parent == Path("R")
    with pytest.raises(ValueError, match="not made under the run root"):
        registry.init_run_dir("R", "r18", "imagenet")


@pytest.mark.parametrize("bb", registry.BACKBONE_NAMES)
def test_the_layout_command_prints_the_layout_verbatim(bb):
    p = run(sys.executable, "-m", "muscle_hpc.registry", "layout", "--root", ODD_ROOT,
            "--backbone", bb)
    assert p.returncode == 0, p.stderr
    assert key_values(p.stdout) == registry.layout(ODD_ROOT, bb)
    assert key_values(p.stdout)["MDMOCO_DIR"] == f"{ODD_ROOT}/mdmoco_{bb}"


@pytest.mark.parametrize("argv, says", [
    (["--backbone", "r34"], "registry: error: --backbone: r34 is not one of r18, r50"),
    (["--root", "a\nb"], "registry: error: --root: a line break"),
])
def test_the_layout_command_refuses_in_one_line(argv, says):
    p = run(sys.executable, "-m", "muscle_hpc.registry", "layout", *argv)
    assert p.returncode == 2 and p.stdout == "", p.stdout
    assert p.stderr.startswith(says) and p.stderr.count("\n") == 1, p.stderr


# --- plug-ins: data_prep's datasets, muscle_hpc's tasks, the model builders ---------------


def test_data_prep_plugins_are_the_datasets_and_the_tasks_read_its_task_sets():
    from data_prep import datasets, synth

    assert registry.DATASETS == datasets.NAMES == synth.NAMES
    specs = {name: datasets.get_spec(name) for name in registry.DATASETS}
    assert all(spec.name == name for name, spec in specs.items())
    # A converter splits a task set 80/10/10 and a pre-training set all into train: a task
    # reading a pre-training set would find no valid or test split.
    task_sets = {name for name, spec in specs.items() if spec.role == "task"}
    assert task_sets == {t.dataset for t in registry.TASKS.values()}


def test_task_objects_are_the_registry_definitions_built_by_kind():
    from muscle_hpc import tasks

    assert tuple(tasks.PAPER_TASKS) == registry.TASK_NAMES
    assert not [p.name for p in (ROOT / "muscle_hpc" / "tasks").glob("*.py")
                if p.stem not in ("__init__", "base")]  # no per-task plug-in files any more
    for name, entry in registry.TASKS.items():
        task = tasks.PAPER_TASKS[name]
        assert type(task) is tasks.base.BY_KIND[entry.kind], name
        assert (task.name, task.dataset, task.kind, task.classes, task.headline,
                task.metrics) == (entry.name, entry.dataset, entry.kind, entry.classes,
                                  entry.headline, entry.metrics), name
        assert entry.headline in entry.metrics, name
    assert tuple(tasks.base.BY_KIND) == registry.KINDS


def _records(kind: str, k: int) -> list:
    """A few records of a task of ``kind`` with ``k`` classes, every class present."""
    import numpy as np

    from muscle_hpc import metrics

    if kind == "classification":
        return [(c, list(np.roll(np.linspace(0.1, 0.9, k) / np.linspace(0.1, 0.9, k).sum(), c)))
                for c in (*range(k), *range(k))]
    if kind == "multilabel":
        return [([1] * k, [0.8] * k), ([0] * k, [0.3] * k), ([1] * k, [0.2] * k)]
    if kind == "regression":
        return [(1.0, 2.0), (3.0, 2.5), (7.0, 6.0)]
    if kind == "segmentation":
        mask = np.arange(16).reshape(4, 4) % k
        return [metrics.confusion(mask, mask, k), metrics.confusion(mask, mask[::-1], k)]
    boxes = np.array([[0.0, 0.0, 10.0, 10.0]])
    return [((boxes, np.array([c])), (boxes, np.array([0.9]), np.array([c])))
            for c in range(1, k + 1)]


@pytest.mark.parametrize("kind", registry.KINDS)
@pytest.mark.parametrize("k", [2, 3])
def test_task_metrics_are_exactly_what_each_kind_returns(kind, k):
    """registry.task_metrics (the report's columns) and the task objects' metrics agree, for
    validation and for the test split (which adds only CIs and counts)."""
    from muscle_hpc import tasks

    if kind == "regression" and k == 3:
        return
    classes = () if kind == "regression" else tuple(f"c{i}" for i in range(k))
    definition = registry.Task("t", "nih", kind, "T", classes)
    task = tasks.build(definition)
    assert task.metrics == registry.task_metrics(kind, classes)
    records = _records(kind, k)
    scores = task.score(records, config.MetricsConfig())
    assert tuple(scores) == task.metrics
    test, _ = task.test_metrics(records, config.finetune.FtEvalConfig(bootstrap=3))
    assert tuple(test)[:len(task.metrics)] == task.metrics
    extra = set(test) - set(task.metrics)
    assert all(key.endswith("_ci") and key[:-3] in task.metrics or
               key in ("ci_resamples", "auc_ci_skipped") for key in extra), extra


def test_every_registry_backbone_can_be_built():
    from muscle_hpc.models.backbone import ARCHS
    from muscle_hpc.models.heads import trunk_channels

    for bb in registry.BACKBONES.values():
        assert bb.arch in ARCHS
        assert set(trunk_channels(bb.arch)) == {"layer1", "layer2", "layer3", "layer4"}


# --- readers: config, report, summary, launch, the fine-tune stage, bench -----------------


def test_config_choices_defaults_and_sections_are_the_registry():
    assert config.load_config(None).data.datasets == list(registry.DATASETS)
    assert choices(config.continual.ClDataConfig, "tasks") == registry.TASK_NAMES
    assert config.load(None, [], config.ContinualConfig).data.tasks == list(registry.TASK_NAMES)
    assert choices(config.mdmoco.MocoRunConfig, "monitor_tasks") == registry.KNN_TASKS
    assert choices(config.mdmoco.MocoModelConfig, "arch") == \
        choices(config.continual.ClModelConfig, "arch") == registry.ARCHS
    assert choices(config.continual.ClMethodConfig, "method") == registry.CL_METHODS
    assert [f.name for f in dataclasses.fields(config.continual.TasksConfig)] == \
        list(registry.TASK_NAMES)
    cl, ft = config.ContinualConfig(), config.FinetuneConfig()
    assert list(ft.tasks) == ft.grid.tasks == list(registry.TASK_NAMES)
    for task in registry.TASKS.values():
        assert cl.batch_size(task.name) == ft.task(task.name).batch_size == task.batch_size
        assert ft.definition(task.name) == task  # a paper task is its registry definition
    keys = {i.pretrained_key for i in registry.INITS.values() if i.pretrained_key}
    assert {f.name for f in dataclasses.fields(config.finetune.PretrainedConfig)} == keys
    for init in (i for i in registry.INITS.values() if i.made_by):
        assert getattr(ft.pretrained, init.pretrained_key) == \
            registry.pretrained_template(init.name)
    assert cl.run.dir == str(registry.continual_dir("runs", "r50"))
    assert cl.model.init == str(registry.exported_backbone(registry.mdmoco_dir("runs", "r50")))


def test_config_refuses_a_task_the_knn_monitor_cannot_read_by_its_kind():
    for task in (t for t in registry.TASKS.values() if t.name not in registry.KNN_TASKS):
        with pytest.raises(config.ConfigError, match=f"{task.name} is a {task.kind} task"):
            config.load_config(None, [f"run.monitor_tasks=[{task.name}]"])


def test_report_rows_columns_and_titles_are_the_registry():
    from muscle_hpc import report

    assert list(report.definitions({})) == list(registry.TASK_NAMES)
    assert list(report.INIT_TITLES) == list(report.CSV_INIT_NAMES) == list(registry.INIT_NAMES)
    assert list(report.BACKBONE_TITLES) == list(registry.BACKBONE_NAMES)
    for name, task in registry.TASKS.items():
        assert report.definitions({})[name] is task
        assert set(task.metrics) <= set(report.METRIC_NAMES), name
    assert all(title.isascii() for title in report.CSV_INIT_NAMES.values())
    tabled = [t for _, tasks in report.TABLES.values() for t in tasks]
    assert sorted(tabled) == sorted(registry.TASK_NAMES)  # every task in one table, once
    assert report.missing_line({}).startswith(f"Missing {len(registry.GRID)} of "
                                              f"{len(registry.GRID)} results")


def test_the_summary_reads_every_task_set_once():
    from muscle_hpc.data import summary

    assert len(dict(summary.TASK_DATASETS)) == len(summary.TASK_DATASETS)
    assert dict(summary.TASK_DATASETS) == {t.dataset: t.kind for t in registry.TASKS.values()}


def test_launch_choices_and_defaults_are_the_registry(capsys):
    from muscle_hpc import launch

    args = launch.parse_args(["--stage", "finetune", "--config", "x.yaml"])
    # tasks: None is the config's grid.tasks (its own tasks may be any)
    assert (args.tasks, args.inits, args.backbones) == \
        (None, list(registry.INIT_NAMES), list(registry.BACKBONE_NAMES))
    with pytest.raises(SystemExit):
        launch.parse_args(["--stage", "all", "--backbone", "r34"])
    assert "invalid choice: 'r34'" in capsys.readouterr().err


@pytest.mark.parametrize("bb", registry.BACKBONE_NAMES)
def test_launch_all_writes_the_registry_layout(bb, tmp_path):
    from muscle_hpc import launch

    root = tmp_path / ODD_ROOT
    made = [i for i in registry.INIT_NAMES if registry.INITS[i].made_by or i == "scratch"]
    args = launch.parse_args(["--stage", "all", "--backbone", bb, "--root", str(root),
                              "--inits", ",".join(made), "data.synthetic=4",
                              "run.allow_cpu=true"])
    steps, got_root = launch.plan_all(args, 1, False)
    assert got_root == root
    moco, cl, cl_minus, ft = (s.argvs for s in steps)
    assert moco[0][1] == str(ROOT / registry.default_config("mdmoco", bb))
    assert moco[0][-1] == f"run.dir={registry.mdmoco_dir(root, bb)}"
    init = f"model.init={registry.exported_backbone(registry.mdmoco_dir(root, bb))}"
    for argvs, method in ((cl, "muscle"), (cl_minus, "muscle--")):
        assert argvs[0][1] == str(ROOT / registry.default_config("continual", bb))
        assert init in argvs[0] and f"cl.method={method}" in argvs[0]
        assert argvs[0][-1] == f"run.dir={registry.continual_dir(root, bb, method)}"
    selected = [tuple(a[a.index(f) + 1] for f in ("--task", "--init", "--backbone")) for a in ft]
    assert selected == [g for g in registry.GRID if g[2] == bb and g[1] in made]
    assert all(a[-1] == f"run.root={root}" for a in ft)


def test_launch_all_gives_each_fine_tune_element_one_gpu(tmp_path):
    """As slurm/pipeline.sh: MD-MoCo and continual on --gpus-per-node, one task each; every
    fine-tune element on one GPU, checked for that world size of 1."""
    from muscle_hpc import launch

    args = launch.parse_args(["--stage", "all", "--backbone", "r18", "--root", str(tmp_path),
                              "--gpus-per-node", "8", "--inits", "scratch", "--tasks", "lung",
                              "data.synthetic=8"])
    steps = launch.plan_all(args, 8, True)[0]
    assert [(s.label, s.gpus_per_node, s.tasks_per_node) for s in steps] == [
        ("mdmoco", 8, 8), ("cl", 8, 8), ("cl-muscle--", 8, 8), ("finetune", 1, 1)]


def test_the_finetune_stage_reads_the_grid_and_the_layout(tmp_path, capsys):
    from muscle_hpc.stages import common, finetune

    assert [(sel.task, sel.init, sel.backbone)
            for sel in finetune.grid(finetune.load(None, []))] == list(registry.GRID)
    cfg = config.load(CONFIGS / "finetune.yaml", [f"run.root={tmp_path}"],
                      config.FinetuneConfig)
    for task, init, bb in registry.GRID:
        sel = registry.FinetuneRun(task, init, bb)
        assert finetune.output_dir(cfg, sel) == tmp_path / "finetune" / f"{task}_{bb}_{init}"
        if registry.INITS[init].made_by:
            # the YAML's templates find what the earlier stages write
            assert Path(common.init_path(cfg, sel)) == \
                registry.exported_backbone(registry.init_run_dir(tmp_path, bb, init))
    index = registry.grid_index("lung", "scratch", "r50")
    assert finetune.main(["--grid-index", str(index), "--check", "data.synthetic=4",
                          f"run.root={tmp_path}", "run.allow_cpu=true"]) == 0
    out = capsys.readouterr().out
    assert f"output {tmp_path / 'finetune' / 'lung_r50_scratch'}\n" in out


def test_bench_learning_has_a_batch_for_every_task():
    from bench import learning

    assert set(learning.FT_BATCH) == set(registry.TASK_NAMES)


# --- files that cannot import it: YAMLs, shell scripts, README ----------------------------


def yaml_of(name: str) -> dict:
    """A shipped config as its YAML says it, laid over its ``base:`` if it has one."""
    return config.loader.read_with_bases(CONFIGS / name)


def backbone_of(arch: str) -> str:
    return next(b.name for b in registry.BACKBONES.values() if b.arch == arch)


def test_the_default_configs_exist_for_every_backbone():
    for bb, entry in registry.BACKBONES.items():
        for stage in ("mdmoco", "continual"):
            assert yaml_of(Path(registry.default_config(stage, bb)).name)["model"]["arch"] == \
                entry.arch
        assert (ROOT / registry.default_config("finetune", bb)).is_file()


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("mdmoco_*.yaml")))
def test_mdmoco_yamls_list_every_dataset_and_write_the_registry_layout(name):
    y = yaml_of(name)
    assert y["data"]["datasets"] == list(registry.DATASETS)
    assert set(y["run"]["monitor_tasks"]) <= set(registry.KNN_TASKS)
    run_dir = Path(y["run"]["dir"])
    assert run_dir == registry.mdmoco_dir(run_dir.parent, backbone_of(y["model"]["arch"]))


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("continual_*.yaml")))
def test_continual_yamls_name_every_task_and_the_registry_layout(name):
    y = yaml_of(name)
    assert y["data"]["tasks"] == list(y["tasks"]) == list(registry.TASK_NAMES)
    bb, run_dir = backbone_of(y["model"]["arch"]), Path(y["run"]["dir"])
    assert run_dir == registry.continual_dir(run_dir.parent, bb, y["cl"]["method"])
    assert Path(y["model"]["init"]) == \
        registry.exported_backbone(registry.mdmoco_dir(run_dir.parent, bb))


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("finetune*.yaml")))
def test_finetune_yamls_name_every_task_and_the_registry_templates(name):
    y = yaml_of(name)
    assert list(y["tasks"]) == list(registry.TASK_NAMES)
    for init in (i for i in registry.INITS.values() if i.made_by):
        assert y["pretrained"][init.pretrained_key] == registry.pretrained_template(init.name)


@pytest.mark.parametrize("bb", registry.BACKBONE_NAMES)
def test_pipeline_sh_submits_with_the_registry_layout(bb):
    p = run("bash", "slurm/pipeline.sh", "--backbone", bb, "--root", ODD_ROOT, "--print-layout")
    assert p.returncode == 0, p.stderr
    expected = registry.layout(ODD_ROOT, bb)
    del expected["FINETUNE_ELEMENTS"]
    assert key_values(p.stdout) == expected
    assert not (ROOT / "pwned").exists()
    # what the user gives wins over the defaults
    p = run("bash", "slurm/pipeline.sh", "--backbone", bb, "--array", "2,7", "--cl-config",
            "configs/continual_demo.yaml", "--print-layout")
    got = key_values(p.stdout)
    assert (got["FINETUNE_ARRAY"], got["CL_CONFIG"]) == ("2,7", "configs/continual_demo.yaml")


FAKE_SBATCH = """#!/usr/bin/env bash
n=$(( $(ls "$SBATCH_CALLS" | wc -l) + 1 ))
printf '%s\\0' "$@" > "$SBATCH_CALLS/$n"
echo "$n"
"""


def test_pipeline_sh_submits_what_it_prints(tmp_path):
    """The printed layout is the one submitted (sbatch replaced by a recorder)."""
    calls, bin_dir = tmp_path / "calls", tmp_path / "bin"
    calls.mkdir()
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SBATCH_CALLS": str(calls)}
    argv = ["bash", "slurm/pipeline.sh", "--backbone", "r18", "--root", ODD_ROOT]
    printed = key_values(run(*argv, "--print-layout", env=env).stdout)
    p = run(*argv, env=env)
    assert p.returncode == 0, p.stderr
    moco, cl, cl_minus, ft = (calls.joinpath(str(n)).read_text().split("\0")[:-1]
                              for n in range(1, 5))
    assert moco[-1] == f"run.dir={printed['MDMOCO_DIR']}"
    assert moco[moco.index("slurm/mdmoco.sh") + 1] == printed["MDMOCO_CONFIG"]
    for args, key in ((cl, "MUSCLE_DIR"), (cl_minus, "MUSCLE_MINUS_DIR")):
        assert args[-1] == f"run.dir={printed[key]}"
        assert f"model.init={printed['MDMOCO_EXPORT']}" in args
        assert args[args.index("slurm/cl.sh") + 1] == printed["CL_CONFIG"]
    assert f"--array={printed['FINETUNE_ARRAY']}" in ft
    assert ft[ft.index("slurm/finetune_array.sh") + 1] == printed["FINETUNE_CONFIG"]
    assert ft[-1] == f"run.root={ODD_ROOT}"
    assert not (ROOT / "pwned").exists()


def test_pipeline_sh_refuses_an_unknown_backbone_in_one_line():
    p = run("bash", "slurm/pipeline.sh", "--backbone", "r34", "--print-layout")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == "pipeline: error: --backbone: r34 is not one of r18, r50\n"


def test_the_scripts_comments_state_the_grid():
    per_bb = len(registry.TASKS) * len(registry.INITS)
    array = comments(ROOT / "slurm/finetune_array.sh")
    assert f"({len(registry.TASKS)} x {len(registry.INITS)} x {len(registry.BACKBONES)})" in array
    assert f"index = backbone*{per_bb} + task*{len(registry.INITS)} + init" in array
    # sbatch without --array runs the whole grid
    assert re.search(r"SBATCH --array=(\S+)", array)[1] == f"0-{len(registry.GRID) - 1}"
    spans = {bb: f"{r.start}-{r.stop - 1}" for bb in registry.BACKBONE_NAMES
             for r in [registry.grid_indices(bb)]}
    halves = ", ".join(f"{spans[bb]} the {registry.BACKBONES[bb].title} half" for bb in spans)
    assert "--array=" + halves.replace(" the ", " is the ", 1) in array
    pipeline = comments(ROOT / "slurm/pipeline.sh")
    assert f"the backbone's grid elements (the paper's {per_bb})" in pipeline
    assert "--array " + " or ".join(f"{spans[bb]} ({bb})" for bb in spans) in pipeline


def test_the_readme_lists_every_dataset():
    readme = (ROOT / "README.md").read_text()
    assert f"`NAME` is one of `{' '.join(registry.DATASETS)}`" in readme
