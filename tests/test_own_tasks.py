"""Tasks defined in YAML alone, on datasets converted for them: NIH ChestX-ray14's findings
(multi-label) and RSNA Bone Age (regression), two of the nine pre-training sets converted a
second time as task sets (``--role task --as``), fine-tuned by the stage and tabled by the
report."""

import json

import pytest
from conftest import ROOT, run_ranks

from data_prep import convert
from data_prep.datasets.nih import LABEL_NAMES
from muscle_hpc import config, report
from muscle_hpc.tasks import build

FINDINGS = [n for n in LABEL_NAMES if n != "No Finding"]  # the 14
TASKS_YAML = f"""\
base: {ROOT / "configs" / "finetune_demo.yaml"}
tasks:
  findings: {{dataset: nih-findings, kind: multilabel, classes: [{", ".join(FINDINGS)}],
             batch_size: 4, epochs: 1}}
  bone-age: {{dataset: bone-age, kind: regression, target: boneage, title: Bone age,
             batch_size: 4, epochs: 2}}
  grade: {{dataset: knee, kind: classification}}
  lobes: {{dataset: lobes, kind: segmentation, classes: [background, left, right]}}
  lesions: {{dataset: lesions, kind: detection, classes: [big, small], box_categories: [3, 2]}}
"""


@pytest.fixture(scope="module")
def own_shards(task_shards):
    """NIH and bone age of the tiny demo data as task sets (80/10/10 by patient), named apart
    from their pre-training copies."""
    downloads, out = task_shards.parent / "downloads", task_shards.parent / "own_shards"
    for name, new in (("nih", "nih-findings"), ("boneage", "bone-age")):
        assert convert.main(["--dataset", name, "--role", "task", "--as", new, "--root",
                             str(convert.find_dataset_folder(convert.get_spec(name), downloads)),
                             "--out", str(out), "--size", "64x48", "--workers", "1"]) == 0
    return out


def test_a_pre_training_set_converts_as_a_task_set_only_under_another_name(own_shards, capsys):
    manifest = json.loads((own_shards / "nih-findings" / "manifest.json").read_text())
    assert manifest["role"] == "task" and set(manifest["splits"]) == {"train", "valid", "test"}
    assert manifest["fields"]["labels"]["names"] == list(LABEL_NAMES)
    assert convert.main(["--dataset", "nih", "--role", "task", "--root", str(own_shards),
                         "--out", str(own_shards)]) == 2
    assert "give it another name with --as" in capsys.readouterr().err
    assert convert.main(["--dataset", "nih", "--as", "mura", "--root", str(own_shards),
                         "--out", str(own_shards)]) == 2
    assert "--as: dataset name 'mura' is taken" in capsys.readouterr().err


def test_yaml_defines_a_task_of_every_kind(tmp_path):
    (tmp_path / "tasks.yaml").write_text(TASKS_YAML)
    cfg = config.load(tmp_path / "tasks.yaml", [], config.FinetuneConfig)
    config.check_finetune(cfg)
    kinds = {name: build(cfg.definition(name)).kind for name in
             ("findings", "bone-age", "grade", "lobes", "lesions")}
    assert kinds == {"findings": "multilabel", "bone-age": "regression",
                     "grade": "classification", "lobes": "segmentation", "lesions": "detection"}
    assert cfg.definition("bone-age").metrics == ("mae", "rmse")
    assert cfg.definition("lesions").metrics == ("map", "ap_big", "ap_small")
    assert cfg.definition("grade").classes == ()  # the dataset's, read from its shards


def test_nih_findings_and_bone_age_fine_tune_from_yaml_and_get_their_tables(own_shards,
                                                                           tmp_path):
    (tmp_path / "tasks.yaml").write_text(TASKS_YAML)
    for task in ("findings", "bone-age"):
        run_ranks("finetune", 1, ["--config", str(tmp_path / "tasks.yaml"), "--task", task,
                                  "--init", "scratch", "--backbone", "r18",
                                  f"data.root={own_shards}", f"run.root={tmp_path}",
                                  "run.max_steps_per_epoch=2", "data.num_workers=1",
                                  "eval.bootstrap=10"])
    findings = json.loads((tmp_path / "finetune" / "findings_r18_scratch" / "results.json")
                          .read_text())
    assert findings["classes"] == FINDINGS  # 14 of the shard's 15 columns, by name
    assert set(findings["test"]) >= {"auc", *(f"auc_{f}" for f in FINDINGS)}
    age = json.loads((tmp_path / "finetune" / "bone-age_r18_scratch" / "results.json")
                     .read_text())
    assert age["selected_by"] == "mae" and age["test"]["mae"] > 0
    assert age["test"]["rmse"] >= age["test"]["mae"]  # in months, as the shard stores them
    assert report.main([str(tmp_path)]) == 0
    table = (tmp_path / "report" / "table_bone-age.md").read_text()
    assert f"| ResNet-18 | Scratch | {age['test']['mae']:.2f} | {age['test']['rmse']:.2f} |" \
        in table
    assert (tmp_path / "report" / "table_findings.md").is_file()
