"""The converter core on a hand-made plug-in: modes, rejects, masks, boxes, splits, manifest."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import convert
from data_prep.datasets.base import DatasetSpec, Record, Scan
from data_prep.imaging import decode, to_uint8
from muscle_hpc.data import TaskLoader, open_shard


def test_sixteen_bit_is_windowed_not_clipped():
    arr = np.array([[1000, 3000], [5000, 9000]], np.uint16)
    out = to_uint8(Image.fromarray(arr))
    assert out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    assert list(out.ravel()) == sorted(out.ravel())  # order kept, nothing saturated early


def test_rgba_and_palette_become_gray():
    rgba = Image.new("RGBA", (4, 4), (200, 200, 200, 0))
    assert to_uint8(rgba).tolist() == [[200] * 4] * 4  # alpha ignored, not composited to black
    pal = Image.new("L", (4, 4), 90).convert("P")
    assert to_uint8(pal).max() == 90


def test_boxes_and_mask_follow_the_resize(tmp_path):
    Image.new("L", (512, 512), 50).save(tmp_path / "x.png")
    mask = np.zeros((256, 256), np.uint16)
    mask[64:192, 0:128] = 65535  # 16-bit mask at half resolution
    Image.fromarray(mask).save(tmp_path / "m.png")
    rec = Record(tmp_path / "x.png", "g", masks=(tmp_path / "m.png",),
                 boxes=((100.0, 50.0, 20.0, 40.0, 2),), box_space=(512, 512))
    d = decode(rec, (256, 128))
    assert d.image.shape == (128, 256)
    np.testing.assert_allclose(d.boxes, [[50, 12.5, 60, 22.5]])
    assert d.box_labels.tolist() == [2]
    assert set(np.unique(d.mask)) == {0, 1}
    assert d.mask[64, 10] == 1 and d.mask[64, 200] == 0 and d.mask[5, 10] == 0


@pytest.mark.parametrize("orientation, shown", [(2, np.fliplr), (6, lambda a: np.rot90(a, -1))])
def test_an_exif_orientation_is_applied_as_viewers_and_annotation_tools_apply_it(
        tmp_path, orientation, shown):
    """Orientation 2 mirrors: stored as the raw pixels, the patient's left would be on the
    side every viewer (and the annotator who drew the box) shows as right."""
    raw = np.zeros((32, 64), np.uint8)
    raw[:, :16] = 255  # bright on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(raw).save(tmp_path / "x.png", exif=exif)
    seen = shown(raw)  # what a viewer shows
    h, w = seen.shape
    ys, xs = np.nonzero(seen)
    box = (float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1), 1)
    d = decode(Record(tmp_path / "x.png", "g", boxes=(box,)), (w, h))
    np.testing.assert_array_equal(d.image, seen)
    np.testing.assert_allclose(d.boxes, [[box[0], box[1], box[0] + box[2], box[1] + box[3]]])
    assert d.image[d.boxes[0, 1].astype(int):d.boxes[0, 3].astype(int),
                   d.boxes[0, 0].astype(int):d.boxes[0, 2].astype(int)].min() == 255


def _toy_spec(root: Path, n_groups=10, per_group=2) -> DatasetSpec:
    modes = ["L", "RGB", "RGBA", "I;16", "P"]
    for g in range(n_groups):
        for k in range(per_group):
            arr = (np.arange(64 * 48).reshape(48, 64) % 251).astype(np.uint8)
            im = Image.fromarray(arr)
            mode = modes[(g + k) % len(modes)]
            if mode == "I;16":
                im = Image.fromarray(arr.astype(np.uint16) * 200)
            elif mode != "L":
                im = im.convert(mode)
            im.save(root / f"p{g}_{k}.png")
    (root / "p99_broken.png").write_bytes((root / "p0_0.png").read_bytes()[:100])

    def scan(r: Path) -> Scan:
        s = Scan()
        for p in sorted(r.glob("*.png")):
            group = p.stem.split("_")[0]
            s.records.append(Record(p, group, label=int(group[1:]) % 2))
        s.reject(r, r / "nolabel.png", "label missing")
        return s

    return DatasetSpec("toy", ("toy",), "task", ("label",), scan, label_names=("a", "b"))


def test_convert_splits_rejects_and_manifest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    spec = _toy_spec(src)
    m = convert.convert_dataset(spec, src, tmp_path / "out", size=(32, 16), seed=3,
                                log=lambda *_: 0)
    on_disk = json.loads((tmp_path / "out/toy/manifest.json").read_text())
    assert on_disk == m
    assert set(m) >= {"dataset", "size", "splits", "rejects", "pixel_mean", "pixel_std"}
    assert m["size"] == [32, 16]
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 16, "valid": 2, "test": 2}
    assert sum(sum(v["label_counts"].values()) for v in m["splits"].values()) == 20
    reasons = {r["path"]: r["reason"] for r in m["rejects"]}
    assert reasons["nolabel.png"] == "label missing"
    assert reasons["p99_broken.png"].startswith("unreadable")
    # patients never straddle splits
    groups = {}
    for split in m["splits"]:
        loader = TaskLoader(open_shard(tmp_path / "out", "toy", split), 4, "classification",
                            train=False, num_workers=1)
        for batch in loader:
            assert batch["image"].shape[1:] == (1, 16, 32)
            groups.setdefault(split, []).extend(batch["label"].tolist())
    assert sum(len(v) for v in groups.values()) == 20
    assert not list((tmp_path / "out").glob(".toy.*"))  # no staging left behind


def test_grouped_split_is_seeded_and_keeps_patients_together(tmp_path):
    recs = [Record(Path(f"{g}_{k}.png"), f"g{g}") for g in range(50) for k in range(g % 3 + 1)]
    spec = DatasetSpec("t", ("t",), "task", (), lambda r: Scan())
    a = convert.assign_splits(recs, spec, "paper", seed=1)
    assert a == convert.assign_splits(recs, spec, "paper", seed=1)
    assert a != convert.assign_splits(recs, spec, "paper", seed=2)
    by_group = {}
    for r, s in zip(recs, a):
        by_group.setdefault(r.group, set()).add(s)
    assert all(len(v) == 1 for v in by_group.values())
    frac = {s: a.count(s) / len(a) for s in ("train", "valid", "test")}
    assert frac["train"] == pytest.approx(0.8, abs=0.05)
    assert frac["valid"] == pytest.approx(0.1, abs=0.05)


def test_official_split_refused_when_absent(tmp_path):
    spec = DatasetSpec("t", ("t",), "task", (), lambda r: Scan())
    with pytest.raises(convert.ConvertError, match="no official split"):
        convert.convert_dataset(spec, tmp_path, tmp_path / "o", split="official")


FFCV_RGB_ROUND_TRIP = """
import sys
import numpy as np
from data_prep.shard import import_ffcv, ArrayDataset
import_ffcv()
import numba.typed
from ffcv.fields import RGBImageField
from ffcv.fields import rgb_image
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.writer import DatasetWriter
assert type(rgb_image.IMAGE_MODES) is dict and rgb_image.IMAGE_MODES == {"jpg": 0, "raw": 1}
assert numba.typed.Dict is not dict  # the swap lasted for that one import only
images = np.random.default_rng(0).integers(0, 256, (3, 8, 12, 3), dtype=np.uint8)
DatasetWriter(sys.argv[1], {"image": RGBImageField(write_mode="raw")}, num_workers=1
              ).from_indexed_dataset(ArrayDataset({"image": images}))
loader = Loader(sys.argv[1], batch_size=3, num_workers=1, order=OrderOption.SEQUENTIAL,
                pipelines={"image": [SimpleRGBImageDecoder()]})
(batch,) = next(iter(loader))
assert np.array_equal(batch, images), "RGB round trip changed the pixels"
print("ok")
"""


def test_ffcv_imported_without_its_typed_dict_still_reads_rgb(tmp_path):
    # import_ffcv replaces the typed dict of FFCV's image-mode table by a plain one (4.5 s of
    # numba compile per process): its RGB writer and decoder must still round-trip pixels.
    proc = subprocess.run([sys.executable, "-c", FFCV_RGB_ROUND_TRIP, str(tmp_path / "rgb.beton")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
