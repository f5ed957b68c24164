"""Published backbones: every format gives our backbone's features, the preprocessing travels
with the weights, nothing here unpickles what it should not, and the model card says what the
run knows. One real MD-MoCo run (1 rank, 2 steps, ResNet-18 at 40x24) is their source."""

import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from conftest import moco_overrides, run_ranks

from muscle_hpc import checkpoint, embed, export, registry, results, weights
from muscle_hpc.models.backbone import build_backbone

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "mdmoco_demo.yaml"


@pytest.fixture(scope="module")
def run(moco_shards, tmp_path_factory):
    """A finished MD-MoCo run under a run root, its hub folder exported."""
    root = tmp_path_factory.mktemp("root")
    run_dir = registry.mdmoco_dir(root, "r18")
    run_ranks("mdmoco", 1, ["--config", str(DEMO),
                            *moco_overrides(moco_shards, run_dir, "run.max_steps=2")])
    assert export.main([str(run_dir), "--format", "hub"]) == 0
    return run_dir


def ours(run_dir: Path) -> torch.nn.Module:
    """Our own backbone, from the stage's checkpoint, in eval mode, returning pooled features."""
    net = build_backbone("resnet18")
    net.load_state_dict(export.trunk_state(checkpoint.load(run_dir / "checkpoint.pth")),
                        strict=False)
    net.fc = torch.nn.Identity()
    return net.eval()


def images(pre: weights.Preprocessing, n: int = 3) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.stack([pre(rng.integers(0, 256, (120, 200), dtype=np.uint8))
                        for _ in range(n)])


def assert_same_features(model, x, ref):
    with torch.no_grad():
        got = model(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-6 * max(1.0, float(ref.abs().max()))


def test_the_stage_writes_both_files_with_the_same_tensors_and_the_runs_preprocessing(run):
    pth = torch.load(run / registry.EXPORTED_BACKBONE, weights_only=True)
    found = weights.read(run / "backbone_torchvision.safetensors")
    assert found.state.keys() == pth.keys()
    assert all(torch.equal(found.state[k], pth[k]) for k in pth)
    assert found.arch == "resnet18"
    # The shards are 40x24; the Z-score is the config's (the paper's).
    assert found.preprocessing == weights.Preprocessing(40, 24, 122.786, 18.39)
    source = found.published.source
    assert (source["stage"], source["method"], source["encoder"], source["step"]) == \
        ("mdmoco", "mdmoco", "query", 2)
    # A plain .pth records nothing: the paper's preprocessing is what it is read with.
    assert weights.read(run / registry.EXPORTED_BACKBONE).preprocessing == \
        weights.Preprocessing(800, 500, 122.786, 18.39)


def test_every_format_gives_our_backbones_features(run, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # the URL's download
    ref_net = ours(run)
    x = images(weights.Preprocessing(40, 24))
    with torch.no_grad():
        ref = ref_net(x)
    # torchvision's own ResNet-18, strict, on the gray image repeated on 3 channels.
    tv = torchvision.models.resnet18()
    tv.load_state_dict(torch.load(run / registry.EXPORTED_BACKBONE, weights_only=True))
    tv.fc = torch.nn.Identity()
    assert_same_features(tv.eval(), x.repeat(1, 3, 1, 1), ref)
    sources = [run / "backbone_torchvision.safetensors", run / registry.EXPORTED_BACKBONE,
               run / "hub", run, (run / "backbone_torchvision.safetensors").as_uri()]
    for source in sources:
        for chans in (1, 3):
            model = torch.hub.load(str(ROOT), "muscle_resnet18", source="local",
                                   weights=str(source), in_chans=chans, progress=False)
            assert_same_features(model, x.repeat(1, chans, 1, 1), ref)
    assert (tmp_path / "hub" / "checkpoints" / "backbone_torchvision.safetensors").is_file()
    # timm: the file as a torchvision-layout ResNet, and the hub folder as a timm hub model.
    for chans in (1, 3):
        model = timm.create_model("resnet18", pretrained=True, in_chans=chans, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(
                                      run / "backbone_torchvision.safetensors")})
        assert_same_features(model.eval(), x.repeat(1, chans, 1, 1), ref)
        model = timm.create_model(f"local-dir:{run / 'hub'}", pretrained=True,
                                  **({"in_chans": 3} if chans == 3 else {}))
        assert model.default_cfg["input_size"] == (1, 24, 40)  # the weights' own
        assert_same_features(model.eval(), x.repeat(1, chans, 1, 1), ref)


def test_hub_entry_points_return_features_or_a_fresh_head_and_refuse_the_wrong_arch(run):
    path = str(run / "backbone_torchvision.safetensors")
    model = torch.hub.load(str(ROOT), "muscle_resnet18", source="local", weights=path,
                           num_classes=5)
    pre = torch.hub.load(str(ROOT), "transforms", source="local", weights=path)
    assert pre == model.preprocessing == weights.Preprocessing(40, 24)
    with torch.no_grad():
        assert model(images(pre, 2)).shape == (2, 5)
    with pytest.raises(ValueError, match="holds a resnet18 backbone, not a resnet50"):
        torch.hub.load(str(ROOT), "muscle_resnet50", source="local", weights=path)


def test_the_hub_loader_needs_none_of_the_training_stack(run):
    """torch.hub users have torch, torchvision and the image libraries, not DeepSpeed, FFCV,
    TensorBoard, sklearn, submitit, YAML or pycocotools."""
    code = f"""
import sys
for name in ("deepspeed", "ffcv", "tensorboard", "sklearn", "submitit", "yaml",
             "pycocotools", "numba"):
    sys.modules[name] = None
import torch
m = torch.hub.load({str(ROOT)!r}, "muscle_resnet18", source="local",
                   weights={str(run / "hub")!r})
print(m(m.preprocessing(__import__("numpy").zeros((50, 60), "uint8") + 100)[None]).shape)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "torch.Size([1, 512])"


def test_a_safetensors_file_is_never_unpickled(run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for source in (run / "backbone_torchvision.safetensors", run / "hub"):
        assert weights.read(source).arch == "resnet18"


def test_a_malicious_pth_is_refused_by_every_loader_and_never_runs(tmp_path, run, capsys):
    witness = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (witness,))

    evil = tmp_path / "backbone.pth"
    state = dict(torch.load(run / registry.EXPORTED_BACKBONE, weights_only=True))
    state["extra"] = Payload()
    torch.save(state, evil)
    with pytest.raises(weights.WeightsError, match="refused for safety"):
        weights.read(evil)
    with pytest.raises(weights.WeightsError, match="refused for safety"):
        torch.hub.load(str(ROOT), "muscle_resnet18", source="local", weights=str(evil))
    (tmp_path / "imgs").mkdir()
    assert embed.main(["--weights", str(evil), "--images", str(tmp_path / "imgs"),
                       "--out", str(tmp_path / "f.npy")]) == 2
    assert "refused for safety" in capsys.readouterr().err
    torch.save({"model": {"encoder_q.x": Payload()}, "config": {}}, tmp_path / "ck.pth")
    assert export.main([str(tmp_path / "ck.pth")]) == 2
    assert "refused for safety" in capsys.readouterr().err
    assert not witness.exists()


def test_a_stage_checkpoint_given_as_weights_says_to_export_it(run):
    with pytest.raises(weights.WeightsError, match="stage checkpoint, not a backbone: export"):
        weights.read(run / "checkpoint.pth")


@pytest.mark.parametrize("scale, why", [(lambda x: x * 18.39 + 122.786, "raw 0-255"),
                                        (lambda x: (x * 18.39 + 122.786) / 255, "0-1 pixels")])
def test_the_input_check_warns_once_on_unprocessed_pixels(run, scale, why):
    model = weights.backbone(weights.read(run / "hub"))
    x = images(weights.Preprocessing(40, 24))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(x)  # preprocessed: silent
        assert not caught
        model(scale(x))
        model(scale(x))
    assert len(caught) == 1 and why in str(caught[0].message)
    assert "(x - 122.786) / 18.39" in str(caught[0].message)


def test_the_preprocessing_is_the_converters_and_the_loaders(tmp_path):
    """A 16-bit PNG (windowed over its range, as the converter does), resized by area
    averaging, then (x - mean) * (1 / std) in float32, as the loaders compute it."""
    from PIL import Image

    raw = np.linspace(1000, 3000, 90 * 60).reshape(60, 90).astype(np.uint16)
    Image.fromarray(raw).save(tmp_path / "x.png")
    got = weights.Preprocessing(30, 20, 100.0, 20.0)(tmp_path / "x.png")
    gray = np.rint((raw - 1000.0) * (255.0 / 2000.0)).astype(np.uint8)
    import cv2

    small = cv2.resize(gray, (30, 20), interpolation=cv2.INTER_AREA).astype(np.float32)
    want = (small - np.float32(100.0)) * np.float32(1 / 20.0)
    assert got.shape == (1, 20, 30)
    assert np.array_equal(got[0].numpy(), want)


def test_the_model_card_says_what_the_run_knows(run):
    card = (run / "hub" / "README.md").read_text()
    config = json.loads((run / "hub" / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["model_args"] == {"in_chans": 1}
    assert config["pretrained_cfg"]["input_size"] == [1, 24, 40]
    assert config["pretrained_cfg"]["mean"] == [pytest.approx(122.786 / 255)]
    assert "# ResNet-18 X-ray backbone: MD-MoCo" in card
    assert "resized to 40×24" in card and "(x − 122.786) / 18.39" in card
    assert "| nih | train 23 |" in card and "| shenzhen | train 11 |" in card
    assert '"The usage of the data set is unrestricted.' in card  # NIH's terms, as stated
    assert "| model.K | 32 | 65536 |" in card  # a change from the defaults
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance[-1]["code"]["commit"] in card
    assert "| train/loss | 2 |" in card  # the last value of a curve, at its step
    assert "No fine-tune results to show" in card


def test_the_model_card_shows_the_fine_tune_tables_of_its_run_root(run, tmp_path):
    result = run.parent / "finetune" / "pneumonia_r18_mdmoco" / "results.json"
    result.parent.mkdir(parents=True)
    fr = registry.FinetuneRun("pneumonia", "mdmoco", "r18")
    test = {"acc": 0.75, "sen": 0.5, "spe": 1.0, "auc": 0.8125, "n": 8}
    result.write_text(json.dumps(results.record(fr, registry.TASKS["pneumonia"], test)))
    try:
        assert export.main([str(run), "--format", "hub", "--hub-dir", str(tmp_path)]) == 0
    finally:
        result.unlink()
    card = (tmp_path / "README.md").read_text()
    assert "81.25" in card and "MD-MoCo" in card  # the AUC, in the report's percent


def test_export_needs_the_input_size_and_says_so(run, tmp_path, capsys):
    ckpt = checkpoint.load(run / "checkpoint.pth")
    ckpt["config"]["data"]["root"] = str(tmp_path / "gone")
    checkpoint.save(tmp_path / "checkpoint.pth", ckpt)
    assert export.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give --size WxH" in err
    assert not list(tmp_path.glob("backbone*"))
    assert export.main([str(tmp_path), "--size", "64x48", "--format", "safetensors"]) == 0
    assert weights.read(tmp_path / "backbone_torchvision.safetensors").preprocessing == \
        weights.Preprocessing(64, 48)
    assert not (tmp_path / registry.EXPORTED_BACKBONE).exists()  # only the format asked for
    # A later export of one format leaves no older twin beside it (a run directory's reader
    # takes the .safetensors).
    assert export.main([str(tmp_path), "--size", "32x32", "--format", "torchvision"]) == 0
    assert (tmp_path / registry.EXPORTED_BACKBONE).exists()
    assert not (tmp_path / "backbone_torchvision.safetensors").exists()
