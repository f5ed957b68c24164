"""Datasets by configuration (``data_prep/layouts.py``): the four layouts on hand-made trees with
every quirk, read back from the shards, the groups files, the YAML definitions and the CLI's
one-line refusals."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import convert, layouts, shard
from data_prep.datasets import get_spec
from data_prep.datasets.base import LayoutError, Record
from data_prep.imaging import decode

ROOT = Path(__file__).resolve().parents[1]
SIZE = (32, 32)


def img(path: Path, mode: str = "L", seed: int = 0, size=(64, 64)) -> Path:
    """A distinct noise image saved in ``mode`` (16-bit for I;16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size[::-1], dtype=np.uint8)
    if mode == "I;16":
        im = Image.fromarray(arr.astype(np.uint16) * 200)
    else:
        im = Image.fromarray(arr).convert(mode)
    im.save(path)
    return path


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def read_shard(out: Path, name: str, split: str) -> dict[str, np.ndarray]:
    shard.import_ffcv()
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    path = str(out / name / f"{split}.beton")
    names = Reader(path).field_names
    loader = Loader(path, batch_size=1000, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False)
    (batch,) = list(loader)
    return {n: np.asarray(v) for n, v in zip(names, batch)}


def manifest(out: Path, name: str) -> dict:
    return json.loads((out / name / "manifest.json").read_text())


def reasons(m: dict) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in m["rejects"]}


def records_in_shard(name: str, root: Path, layout: str, options: dict, split: str,
                     mode="paper", seed=0, unreadable=()) -> list[Record]:
    """The records of ``split`` in shard order, as the converter orders them."""
    spec = layouts.build_spec(name, layout, root, options)
    scan = spec.scan(root)
    recs = [r for r in scan.records if convert._check_record(spec, r) is None]
    splits = convert.assign_splits(recs, spec, mode, seed)
    return [r for r, s in zip(recs, splits) if s == split and r.image not in unreadable]


def same_pixels(shard_images: np.ndarray, records: list[Record]) -> bool:
    return all(np.array_equal(shard_images[k, :, :, 0], decode(r, SIZE).image)
               for k, r in enumerate(records))


def run(*args) -> int:
    return convert.main([*map(str, args), "--size", f"{SIZE[0]}x{SIZE[1]}", "--workers", "1"])


# --- folders -------------------------------------------------------------------------------------

@pytest.fixture
def folders(tmp_path):
    root = tmp_path / "knee"
    planted = {  # path -> class name
        "train/a/1.png": ("a", "L"), "train/a/sub/deep/2.png": ("a", "RGB"),
        "train/b/3.png": ("b", "I;16"), "train/b/4.png": ("b", "RGBA"),
        "train/b/5.png": ("b", "P"), "train/b/6.png": ("b", "LA"), "train/b/7.png": ("b", "1"),
        "val/C/8.png": ("C", "L"), "val/a/9.png": ("a", "L"), "test/b/10.png": ("b", "L"),
    }
    for k, (rel, (_, mode)) in enumerate(planted.items()):
        img(root / rel, mode, seed=k)
    write(root / "train/b/notes.txt", "not a picture")
    write(root / "train/stray.png", b"")  # beside the class folders
    write(root / "readme.txt", "hello")  # beside the split folders
    for junk in ("train/.DS_Store", "train/a/Thumbs.db", "__MACOSX/train/a/._1.png",
                 "train/a/._1.png"):
        write(root / junk, b"\0\5\x16\7junk")
    return root, {k: v[0] for k, v in planted.items()}


def test_folders_classes_splits_modes_and_rejects(folders, tmp_path):
    root, planted = folders
    out = tmp_path / "out"
    assert run("--dataset", "knee", "--layout", "folders", "--root", root, "--out", out,
               "--split", "official") == 0
    m = manifest(out, "knee")
    names = ["C", "a", "b"]  # torchvision ImageFolder: sorted() of the folder names
    assert m["fields"]["label"]["names"] == names
    assert reasons(m) == {"train/b/notes.txt": "not an image",
                          "train/stray.png": "label missing: not in a class folder",
                          "readme.txt": "label missing: not in a class folder"}
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 7, "valid": 2, "test": 1}
    for split, prefix in (("train", "train/"), ("valid", "val/"), ("test", "test/")):
        recs = records_in_shard("knee", root, "folders", {}, split, mode="official")
        rels = [r.image.relative_to(root).as_posix() for r in recs]
        assert sorted(rels) == sorted(p for p in planted if p.startswith(prefix))
        data = read_shard(out, "knee", split)
        assert [names[v] for v in data["label"].ravel()] == [planted[p] for p in rels]
        assert same_pixels(data["image"], recs)  # the k-th sample is that file
        assert np.load(out / "knee" / f"{split}.groups.npy").shape == (len(rels),)


def test_folders_without_split_folders_has_no_official_split(tmp_path, capsys):
    root = tmp_path / "flat"
    for k, rel in enumerate(("x/1.png", "x/2.png", "y/3.png", "y/nested/4.png")):
        img(root / rel, seed=k)
    assert run("--dataset", "flat", "--layout", "folders", "--root", root, "--out",
               tmp_path / "o", "--split", "official") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: flat has no official split; use --split paper"]
    assert run("--dataset", "flat", "--layout", "folders", "--root", root, "--out",
               tmp_path / "o", "--role", "pretrain") == 0
    m = manifest(tmp_path / "o", "flat")
    assert m["role"] == "pretrain" and set(m["splits"]) == {"train"}
    assert m["splits"]["train"]["label_counts"] == {"x": 2, "y": 2}


def test_an_out_the_conversion_would_read_or_destroy_is_refused(tmp_path, capsys):
    """--out inside --root made the shards a class folder on the next --force run (indices
    shifted, an empty class); --root inside OUT/NAME would be replaced by the shards."""
    root = tmp_path / "flat"
    for k, rel in enumerate(("x/1.png", "x/2.png", "y/3.png", "y/4.png")):
        img(root / rel, seed=k)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cases = [(root / "shards", f"error: flat: --out {root / 'shards'} is inside --root {root}"),
             (root, f"error: flat: --out {root} is inside --root {root}"),
             (tmp_path, f"error: flat: --root {root} is inside {root}, which the conversion "
                        "replaces")]
    for out, message in cases:
        assert run("--dataset", "flat", "--layout", "folders", "--root", root, "--out", out,
                   "--force") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err
    write(tmp_path / "file", "x")
    assert run("--dataset", "flat", "--layout", "folders", "--root", root, "--out",
               tmp_path / "file") == 2
    assert capsys.readouterr().err.strip() == f"error: flat: --out {tmp_path / 'file'} is a " \
                                              "file, not a folder"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == \
        sorted([*before, Path("file")])
    (tmp_path / "o" / "flat").mkdir(parents=True)  # someone's folder, not a conversion
    assert run("--dataset", "flat", "--layout", "folders", "--root", root, "--out",
               tmp_path / "o") == 2
    assert "exists and is not a finished conversion" in capsys.readouterr().err
    assert run("--dataset", "flat", "--layout", "folders", "--root", root, "--out",
               tmp_path / "out") == 0
    assert manifest(tmp_path / "out", "flat")["fields"]["label"]["names"] == ["x", "y"]


def test_an_out_on_a_full_or_read_only_file_system_is_one_line(tmp_path, tmpfs, capsys):
    """A staging memmap on a full file system died of SIGBUS, silently (exit 135)."""
    root = tmp_path / "flat"
    for k in range(24):
        img(root / "ab"[k % 2] / f"{k}.png", seed=k, size=(128, 128))
    full = tmpfs.mount("300k", "full")
    args = ("--dataset", "flat", "--layout", "folders", "--root", root, "--size", "128x128",
            "--workers", "1")
    assert convert.main([*map(str, args), "--out", str(full / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: flat: converting needs about 0.8 MiB in {full / 'o'} (staging arrays, then "
        "shards), 0.3 MiB free"), err
    assert not any((full / "o").iterdir())
    read_only = tmpfs.mount("10m", "ro")
    (read_only / "o").mkdir()
    tmpfs.read_only(read_only)
    assert convert.main([*map(str, args), "--out", str(read_only / "new")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: flat: cannot create --out "
                                               f"{read_only / 'new'}: Read-only file system")
    assert convert.main([*map(str, args), "--out", str(read_only / "o")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: flat: --out {read_only / 'o'} is not "
                                               "writable (a read-only file system)")


def test_a_patient_pattern_keeps_each_patients_images_in_one_split(tmp_path, capsys):
    root = tmp_path / "xr"  # the pediatric pneumonia download's names: personN_virus_M.jpeg
    for k in range(36):
        cls = ("NORMAL", "PNEUMONIA")[k % 2]
        img(root / cls / f"person{k % 12}_virus_{k}.png", seed=k, size=(16, 16))
    img(root / "NORMAL/IM-0001.png", seed=99, size=(16, 16))
    out, pattern = tmp_path / "out", r"person(\d+)_"
    assert run("--dataset", "xr", "--layout", "folders", "--root", root, "--out", out,
               "--patient-pattern", pattern) == 0
    assert reasons(manifest(out, "xr")) == {
        "NORMAL/IM-0001.png": f"patient missing: {pattern!r} finds no patient id in the path"}
    split_of: dict[str, set[str]] = {}
    for split in ("train", "valid", "test"):
        recs = records_in_shard("xr", root, "folders", {"patient_pattern": pattern}, split)
        groups = np.load(out / "xr" / f"{split}.groups.npy")
        assert same_pixels(read_shard(out, "xr", split)["image"], recs)
        patients = [r.image.name.split("_")[0] for r in recs]
        for p, g in zip(patients, groups):
            split_of.setdefault(p, set()).add(split)
            assert all((q == p) == (h == g) for q, h in zip(patients, groups))
    assert len(split_of) == 12 and all(len(s) == 1 for s in split_of.values())

    # without it each image is its own group, and patients straddle the splits
    assert run("--dataset", "xr1", "--layout", "folders", "--root", root, "--out", out) == 0
    straddle: dict[str, set[str]] = {}
    for split in ("train", "valid", "test"):
        for r in records_in_shard("xr1", root, "folders", {}, split):
            straddle.setdefault(r.image.name.split("_")[0], set()).add(split)
    assert any(len(s) > 1 for s in straddle.values())

    capsys.readouterr()
    for extra, message in (
            (["--patient-pattern", "person([0-9]+"],
             "error: xr2: --patient-pattern 'person([0-9]+' is not a regular expression: "),
            (["--layout", "csv", "--patient-pattern", "x"],
             "error: --patient-pattern does not apply to the csv layout")):
        assert run("--dataset", "xr2", "--layout", "folders", "--root", root, "--out", out,
                   *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err


# --- csv -----------------------------------------------------------------------------------------

@pytest.fixture
def csv_tree(tmp_path):
    root = tmp_path / "cxr"
    rows = ["path,finding,patient,fold,age,A,B"]
    planted = {}  # relative to images/ -> (finding, patient, age, A, B)
    for p in range(10):
        for k in range(3):
            rel = f"p{p}/img{k}.png" if k else f"p{p}_first.png"
            finding = ("normal", "effusion", "mass")[(p + k) % 3]
            planted[rel] = (finding, f"P{p:02d}", 10.5 * p + k, (p + k) % 2, p % 2)
            img(root / "images" / rel, ("L", "RGB", "I;16", "P", "RGBA")[(p + k) % 5],
                seed=10 * p + k)
            rows.append(f"{rel},{finding},P{p:02d},{('train', 'val', 'test')[p % 3]},"
                        f"{10.5 * p + k},{(p + k) % 2},{'true' if p % 2 else '0.0'}")
            if k == 0:
                rows.append("")  # blank lines between rows
    rows.append("gone.png,normal,P99,train,3,0,1")  # listed, no file
    rows.append("bad.png,fracture,P98,train,abc,2,1")  # bad label everywhere
    img(root / "images/bad.png", seed=998)
    img(root / "images/unlisted.png", seed=999)
    write(root / "images/Thumbs.db", b"junk")
    write(root / "labels.csv", "\ufeff" + "\r\n".join(rows) + "\r\n")
    return root, planted


def test_csv_single_label_with_classes_patients_and_rejects(csv_tree, tmp_path):
    root, planted = csv_tree
    out = tmp_path / "out"
    opts = {"csv": "labels.csv", "images": "images", "image_column": "path",
            "label_column": "finding", "classes": "normal,mass,effusion",
            "patient_column": "patient"}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    assert run("--dataset", "cxr", "--layout", "csv", "--root", root, "--out", out,
               *args) == 0
    m = manifest(out, "cxr")
    names = ["normal", "mass", "effusion"]  # --classes order, not sorted
    assert m["fields"]["label"]["names"] == names
    r = reasons(m)
    assert r["images/gone.png"] == "file missing: listed in CSV but file missing"
    assert r["images/bad.png"].startswith("bad label: 'fracture'")
    assert r["images/unlisted.png"] == "not in the CSV"
    assert len(r) == 3  # the CSV itself, Thumbs.db and blank lines are nobody's reject
    opts = {k: v for k, v in opts.items()}
    seen = 0
    for split, info in m["splits"].items():
        recs = records_in_shard("cxr", root, "csv", opts, split)
        data = read_shard(out, "cxr", split)
        rels = [rec.image.relative_to(root / "images").as_posix() for rec in recs]
        assert [names[v] for v in data["label"].ravel()] == [planted[p][0] for p in rels]
        assert same_pixels(data["image"], recs)
        # groups: one int32 per sample, in shard order, = the patient's rank among all patients
        groups = np.load(out / "cxr" / info["groups"])
        assert groups.dtype == np.int32 and groups.shape == (info["count"],)
        patients = sorted({v[1] for v in planted.values()})
        assert groups.tolist() == [patients.index(planted[p][1]) for p in rels]
        seen += len(rels)
    assert seen == 30
    # patient-grouped: a patient's three images share one split
    split_of = {}
    for split in m["splits"]:
        for g in np.load(out / "cxr" / f"{split}.groups.npy").tolist():
            split_of.setdefault(g, set()).add(split)
    assert len(split_of) == 10 and all(len(v) == 1 for v in split_of.values())


def test_csv_multi_label_value_and_official_split(csv_tree, tmp_path):
    root, planted = csv_tree
    base = ["--layout", "csv", "--root", root, "--csv", root / "labels.csv", "--images",
            "images", "--image-column", "path"]
    out = tmp_path / "out"
    assert run("--dataset", "ml", *base, "--label-columns", "A,B", "--split-column", "fold",
               "--split", "official", "--out", out) == 0
    m = manifest(out, "ml")
    assert m["fields"]["labels"]["names"] == ["A", "B"]
    assert reasons(m)["images/bad.png"].startswith("bad label: A='2'")
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 12, "valid": 9,
                                                               "test": 9}
    data = read_shard(out, "ml", "valid")
    recs = records_in_shard("ml", root, "csv", {"csv": str(root / "labels.csv"),
                            "images": "images", "image_column": "path",
                            "label_columns": "A,B", "split_column": "fold"}, "valid",
                            mode="official")
    rels = [r.image.relative_to(root / "images").as_posix() for r in recs]
    assert data["labels"].dtype == np.uint8
    assert data["labels"].tolist() == [[planted[p][3], planted[p][4]] for p in rels]

    assert run("--dataset", "age", *base, "--value-column", "age", "--out", out) == 0
    m = manifest(out, "age")
    assert m["fields"]["value"] == {"type": "FloatField", "name": "age"}
    assert reasons(m)["images/bad.png"].startswith("bad label: 'abc'")
    values = sorted(v[2] for v in planted.values())
    got = sorted(v for s in m["splits"] for v in read_shard(out, "age", s)["value"].ravel())
    np.testing.assert_allclose(got, values)
    lo = min(m["splits"][s]["value"]["min"] for s in m["splits"])
    assert lo == values[0]


def test_csv_value_rejects_nan_and_labels_sort_numerically(tmp_path):
    root = tmp_path / "r"
    for k in range(4):
        img(root / f"{k}.png", seed=k)
    write(root / "t.csv", "image,grade,score\n0.png,10,1.5\n1,2,nan\n2.png,0,inf\n3.png,2,7\n")
    out = tmp_path / "o"
    assert run("--dataset", "g", "--layout", "csv", "--root", root, "--csv", "t.csv",
               "--label-column", "grade", "--out", out) == 0
    m = manifest(out, "g")
    assert m["fields"]["label"]["names"] == ["0", "2", "10"]  # 1.png found by its stem "1"
    assert reasons(m) == {}
    assert run("--dataset", "s", "--layout", "csv", "--root", root, "--csv", "t.csv",
               "--value-column", "score", "--out", out) == 0
    r = reasons(manifest(out, "s"))
    assert set(r) == {"1.png", "2.png"} and all(v.startswith("bad label") for v in r.values())
    img(tmp_path / "beside.png", seed=9)  # exists, but ../ leads out of the images folder
    write(root / "t.csv", "image,grade\n0.png,1\n../beside.png,2\n../gone.png,2\n")
    assert run("--dataset", "u", "--layout", "csv", "--root", root, "--csv", "t.csv",
               "--label-column", "grade", "--out", out, "--role", "pretrain") == 0
    assert reasons(manifest(out, "u")) == {
        "../beside.png": f"outside --images: ../beside.png leads out of {root} (give paths "
                         "under it, or absolute ones)",
        "../gone.png": "file missing: listed in CSV but file missing",
        "1.png": "not in the CSV", "2.png": "not in the CSV", "3.png": "not in the CSV"}


def test_csv_errors_are_one_line(csv_tree, tmp_path, capsys):
    root, _ = csv_tree
    out = tmp_path / "o"
    cases = [
        (["--csv", "labels.csv", "--images", "images", "--label-column", "finding"],
         "error: cxr: no column 'image' (--image-column) in labels.csv; its columns are: "
         "path, finding, patient, fold, age, A, B"),
        (["--images", "images", "--label-column", "finding"], "error: cxr: the layout needs --csv"),
        (["--csv", "labels.csv", "--image-column", "path", "--images", "images",
          "--label-column", "nope"], "error: cxr: no column 'nope' (--label-column)"),
        (["--csv", "labels.csv", "--coco", "x.json"], "error: --coco does not apply to the "
                                                      "csv layout"),
        (["--csv", "labels.csv", "--image-column", "path", "--images", "images"],
         "error: cxr: a task set needs --label-column"),
    ]
    for extra, message in cases:
        assert run("--dataset", "cxr", "--layout", "csv", "--root", root, "--out", out,
                   *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err
    assert not out.exists() or not any(out.iterdir())


def test_a_csv_that_is_not_utf8_is_refused_or_read_in_its_encoding(tmp_path, capsys):
    """cp1252 (Excel on Windows): decoding with replacement would make légère and lègère one
    class; the bytes are refused, naming the line, and --encoding reads them as two."""
    root = tmp_path / "r"
    for k in range(4):
        img(root / f"{k}.png", seed=k)
    text = "image,severity\n0.png,légère\n1.png,lègère\n2.png,légère\n3.png,lègère\n"
    write(root / "t.csv", text.encode("cp1252"))
    out = tmp_path / "o"
    args = ("--dataset", "sev", "--layout", "csv", "--root", root, "--csv", "t.csv",
            "--label-column", "severity", "--out", out)
    assert run(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: sev: t.csv line 2: byte b'\\xe9' is not "
                                               "utf-8"), err
    assert not (out / "sev").exists()
    assert run(*args, "--encoding", "cp1252") == 0
    m = manifest(out, "sev")
    assert m["fields"]["label"]["names"] == ["lègère", "légère"]
    counts = Counter()
    for split in m["splits"].values():
        counts.update(split["label_counts"])
    assert counts == {"lègère": 2, "légère": 2}
    assert run(*args, "--encoding", "klingon") == 2
    assert "--encoding 'klingon' is not a text encoding" in capsys.readouterr().err


def test_names_from_user_files_are_echoed_with_control_characters_escaped(tmp_path, capsys):
    """A CSV header or class carrying terminal escape codes (set the window title, clear the
    screen) must never reach the terminal raw."""
    root = tmp_path / "r"
    for k in range(2):
        img(root / f"{k}.png", seed=k)
    title = "\x1b]0;owned\x07\x1b[2J"
    write(root / "t.csv", f"image,{title}grade\n0.png,a\n1.png,b\n")
    out = tmp_path / "o"
    assert run("--dataset", "g", "--layout", "csv", "--root", root, "--csv", "t.csv",
               "--label-column", "grade", "--out", out) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert err.strip() == ("error: g: no column 'grade' (--label-column) in t.csv; its columns "
                           "are: image, \\x1b]0;owned\\x07\\x1b[2Jgrade")
    write(root / "t.csv", f"image,grade\n0.png,a{title}\n1.png,b\n")
    assert run("--dataset", "g", "--layout", "csv", "--root", root, "--csv", "t.csv",
               "--label-column", "grade", "--out", out) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: g: the name 'a\\x1b]0;owned\\x07\\x1b[2J' (a class, "
                          "category or column) has a control character") and \
        not (out / "g").exists()


def test_a_column_or_class_named_twice_is_refused(tmp_path, capsys):
    """Each was a silent guess: the first of two 'label' columns was read, and --classes a,b,a
    made a third class 'a' that no image has; two COCO categories of one name were two classes
    a task could not tell apart."""
    root = tmp_path / "r"
    for k in range(4):
        img(root / f"{k}.png", seed=k)
    write(root / "t.csv", "image,label,label\n0.png,a,x\n1.png,b,y\n2.png,a,x\n3.png,b,y\n")
    write(root / "u.csv", "image,label\n0.png,a\n1.png,b\n2.png,a\n3.png,b\n")
    write(root / "c.json", json.dumps({
        "images": [{"id": k, "file_name": f"{k}.png", "width": 64, "height": 64}
                   for k in range(4)],
        "annotations": [], "categories": [{"id": 1, "name": "nodule"},
                                          {"id": 2, "name": "nodule"}]}))
    out = tmp_path / "o"
    cases = [(["--csv", "t.csv", "--label-column", "label"],
              "error: d: column 'label' (--label-column) appears 2 times in t.csv; rename all "
              "but one"),
             (["--csv", "u.csv", "--label-column", "label", "--classes", "a,b,a"],
              "error: --classes names 'a' more than once"),
             (["--csv", "t.csv", "--label-columns", "label"],
              "error: d: column 'label' (--label-columns) appears 2 times in t.csv"),
             (["--coco", "c.json", "--role", "pretrain"],
              "error: d: two classes are named 'nodule'; rename one in the source")]
    for extra, message in cases:
        layout = "coco" if "--coco" in extra else "csv"
        assert run("--dataset", "d", "--layout", layout, "--root", root, "--out", out,
                   *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err
    assert not (out / "d").exists()


def test_names_are_checked(tmp_path, capsys):
    img(tmp_path / "x/a.png")
    for name in ("nih", "Bad.Name", "../up", "all"):
        assert run("--dataset", name, "--layout", "folders", "--root", tmp_path, "--out",
                   tmp_path / "o") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert run("--dataset", "nih", "--csv", "a.csv", "--root", tmp_path, "--out",
               tmp_path / "o") == 2
    assert capsys.readouterr().err.strip() == \
        "error: --csv needs --layout (it describes your own dataset)"
    assert run("--dataset", "mine", "--root", tmp_path, "--out", tmp_path / "o") == 2
    assert "give --layout" in capsys.readouterr().err


# --- masks ---------------------------------------------------------------------------------------

def mask(path: Path, box, size=(64, 64), mode="L") -> Path:
    """A mask with the rectangle ``box`` = (x0, y0, x1, y1) set, in ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros(size[::-1], np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 255
    if mode == "I;16":
        Image.fromarray(arr.astype(np.uint16) * 257).save(path)
    else:
        Image.fromarray(arr).convert(mode).save(path)
    return path


# The two structures of the mask tests, x0, y0, x1, y1 in 64x64; they overlap on x 24..32, y 16..40.
LEFT, RIGHT = (8, 8, 32, 40), (24, 16, 56, 48)


@pytest.fixture
def mask_tree(tmp_path):
    root = tmp_path / "hip"
    modes = {"a": "L", "b": "RGBA", "c": "I;16", "d": "P", "e": "L"}
    for k, (stem, mode) in enumerate(modes.items()):
        img(root / "images" / f"{stem}.png", mode, seed=k)
        if stem == "c":  # a 16-bit mask at half size, and a palette mask
            mask(root / "L/c_mask.png", tuple(v // 2 for v in LEFT), (32, 32), "I;16")
            mask(root / "R/c_mask.png", RIGHT, mode="P")
            continue
        mask(root / "L" / f"{stem}_mask.png", LEFT, mode="1" if stem == "a" else "L")
        if stem != "e":  # e has no right mask
            mask(root / "R" / f"{stem}_mask.tif", RIGHT)  # any image extension
    mask(root / "L/zzz_mask.png", LEFT)  # orphan
    write(root / "R/readme.txt", "masks by Dr X")
    write(root / "L/.DS_Store", b"junk")
    write(root / "images/Thumbs.db", b"junk")
    expected = np.zeros((64, 64), np.uint8)
    expected[8:40, 8:32] = 1
    expected[16:48, 24:56] = 2  # the later folder wins the overlap
    return root, expected[::2, ::2]


def test_masks_classes_union_and_rejects(mask_tree, tmp_path):
    root, expected = mask_tree
    out = tmp_path / "out"
    common = ["--layout", "masks", "--root", root, "--images", "images", "--masks", "L", "R",
              "--mask-suffix", "_mask", "--out", out, "--role", "pretrain"]
    assert run("--dataset", "hipc", *common, "--mask-mode", "classes", "--classes",
               "left,right") == 0
    m = manifest(out, "hipc")
    assert m["fields"]["mask"]["names"] == ["background", "left", "right"]
    assert reasons(m) == {"images/e.png": "mask missing: none in R/",
                          "L/zzz_mask.png": "mask without image",
                          "R/readme.txt": "not an image"}
    data = read_shard(out, "hipc", "train")
    assert m["splits"]["train"]["images_with_class"] == {"left": 4, "right": 4}
    assert len(data["mask"]) == 4
    for k in range(4):
        np.testing.assert_array_equal(data["mask"][k, :, :, 0], expected)

    assert run("--dataset", "hipu", *common) == 0  # union (the default): one class, 0/1
    m = manifest(out, "hipu")
    assert m["fields"]["mask"]["names"] == ["background", "foreground"]
    assert "images/e.png" in reasons(m)  # missing in one folder is still a reject
    data = read_shard(out, "hipu", "train")
    for k in range(4):
        np.testing.assert_array_equal(data["mask"][k, :, :, 0], (expected > 0).astype(np.uint8))


def test_masks_option_errors(mask_tree, tmp_path, capsys):
    root, _ = mask_tree
    for extra, message in (
            (["--masks", "L", "R", "--mask-mode", "classes", "--classes", "one"],
             "error: h: --classes gives 1 names for 2 mask class(es)"),
            (["--masks", "L", "nowhere"], "error: h: --masks "),
            (["--masks", "L", "R", "--mask-mode", "values", "--classes", "a"],
             "error: h: --mask-mode values reads one --masks folder of label maps, not 2"),
            (["--masks", "L", "--mask-mode", "values"],
             "error: h: --mask-mode values needs --classes"),
            ([], "error: h: the masks layout needs --masks")):
        assert run("--dataset", "h", "--layout", "masks", "--root", root, "--images", "images",
                   "--out", tmp_path / "o", *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err


def label_map(path: Path, scale: int = 1, mode: str = "L", values=(1, 2)) -> Path:
    """``LEFT`` and ``RIGHT`` as one label map (pixel value = class, later wins the overlap),
    at ``scale`` times 64x64, in ``mode``; a palette map's colours are not its indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((64 * scale, 64 * scale), np.uint16)
    for (x0, y0, x1, y1), v in zip((LEFT, RIGHT), values):
        arr[y0 * scale:y1 * scale, x0 * scale:x1 * scale] = v
    im = Image.fromarray(arr if mode == "I;16" else arr.astype(np.uint8))
    if mode == "P":  # an L image with a palette becomes P, its values the indices
        im.putpalette([0, 0, 0, 255, 255, 255, 90, 90, 90] + [7] * 759)
    elif mode not in ("L", "I;16"):
        im = im.convert(mode)
    im.save(path)
    return path


def test_masks_as_label_maps(mask_tree, tmp_path):
    root, expected = mask_tree
    maps = root / "labels"
    label_map(maps / "a.png")
    label_map(maps / "b.png", scale=2, mode="I;16")  # 16 bit, twice the size
    label_map(maps / "c.png", mode="P")
    label_map(maps / "d.png", mode="RGB")
    label_map(maps / "e.png", values=(1, 3))
    img(root / "images/f.png", seed=9)
    label_map(maps / "f.png", values=(255, 255))
    img(root / "images/g.png", seed=10)
    label_map(maps / "g.png", mode="I;16", values=(1, 1000))
    img(root / "images/h.png", seed=11)  # no label map
    out = tmp_path / "out"
    assert run("--dataset", "hipv", "--layout", "masks", "--root", root, "--images", "images",
               "--masks", "labels", "--mask-mode", "values", "--classes", "left,right",
               "--out", out, "--role", "pretrain") == 0
    m = manifest(out, "hipv")
    assert m["fields"]["mask"]["names"] == ["background", "left", "right"]
    assert reasons(m) == {
        "images/d.png": "label map in mode RGB: values are read from gray or palette images",
        "images/e.png": "label map has value 3, not a class (0 background, 1..2)",
        "images/f.png": "label map has value 255, not a class (0 background, 1..2); a 0/255 "
                        "mask is --mask-mode union",
        "images/g.png": "label map has value 1000, not a class (0 background, 1..2)",
        "images/h.png": "mask missing: none in labels/"}
    assert m["splits"]["train"]["images_with_class"] == {"left": 3, "right": 3}
    data = read_shard(out, "hipv", "train")
    assert len(data["mask"]) == 3
    for k in range(3):
        np.testing.assert_array_equal(data["mask"][k, :, :, 0], expected)


# --- coco ----------------------------------------------------------------------------------------

def test_coco_sparse_categories_boxes_and_rejects(tmp_path):
    root = tmp_path / "det"
    for k, stem in enumerate(("one", "two", "three", "four", "extra")):
        img(root / "images" / f"{stem}.png", ("L", "RGB", "I;16", "L", "L")[k], seed=k)
    write(root / "images/notes.txt", "x")
    doc = {
        "images": [{"id": 10, "file_name": "one.png", "width": 128, "height": 128},
                   {"id": 11, "file_name": "two.png", "width": 128, "height": 128},
                   {"id": 12, "file_name": "three.png", "width": 128, "height": 128},
                   {"id": 13, "file_name": "four.png", "width": 128, "height": 128},
                   {"id": 14, "file_name": "gone.png", "width": 128, "height": 128}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [0, 0, 64, 32]},
            {"id": 2, "image_id": 11, "category_id": 9, "bbox": [64, 64, 32, 64]},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [16, 32, 16, 16]},
            {"id": 4, "image_id": 99, "category_id": 3, "bbox": [1, 1, 2, 2]},
            {"id": 5, "image_id": 13, "category_id": 5, "bbox": [1, 1, 2, 2]}],
        "categories": [{"id": 9, "name": "effusion"}, {"id": 3, "name": "nodule"},
                       {"id": 7, "name": "mass"}],
    }
    write(root / "ann.json", json.dumps(doc))
    out = tmp_path / "out"
    assert run("--dataset", "det", "--layout", "coco", "--root", root, "--images", "images",
               "--coco", "ann.json", "--out", out, "--role", "pretrain") == 0
    m = manifest(out, "det")
    assert m["fields"]["box_labels"]["names"] == ["nodule", "mass", "effusion"]  # by id 3,7,9
    assert reasons(m) == {
        "ann.json#annotation=4": "unknown image: annotation 4 has image_id 99, not in images",
        "images/four.png": "bad box: annotation 5 has unknown category_id 5",
        "images/gone.png": "file missing: listed in ann.json",
        "images/extra.png": "not in the COCO file ann.json",
        "images/notes.txt": "not an image"}
    data = read_shard(out, "det", "train")
    recs = records_in_shard("det", root, "coco", {"images": "images", "coco": "ann.json",
                                                  "role": "pretrain"}, "train")
    stems = [r.image.stem for r in recs]
    assert stems == ["one", "three", "two"]
    assert same_pixels(data["image"], recs)
    assert data["num_boxes"].ravel().tolist() == [1, 0, 2]  # three: a task image, no box
    s = SIZE[0] / 128  # boxes are in the JSON's 128-px space, the files are 64 px
    np.testing.assert_allclose(data["boxes"][0, :1], [[0, 0, 64 * s, 32 * s]])
    np.testing.assert_allclose(data["boxes"][2, :2], [[64 * s, 64 * s, 96 * s, 128 * s],
                                                     [16 * s, 32 * s, 32 * s, 48 * s]])
    assert data["box_labels"][2, :3].tolist() == [3, 1, -1]
    assert data["box_labels"][0, 0] == 2
    assert m["splits"]["train"]["box_counts"] == {"nodule": 1, "mass": 1, "effusion": 1}


@pytest.mark.parametrize("outside", [[200, 200, 10, 10], [1e30, 10, 10, 10],
                                     [-50, 10, 20, 10]])
def test_coco_box_wholly_outside_its_image_rejects_the_image(tmp_path, outside):
    """A box with no part inside its image would be packed as a zero-area box (Faster R-CNN's
    loss is NaN on it); a box partly outside is clipped to the image and kept."""
    root = tmp_path / "det"
    images, annotations = [], []
    for k in range(4):
        img(root / f"{k}.png", seed=k, size=(100, 100))
        images.append({"id": k, "file_name": f"{k}.png", "width": 100, "height": 100})
        annotations.append({"id": 2 * k, "image_id": k, "category_id": 1,
                            "bbox": [50, 10, 60, 20]})  # partly outside: clipped at x = 100
        if k % 2:
            annotations.append({"id": 2 * k + 1, "image_id": k, "category_id": 1,
                                "bbox": outside})
    write(root / "ann.json", json.dumps({"images": images, "annotations": annotations,
                                         "categories": [{"id": 1, "name": "nodule"}]}))
    out = tmp_path / "out"
    assert run("--dataset", "det", "--layout", "coco", "--root", root, "--coco", "ann.json",
               "--out", out, "--role", "pretrain") == 0
    m = manifest(out, "det")
    assert sorted(reasons(m)) == ["1.png", "3.png"]
    assert all(r.startswith("bad box: [") and "empty after clipping to the 100x100 image" in r
               for r in reasons(m).values())
    data = read_shard(out, "det", "train")
    assert data["num_boxes"].ravel().tolist() == [1, 1]
    s = SIZE[0] / 100
    np.testing.assert_allclose(data["boxes"][:, 0], [[50 * s, 10 * s, 100 * s, 30 * s]] * 2)


# --- YAML definitions, groups for the nine, the synth external datasets ----------------------

def test_yaml_converts_two_datasets_and_refuses_unknown_keys(folders, csv_tree, tmp_path,
                                                             capsys):
    (knee, _), (cxr, _) = folders, csv_tree
    defs = tmp_path / "defs.yaml"
    defs.write_text(f"""datasets:
  - name: knee
    layout: folders
    root: {knee}
  - name: cxr
    layout: csv
    root: {cxr.name}
    csv: labels.csv
    images: images
    image_column: path
    label_columns: [A, B]
    patient_column: patient
""")
    out = tmp_path / "out"
    assert convert.main(["--datasets", str(defs), "--root", str(cxr.parent), "--out", str(out),
                         "--size", "32x32", "--workers", "1"]) == 0
    assert manifest(out, "knee")["fields"]["label"]["names"] == ["C", "a", "b"]
    assert manifest(out, "cxr")["fields"]["labels"]["names"] == ["A", "B"]
    assert manifest(out, "cxr")["params"]["definition"]["patient_column"] == "patient"
    capsys.readouterr()  # the progress bars
    defs.write_text(defs.read_text() + "    label_colum: oops\n")
    assert convert.main(["--datasets", str(defs), "--root", str(cxr.parent), "--out",
                         str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: {defs}: entry 2 (cxr): unknown key 'label_colum'; known: name, layout, root"), err
    assert not (tmp_path / "o2").exists()


def test_the_nine_get_groups_files_and_mask_names(tmp_path):
    from conftest import make_flat_dataset

    spec = make_flat_dataset(tmp_path / "src", "flat", 5, 90)
    m = convert.convert_dataset(spec, tmp_path / "src/flat", tmp_path / "o", size=SIZE,
                                log=lambda *_: 0)
    groups = np.load(tmp_path / "o/flat" / m["splits"]["train"]["groups"])
    assert groups.tolist() == [0, 1, 2, 3, 4] and groups.dtype == np.int32
    for name in ("chestmasks", "montgomery"):
        spec = get_spec(name)
        doc = convert._field_doc(spec, shard.ffcv_fields(spec.fields, SIZE))
        assert doc["mask"]["names"] == ["background", "lung"]


def test_layout_spec_builder_refuses_without_reading_images(tmp_path):
    with pytest.raises(LayoutError, match="^x: no class sub-folders"):
        layouts.build_spec("x", "folders", tmp_path, {})
    with pytest.raises(LayoutError, match="unknown layout"):
        layouts.build_spec("x", "zip", tmp_path, {})


def test_synth_external_datasets_convert_to_the_planted_truth(tmp_path):
    from data_prep.synth import generate

    truth = generate(tmp_path / "downloads", "tiny", seed=0)["external"]
    out = tmp_path / "shards"
    assert convert.main(["--datasets", str(ROOT / "configs/external_datasets.yaml"), "--root",
                         str(tmp_path / "downloads"), "--out", str(out), "--size", "64x40",
                         "--workers", "1", "--split", "official"]) == 0
    for name in ("knee", "hip"):
        t, m = truth[name], manifest(out, name)
        assert sum(s["count"] for s in m["splits"].values()) == t["usable"]
        got = reasons(m)
        assert len(got) == len(t["planted_rejects"])
        for r in t["planted_rejects"]:
            assert got[r["path"]].startswith(r["reason"]), (r, got)
        assert not set(t["junk"]) & set(got)
    knee, hip = manifest(out, "knee"), manifest(out, "hip")
    assert knee["fields"]["label"]["names"] == truth["knee"]["classes"]
    assert {s: v["count"] for s, v in knee["splits"].items()} == truth["knee"]["split_counts"]
    counts = {}
    for s in knee["splits"].values():
        for k, v in s["label_counts"].items():
            counts[k] = counts.get(k, 0) + v
    assert counts == truth["knee"]["label_counts"]
    assert hip["fields"]["mask"]["names"] == ["background", *truth["hip"]["classes"]]
    with_class = {}
    for s in hip["splits"].values():
        for k, v in s["images_with_class"].items():
            with_class[k] = with_class.get(k, 0) + v
    assert with_class == truth["hip"]["images_with_class"]
    assert set(hip["splits"]) == {"train", "valid", "test"}  # no official split: paper
