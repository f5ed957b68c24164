"""``python -m muscle_hpc.embed``: one row per image in the order listed, the features the
backbone gives the preprocessed image, and every unreadable file reported with its reason."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from muscle_hpc import embed, weights
from muscle_hpc.models.backbone import build_backbone, export_torchvision

PRE = weights.Preprocessing(40, 24)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "b.safetensors"
    published = weights.Published("resnet18", PRE, {"stage": "test"})
    weights.save_safetensors(path, export_torchvision(build_backbone("resnet18")), published)
    return path


def features_of(weights_file, inputs) -> np.ndarray:
    model = weights.backbone(weights.read(weights_file))
    with torch.no_grad():
        return model(torch.stack([PRE(x) for x in inputs])).numpy()


def test_a_folder_gives_a_row_per_image_and_lists_what_it_could_not_read(weights_file,
                                                                           tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / "b.jpg")
    Image.fromarray(rng.integers(0, 4000, (60, 80)).astype(np.uint16)).save(
        folder / "sub" / "c.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out" / "feats.npy"
    assert embed.main(["--weights", str(weights_file), "--images", str(folder),
                       "--out", str(out), "--batch-size", "2", "--workers", "0"]) == 0
    assert "3 images" in capsys.readouterr().err
    meta = json.loads(out.with_suffix(".json").read_text())
    paths = [folder / "a.png", folder / "b.jpg", folder / "sub" / "c.png"]
    assert [r["path"] for r in meta["rows"]] == [str(p) for p in paths]
    assert [r["path"] for r in meta["rejects"]] == [str(folder / "broken.png")]
    assert meta["rejects"][0]["reason"].startswith("unreadable")
    assert meta["preprocessing"] == PRE.as_dict() and meta["arch"] == "resnet18"
    got = np.load(out, allow_pickle=False)
    assert got.shape == (3, 512) and got.dtype == np.float32
    np.testing.assert_allclose(got, features_of(weights_file, paths), rtol=0, atol=1e-5)


def test_shards_give_their_images_in_shard_order_with_their_split(weights_file, moco_shards,
                                                                  tmp_path):
    out = tmp_path / "feats.npy"
    assert embed.main(["--weights", str(weights_file), "--images", str(moco_shards),
                       "--out", str(out), "--batch-size", "16"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    names = [r["path"] for r in meta["rows"]]
    # The conftest's flat sets: nih 23 images of gray 40, shenzhen 11 of gray 200, all train.
    assert names == [f"nih/train#{i}" for i in range(23)] + \
        [f"shenzhen/train#{i}" for i in range(11)]
    got = np.load(out)
    want = features_of(weights_file, [np.full((24, 40), 40, np.uint8),
                                      np.full((24, 40), 200, np.uint8)])
    np.testing.assert_allclose(got[:23], np.repeat(want[:1], 23, 0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[23:], np.repeat(want[1:], 11, 0), rtol=0, atol=1e-5)
    # One dataset's folder, one split.
    assert embed.main(["--weights", str(weights_file), "--images", str(moco_shards / "nih"),
                       "--split", "train", "--out", str(out)]) == 0
    assert np.load(out).shape == (23, 512)


def test_nothing_to_embed_is_one_line_and_writes_nothing(weights_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "f.npy"
    assert embed.main(["--weights", str(weights_file), "--images", str(tmp_path / "empty"),
                       "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"embed: error: {tmp_path / 'empty'}: no images in it\n"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    assert embed.main(["--weights", str(weights_file), "--images", str(tmp_path / "bad"),
                       "--out", str(out), "--workers", "0"]) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".json").exists()
