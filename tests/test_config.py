import dataclasses
from pathlib import Path

import pytest
import torch

from muscle_hpc import config, registry
from muscle_hpc.config import (
    ConfigError,
    MocoConfig,
    check_moco,
    dump_yaml,
    load,
    load_config,
    to_dict,
)
from muscle_hpc.config.__main__ import main as describe_main
from muscle_hpc.config.describe import field_comments
from muscle_hpc.config.loader import entry_schema, key_type, schema_keys
from muscle_hpc.ds_engine import deepspeed_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def error(path=None, overrides=(), schema=MocoConfig) -> str:
    with pytest.raises(ConfigError) as e:
        load(path, list(overrides), schema)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_moco_v2_on_all_nine_sets(tmp_path):
    cfg = load_config(None)
    assert cfg == MocoConfig()
    assert cfg.data.datasets == list(registry.DATASETS)
    assert (cfg.model.K, cfg.model.m, cfg.model.T, cfg.model.mlp) == (65536, 0.999, 0.2, True)
    assert (cfg.optim.lr_base, cfg.optim.momentum, cfg.optim.weight_decay) == (0.03, 0.9, 1e-4)
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == cfg


def test_overrides_of_each_type():
    cfg = load_config(None, ["model.K=4096", "model.m=0.99", "model.mlp=false",
                             "data.datasets=[nih,mura]", "run.dir=/tmp/x", "model.T=1",
                             "optim.weight_decay=5e-4", "data.batch_size=512"])
    assert cfg.model.K == 4096 and cfg.model.m == 0.99 and cfg.model.mlp is False
    assert cfg.data.datasets == ["nih", "mura"] and cfg.run.dir == "/tmp/x"
    assert isinstance(cfg.model.T, float) and cfg.optim.weight_decay == 5e-4
    assert cfg.effective_lr == pytest.approx(0.06)
    assert load_config(None, ["data.datasets=nih,mura"]).data.datasets == ["nih", "mura"]


def test_override_wins_over_file(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  K: 1024\n  arch: resnet18\n")
    cfg = load_config(tmp_path / "c.yaml", ["model.K=2048"])
    assert (cfg.model.K, cfg.model.arch, cfg.model.dim) == (2048, "resnet18", 128)


def test_unknown_keys_suggest_the_closest(tmp_path):
    assert error(overrides=["model.k=3"]) == "model.k: unknown key (did you mean model.K?)"
    assert "did you mean data.batch_size?" in error(overrides=["data.batchsize=3"])
    assert "did you mean model.K?" in error(overrides=["modle.K=3"])
    (tmp_path / "c.yaml").write_text("optim:\n  epoch: 3\n")
    assert error(tmp_path / "c.yaml") == "optim.epoch: unknown key (did you mean optim.epochs?)"
    assert error(overrides=["zzz.qqq=1"]) == "zzz.qqq: unknown key"


@pytest.mark.parametrize("override, key, words", [
    ("model.K=abc", "model.K", "expected int"),
    ("model.mlp=3", "model.mlp", "expected bool"),
    ("model.T=[1]", "model.T", "expected float"),
    ("data.datasets=7", "data.datasets", "expected a list"),
    ("model.K=0", "model.K", ">= 1"),
    ("data.flip_prob=1.5", "data.flip_prob", "in [0.0, 1.0]"),
    ("model.T=0", "model.T", "> 0"),
    ("model.arch=vgg16", "model.arch", "not one of resnet18, resnet50"),
    ("model.bn=batch", "model.bn", "not one of shuffle, sync"),
    ("data.datasets=[nih,nih]", "data.datasets", "duplicate"),
    ("run.zero_stage=3", "run.zero_stage", "ZeRO stage 3 is not supported"),
    ("run.precision=fp16", "run.precision", "fp16 is not supported"),
    ("model=3", "model", "expected a section"),
])
def test_bad_values_are_one_line_naming_the_key(override, key, words):
    msg = error(overrides=[override])
    assert msg.startswith(key + ":") and words in msg


def test_file_errors_are_one_line(tmp_path):
    assert "not found" in error(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model:\n  K: [1, 2\n  m: 0.9\n")
    msg = error(tmp_path / "bad.yaml")
    assert "bad.yaml" in msg and "YAML syntax error at line" in msg
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "top level must be a mapping" in error(tmp_path / "list.yaml")
    assert "key=value" in error(overrides=["model.K"])


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["model.K=4096", "data.datasets=[mura]", "optim.weight_decay=1e-5"])
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert to_dict(cfg)["model"]["K"] == 4096


def test_other_schemas_reuse_the_loader():
    from dataclasses import dataclass, field

    from muscle_hpc.config import opt

    @dataclass(frozen=True)
    class Head:
        classes: int = opt(2, lo=1)

    @dataclass(frozen=True)
    class Tune:
        head: Head = field(default_factory=Head)
        lr: float = 0.1

    assert load(None, ["head.classes=5"], Tune).head.classes == 5
    assert error(overrides=["head.clases=5"], schema=Tune).endswith("(did you mean head.classes?)")


def test_deepspeed_config():
    cfg = load_config(None, ["run.zero_stage=1"])
    ds = deepspeed_config(cfg.run, cfg.data.batch_size, world_size=8, on_cuda=True)
    assert ds["train_batch_size"] == 256 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 1 and ds["zero_optimization"] == {"stage": 1}
    assert ds["zero_allow_untested_optimizer"] is True  # SGD under ZeRO 1/2
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert ds["gradient_clipping"] == 0 and ds["steps_per_print"] >= 10**6
    assert deepspeed_config(cfg.run, 256, 8, on_cuda=False)["torch_autocast"]["enabled"] is False
    fp32 = load_config(None, ["run.precision=fp32"]).run
    assert deepspeed_config(fp32, 256, 1, on_cuda=True)["torch_autocast"]["enabled"] is False
    bf16 = load_config(None, ["run.precision=bf16"]).run
    assert deepspeed_config(bf16, 256, 1, on_cuda=False)["torch_autocast"]["enabled"] is True


@pytest.mark.parametrize("schema, zero3_why", [
    (MocoConfig, "momentum update of MoCo's key encoder"),
    (config.ContinualConfig, "which L2-SP reads whole"),
    (config.FinetuneConfig, "evaluation runs the model outside DeepSpeed's forward")])
def test_fp16_and_zero3_are_refused_on_loading_each_stage_saying_why(schema, zero3_why):
    """Once, by the loader: the DeepSpeed JSON is only ever made from a loaded config."""
    assert error(overrides=["run.precision=fp16"], schema=schema).startswith(
        "run.precision: fp16 is not supported: its loss scaler skips overflowing steps")
    msg = error(overrides=["run.zero_stage=3"], schema=schema)
    assert msg.startswith("run.zero_stage: ZeRO stage 3 is not supported") and zero3_why in msg
    assert error(overrides=["run.zero_stage=4"], schema=schema) == \
        "run.zero_stage: must be in [0, 2], got 4"
    with pytest.raises(ConfigError, match="^data.batch_size: .*not divisible by the world size 3"):
        check_moco(load_config(None), 3)


def test_check_moco():
    check_moco(load_config(None), 8)
    with pytest.raises(ConfigError, match="^model.K: .*not a multiple of the global batch 96"):
        check_moco(load_config(None, ["data.batch_size=96"]), 8)
    with pytest.raises(ConfigError, match="^data.batch_size: .*not divisible"):
        check_moco(load_config(None, ["data.batch_size=256"]), 3)
    with pytest.raises(ConfigError, match="^data.batch_size: .*at least 2"):
        check_moco(load_config(None, ["data.batch_size=4", "model.K=8"]), 4)
    with pytest.raises(ConfigError, match="^optim.warmup_epochs"):
        check_moco(load_config(None, ["optim.warmup_epochs=200"]), 1)


def test_batch_norm_groups_must_cut_each_ranks_batch_into_groups_of_two_or_more():
    """model.bn_groups (8) is rounded up to a whole number per rank; each group needs >= 2."""
    check_moco(load_config(None, ["data.batch_size=16", "model.K=64"]), 1)  # 8 groups of 2
    check_moco(load_config(None, ["data.batch_size=54", "model.K=108"]), 3)  # 3 x 3 groups of 6
    check_moco(load_config(None), 16)  # 16 groups (one per rank) of 16
    for batch, world, splits in ((8, 1, 8), (48, 3, 3)):
        with pytest.raises(ConfigError, match=f"^model.bn_groups: 8 groups over {world} rank.* "
                                              f"{splits} per rank, which do not cut") as e:
            check_moco(load_config(None, [f"data.batch_size={batch}", "model.K=96"]), world)
        assert "\n" not in str(e.value)
    check_moco(load_config(None, ["data.batch_size=8", "model.K=96", "model.bn_groups=4"]), 1)
    with pytest.raises(ConfigError, match="^model.bn_groups: 8 groups are shuffle-BN's"):
        check_moco(load_config(None, ["model.bn=sync"]), 8)
    check_moco(load_config(None, ["model.bn=sync", "model.bn_groups=1"]), 8)



@pytest.mark.parametrize("name, world", [("mdmoco_r50", 8), ("mdmoco_r18", 4),
                                         ("mdmoco_demo", 2)])
def test_shipped_configs_load_and_validate(name, world):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    check_moco(cfg, world)
    deepspeed_config(cfg.run, cfg.data.batch_size, world, on_cuda=False)
    assert cfg.data.datasets == list(registry.DATASETS)
    assert (cfg.data.mean, cfg.data.std, cfg.data.max_degrees) == (122.786, 18.390, 10.0)


def test_shipped_configs_are_the_papers():
    for arch in ("18", "50"):
        cfg = load_config(CONFIGS / f"mdmoco_r{arch}.yaml")
        assert cfg.model.arch == f"resnet{arch}" and cfg.data.root == "shards"
        assert cfg.data.batch_size == 256 and cfg.optim.epochs == 200
        assert cfg == MocoConfig(data=cfg.data, model=cfg.model, optim=MocoConfig().optim,
                                 run=cfg.run)
    demo = load_config(CONFIGS / "mdmoco_demo.yaml")
    assert (demo.model.arch, demo.data.batch_size, demo.model.K, demo.optim.epochs,
            demo.model.m) == ("resnet18", 16, 256, 1, 0.99)  # a short run: MoCo's CIFAR demo m
    assert demo.data.root == "demo_run/shards"


def test_deepspeed_accepts_the_generated_config():
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    cfg = load_config(CONFIGS / "mdmoco_demo.yaml", ["run.precision=bf16", "run.zero_stage=2"])
    parsed = ds_config.DeepSpeedConfig(deepspeed_config(cfg.run, cfg.data.batch_size, 1,
                                                        on_cuda=False))  # world 1 here
    assert (parsed.train_batch_size, parsed.gradient_accumulation_steps) == (16, 1)
    assert parsed.zero_optimization_stage == 2 and parsed.torch_autocast_enabled
    assert parsed.torch_autocast_dtype == torch.bfloat16 and not parsed.bfloat16_config.enabled


@pytest.mark.parametrize("name", ["continual_r18", "continual_r50"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_paper_continual_configs_run_on_one_to_eight_ranks(name, world):
    """TBX's global batch of 8 is one image per rank on 8 GPUs: batch norm then pools the
    statistics over ranks (model.sync_bn), and the paper's global batches are kept."""
    from muscle_hpc.config import ContinualConfig, check_continual, load

    cfg = load(CONFIGS / f"{name}.yaml", [], ContinualConfig)
    check_continual(cfg, world)
    assert {t: cfg.batch_size(t) for t in cfg.data.tasks} == \
        {"pneumonia": 32, "mura": 32, "lung": 16, "tbx": 8}
    if world == 8:
        with pytest.raises(ConfigError, match="1 image per rank, which batch norm can use only "
                                              "with model.sync_bn=true"):
            check_continual(load(CONFIGS / f"{name}.yaml", ["model.sync_bn=false"],
                                 ContinualConfig), world)


def test_sixteen_ranks_take_lung_at_one_image_each_and_refuse_tbx_in_one_line():
    from muscle_hpc.config import ContinualConfig, check_continual, load

    without_tbx = load(CONFIGS / "continual_r50.yaml", ["data.tasks=pneumonia,mura,lung"],
                       ContinualConfig)
    check_continual(without_tbx, 16)  # lung: 16 over 16 ranks
    with pytest.raises(ConfigError, match=r"^tasks.tbx.batch_size: global batch 8 over 16 ranks "
                                          r"is less than one image per rank; run this task on at "
                                          r"most 8 ranks"):
        check_continual(load(CONFIGS / "continual_r50.yaml", [], ContinualConfig), 16)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("task", ["pneumonia", "mura", "lung", "tbx"])
def test_finetune_config_runs_every_task_on_one_to_eight_ranks(task, world):
    from muscle_hpc.config import FinetuneConfig, check_finetune, check_finetune_task, load

    cfg = load(CONFIGS / "finetune.yaml", [], FinetuneConfig)
    check_finetune(cfg)
    check_finetune_task(cfg, task, world)


def test_demo_finetunes_at_the_paper_configs_learning_rate_per_image():
    # The demo's small batches at the paper's lr trained MURA from scratch at 4x the step per
    # image, and it learned nothing (train loss stayed at ln 2); linear scaling keeps the step.
    from muscle_hpc.config import FinetuneConfig, load

    paper = load(CONFIGS / "finetune.yaml", [], FinetuneConfig)
    demo = load(CONFIGS / "finetune_demo.yaml", [], FinetuneConfig)
    for name in ("pneumonia", "mura", "lung", "tbx"):
        ours, theirs = demo.task(name), paper.task(name)
        assert ours.lr / ours.batch_size == pytest.approx(theirs.lr / theirs.batch_size), name


def test_the_demo_grid_is_bench_learnings_fine_tune_on_10_percent():
    """The demo fine-tunes as bench.learning does at its headline fraction (one seed of it):
    10 % of each split, 15 epochs, the LR divided after 10, finetune_demo.yaml's LR and batch."""
    from bench.learning import FT_BATCH
    from muscle_hpc.config import FinetuneConfig, load

    demo = load(CONFIGS / "finetune_demo.yaml", [], FinetuneConfig)
    scarce = load(CONFIGS / "finetune_demo_10pct.yaml", [], FinetuneConfig)
    assert scarce.grid.fractions == [0.1] and scarce.grid.protocols == ["finetune"]
    for name in ("pneumonia", "mura", "lung", "tbx"):
        task = scarce.task(name)
        assert (task.epochs, task.lr_step_epochs) == (15, max(1, 15 * 2 // 3)), name
        assert (task.lr, task.batch_size) == (demo.task(name).lr, FT_BATCH[name]), name


def test_a_global_batch_of_one_is_refused():
    from muscle_hpc.config import check_task_batch

    with pytest.raises(ConfigError, match="^k: a global batch of 1; batch norm needs at least 2"):
        check_task_batch("k", 1, 1, True)
    with pytest.raises(ConfigError, match="^k: global batch 6 is not divisible by the world "
                                          "size 4"):
        check_task_batch("k", 6, 4, True)


def test_a_config_may_start_from_a_base_and_lay_its_sections_over_it(tmp_path):
    from muscle_hpc.config import FinetuneConfig, load

    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("data:\n  root: shared\n  seed: 3\n"
                                        "tasks:\n  mura: {epochs: 7}\n")
    (tmp_path / "sub" / "mine.yaml").write_text(
        "base: ../base.yaml\ndata:\n  seed: 5\ntasks:\n  knee: {dataset: knee, kind: "
        "classification, classes: [normal, mild, severe], epochs: 4}\n")
    cfg = load(tmp_path / "sub" / "mine.yaml", ["tasks.knee.lr=0.5"], FinetuneConfig)
    assert (cfg.data.root, cfg.data.seed) == ("shared", 5)  # key by key, the file's wins
    assert cfg.tasks["mura"].epochs == 7 and cfg.tasks["mura"].batch_size == 32
    assert list(cfg.tasks) == ["pneumonia", "mura", "lung", "tbx", "knee"]
    knee = cfg.definition("knee")
    assert (knee.kind, knee.classes, knee.headline, knee.title) == \
        ("classification", ("normal", "mild", "severe"), "auc", "knee")
    assert knee.metrics[:2] == ("acc", "auc") and "sen_mild" in knee.metrics
    assert cfg.tasks["knee"].lr == 0.5
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="base: loop.yaml includes itself"):
        load(tmp_path / "loop.yaml", [], FinetuneConfig)
    (tmp_path / "gone.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml: config file not found \(the base of"):
        load(tmp_path / "gone.yaml", [], FinetuneConfig)


def test_a_dataset_of_the_users_may_be_pre_trained_on():
    from muscle_hpc.config import check_moco

    cfg = load_config(None, ["data.datasets=[nih,knee_ap]", "data.batch_size=16"])
    check_moco(cfg, 1)
    with pytest.raises(ConfigError, match="'../x' is not a dataset name"):
        check_moco(load_config(None, ["data.datasets=[nih,../x]", "data.batch_size=8"]), 1)


@dataclasses.dataclass(frozen=True)
class _Base:
    # Above a field,
    # on two lines.
    a: int = config.opt(1, lo=0)
    b: str = "x"  # at the end of its line

    def method(self, c: int = 2):  # not a field
        d: int = c
        return d


@dataclasses.dataclass(frozen=True)
class _Derived(_Base):
    e: list[str] = config.opt(
        ["p", "q"],  # on a continuation line
        choices=("p", "q", "r"))
    f: float = 0.5


def test_field_comments_are_the_lines_above_and_the_end_of_the_line():
    assert field_comments(_Derived) == {
        "a": "Above a field, on two lines.", "b": "at the end of its line",
        "e": "on a continuation line", "f": ""}


@pytest.mark.parametrize("stage", ["mdmoco", "continual", "finetune"])
def test_describe_lists_every_key_with_its_type_default_and_comment(stage, capsys):
    assert describe_main(["--describe", stage]) == 0
    lines = capsys.readouterr().out.splitlines()
    described = {line.split(" ", 1)[0] for line in lines[1:] if not line.startswith(" ")}
    schema = config.SCHEMAS[stage]
    leaves = set()
    for key in schema_keys(schema):  # every key a file or override can set, sections aside
        tp = key_type(schema, key)
        if not dataclasses.is_dataclass(tp) and entry_schema(tp) is None:
            leaves.add(key)
    if stage == "finetune":  # user-named entries: described once, as tasks.<name>.KEY
        leaves = {k for k in leaves if not k.startswith("tasks.")}
        described_tasks = {k for k in described if k.startswith("tasks.")}
        assert described_tasks == {"tasks.<name>:", *(
            f"tasks.<name>.{f.name}" for f in dataclasses.fields(config.FtTask))}
        described -= described_tasks
    assert described == leaves
    text = "\n".join(lines)
    if stage == "mdmoco":
        assert "model.bn_groups (int) = 8  [>= 1]\n    Shuffle-BN groups over the global" in text
        assert "data.max_degrees (float) = 10.0  [in [0, 180]]\n    each view's rotation" in text
        assert "run.precision (str) = auto  [one of auto, fp32, bf16; not fp16]" in text
    if stage == "continual":
        assert "tasks.tbx.batch_size (int) = 8  [>= 1]\n    global, over all ranks" in text
        assert "model.rois_per_image (int) = 512" in text  # inherited from HeadsConfig
    if stage == "finetune":
        assert "tasks.<name>.flip_pairs (dict[str, str] | None) = null\n    {class: its" in text


def test_describe_refuses_an_unknown_stage(capsys):
    with pytest.raises(SystemExit) as e:
        describe_main(["--describe", "cl"])
    assert e.value.code == 2 and "invalid choice: 'cl'" in capsys.readouterr().err
