"""Scanners of the pre-training-only sets (nih, shenzhen, montgomery, indiana, boneage) on
hand-built download trees that carry each quirk of ``data_prep/LAYOUTS.md``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.datasets import get_spec
from data_prep.datasets.base import LayoutError

PRETRAIN = ("nih", "shenzhen", "montgomery", "indiana", "boneage")
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def png(path: Path, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8), 90, np.uint8)).convert(mode).save(path)
    return path


def write(path: Path, text: str | bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def rel(root: Path, records) -> list[str]:
    return [r.image.relative_to(root).as_posix() for r in records]


def hot(*names: str) -> tuple[int, ...]:
    spec = get_spec("nih")
    return tuple(int(n in names) for n in spec.label_names)


@pytest.mark.parametrize("name", PRETRAIN)
def test_specs_follow_the_contract(name):
    spec = get_spec(name)
    assert spec.name == name and spec.role == "pretrain"
    expected = {"nih": ("labels",), "shenzhen": ("label",), "montgomery": ("label", "mask"),
                "indiana": ("label",), "boneage": ("boneage", "male")}
    assert spec.fields == expected[name]
    assert spec.has_official_split == (name == "nih")
    first = {"nih": "ChestX-ray14", "shenzhen": "ChinaSet_AllFiles",
             "montgomery": "MontgomerySet", "indiana": "OpenI", "boneage": "rsna-bone-age"}
    assert spec.folder_names[0] == first[name]
    assert len(get_spec("nih").label_names) == 15
    assert get_spec("nih").label_names[-1] == "No Finding"
    assert get_spec("shenzhen").label_names == ("normal", "tb")
    assert get_spec("indiana").label_names == ("normal", "abnormal")


@pytest.mark.parametrize("name", PRETRAIN)
def test_foreign_folder_is_a_layout_error(name, tmp_path):
    png(tmp_path / "something" / "else.png")
    with pytest.raises(LayoutError, match=rf"^{name}: "):
        get_spec(name).scan(tmp_path)


# --- nih ---------------------------------------------------------------------------------------

def test_nih_kaggle_layout_2017_csv_with_trailing_commas(tmp_path):
    root = tmp_path / "nih-chest-xrays"
    png(root / "images_001/images/00000001_000.png")
    png(root / "images_001/images/00000001_001.png", "RGBA")
    png(root / "images_002/images/00000002_000.png")
    png(root / "images_002/images/00000003_000.png")  # no CSV row
    png(root / "images_002/images/00000004_000.png")  # unknown finding
    png(root / "images_003/images/00000005_000.png")  # empty findings
    write(root / "images_001/images/Thumbs.db", b"junk")
    write(root / "images_003/images/._00000005_000.png", b"junk")
    write(root / "__MACOSX/images_001/images/00000001_000.png", b"junk")
    rows = [
        "00000001_000.png,Cardiomegaly|Emphysema,0,1,58,M,PA,2682,2749,0.143,0.143,",
        "00000001_001.png, No Finding ,1,1,58,M,PA,2894,2729,0.143,0.143,",
        "",
        "00000002_000.png,Effusion|Pleural_Thickening|Hernia,0,2,81,M,PA,2500,2048,0.168,0.168,",
        "00000004_000.png,Effusion|Covid,0,4,12,F,AP,2500,2048,0.168,0.168,",
        "00000005_000.png,,0,5,30,F,AP,2500,2048,0.168,0.168,",
        "00000009_000.png,Mass,0,9,30,F,AP,2500,2048,0.168,0.168,",  # image absent
    ]
    write(root / "Data_Entry_2017.csv", "\ufeff" + NIH_HEADER + ",\r\n" + "\r\n".join(rows)
          + "\r\n\r\n")
    write(root / "train_val_list.txt", "00000001_000.png\n00000001_001.png\n\n")
    write(root / "test_list.txt", "00000002_000.png\n00000009_000.png\n")

    scan = get_spec("nih").scan(root)
    assert rel(root, scan.records) == ["images_001/images/00000001_000.png",
                                       "images_001/images/00000001_001.png",
                                       "images_002/images/00000002_000.png"]
    assert [r.labels for r in scan.records] == [
        hot("Cardiomegaly", "Emphysema"), hot("No Finding"),
        hot("Effusion", "Pleural_Thickening", "Hernia")]
    assert [r.group for r in scan.records] == ["1", "1", "2"]
    assert [r.split for r in scan.records] == ["train", "train", "test"]
    assert all(r.task and r.masks == () for r in scan.records)
    assert [(r.path, r.reason.split(":")[0]) for r in scan.rejects] == [
        ("00000009_000.png", "file missing"),
        ("images_002/images/00000003_000.png", "label missing"),
        ("images_002/images/00000004_000.png", "unknown finding"),
        ("images_003/images/00000005_000.png", "label missing"),
    ]
    assert "Covid" in scan.rejects[2].reason


def test_nih_flat_images_v2020_csv_one_level_deeper(tmp_path):
    root = tmp_path / "ChestX-ray14"
    data = root / "CXR8"  # the archive unpacked one level deeper
    png(data / "images/00000010_000.png")
    png(data / "images/00000011_000.png")
    png(data / "images/00000011_002.png")
    write(data / "images/notes.txt", "not an image")
    write(data / "Data_Entry_2017_v2020.csv", "\n".join([
        NIH_HEADER,
        "00000010_000.png,Atelectasis|Infiltration|Mass|Nodule|Pneumonia,0,10,40,M,PA,1,1,1,1",
        "00000011_000.png,Pneumothorax|Consolidation|Edema|Fibrosis,0,11,41,F,PA,1,1,1,1",
        "00000011_002.png,No Finding,2,11,41,F,PA,1,1,1,1",
    ]) + "\n")

    scan = get_spec("nih").scan(root)
    assert rel(root, scan.records) == ["CXR8/images/00000010_000.png",
                                       "CXR8/images/00000011_000.png",
                                       "CXR8/images/00000011_002.png"]
    assert [r.labels for r in scan.records] == [
        hot("Atelectasis", "Infiltration", "Mass", "Nodule", "Pneumonia"),
        hot("Pneumothorax", "Consolidation", "Edema", "Fibrosis"), hot("No Finding")]
    assert [r.group for r in scan.records] == ["10", "11", "11"]
    assert [r.split for r in scan.records] == [None, None, None]  # no official lists
    assert [(r.path, r.reason.split(":")[0]) for r in scan.rejects] == [
        ("CXR8/images/notes.txt", "bad name")]


def test_nih_csv_without_images_is_a_layout_error(tmp_path):
    write(tmp_path / "Data_Entry_2017.csv", NIH_HEADER + ",\n")
    with pytest.raises(LayoutError, match="^nih: .*images"):
        get_spec("nih").scan(tmp_path)


# --- shenzhen ----------------------------------------------------------------------------------

def test_shenzhen_labels_groups_junk_and_bad_names(tmp_path):
    root = tmp_path / "Shenzhen"
    cxr = root / "ChinaSet_AllFiles" / "CXR_png"
    for stem in ("CHNCXR_0001_0", "CHNCXR_0002_0", "CHNCXR_0327_1", "CHNCXR_0662_1"):
        png(cxr / f"{stem}.png", "RGB")
    write(cxr / "Thumbs.db", b"\x00junk")
    write(cxr / ".DS_Store", b"junk")
    png(cxr / "CHNCXR_0003_2.png")
    png(cxr / "CHNCXR_04_0.png")
    write(cxr / "CHNCXR_0005_0.txt", "not an image")
    write(root / "ChinaSet_AllFiles/ClinicalReadings/CHNCXR_0001_0.txt", "male 45yrs\nnormal\n")

    scan = get_spec("shenzhen").scan(root)
    pre = "ChinaSet_AllFiles/CXR_png/"
    assert rel(root, scan.records) == [pre + s + ".png" for s in (
        "CHNCXR_0001_0", "CHNCXR_0002_0", "CHNCXR_0327_1", "CHNCXR_0662_1")]
    assert [r.label for r in scan.records] == [0, 0, 1, 1]
    assert [r.group for r in scan.records] == ["0001", "0002", "0327", "0662"]
    assert all(r.split is None for r in scan.records)
    assert [(r.path, r.reason.split(":")[0]) for r in scan.rejects] == [
        (pre + "CHNCXR_0003_2.png", "bad name"),
        (pre + "CHNCXR_0005_0.txt", "bad name"),
        (pre + "CHNCXR_04_0.png", "bad name"),
    ]


# --- montgomery --------------------------------------------------------------------------------

def test_montgomery_masks_and_missing_mask(tmp_path):
    root = tmp_path / "MontgomerySet"
    for stem in ("MCUCXR_0001_0", "MCUCXR_0002_1", "MCUCXR_0003_0", "MCUCXR_0004_1"):
        png(root / "CXR_png" / f"{stem}.png")
    for stem in ("MCUCXR_0001_0", "MCUCXR_0002_1", "MCUCXR_0003_0"):
        png(root / "ManualMask/leftMask" / f"{stem}.png")
    for stem in ("MCUCXR_0001_0", "MCUCXR_0002_1", "MCUCXR_0099_0"):
        png(root / "ManualMask/rightMask" / f"{stem}.png")
    png(root / "CXR_png/MCUCXR_x.png")
    write(root / "CXR_png/Thumbs.db", b"junk")
    write(root / "ClinicalReadings/MCUCXR_0001_0.txt", "Patient's Sex: F\n")

    scan = get_spec("montgomery").scan(root)
    assert rel(root, scan.records) == ["CXR_png/MCUCXR_0001_0.png", "CXR_png/MCUCXR_0002_1.png"]
    assert [r.label for r in scan.records] == [0, 1]
    assert [r.group for r in scan.records] == ["0001", "0002"]
    assert [tuple(m.relative_to(root).as_posix() for m in r.masks) for r in scan.records] == [
        ("ManualMask/leftMask/MCUCXR_0001_0.png", "ManualMask/rightMask/MCUCXR_0001_0.png"),
        ("ManualMask/leftMask/MCUCXR_0002_1.png", "ManualMask/rightMask/MCUCXR_0002_1.png")]
    assert [(r.path, r.reason.split(":")[0]) for r in scan.rejects] == [
        ("CXR_png/MCUCXR_0003_0.png", "mask missing"),
        ("CXR_png/MCUCXR_0004_1.png", "mask missing"),
        ("CXR_png/MCUCXR_x.png", "bad name"),
    ]
    assert "right" in scan.rejects[0].reason and "left" not in scan.rejects[0].reason
    assert "left" in scan.rejects[1].reason and "right" in scan.rejects[1].reason


# --- indiana -----------------------------------------------------------------------------------

def openi_report(uid: str, majors: list[str], images: list[str]) -> str:
    mesh = "".join(f"<major>{m}</major>" for m in majors)
    parents = "".join(
        f'<parentImage id="{s}"><figureId>F1</figureId>'
        f"<url>/hadoop/storage/radiology/extract/{s}.jpg</url></parentImage>" for s in images)
    return (f'<?xml version="1.0" encoding="utf-8"?><eCitation><meta type="rr"/>'
            f'<uId id="{uid}"/><MedlineCitation><Article><Abstract>'
            f'<AbstractText Label="FINDINGS">Lungs &amp; heart.</AbstractText></Abstract>'
            f"</Article></MedlineCitation><MeSH>{mesh}<minor>x</minor></MeSH>{parents}"
            f"</eCitation>")


def test_indiana_openi_layout(tmp_path):
    root = tmp_path / "OpenI"
    imgs = root / "NLMCXR_png"
    for stem in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_1_IM-0652-1001",
                 "CXR3_1_IM-0003-1001", "CXR9_1_IM-0009-1001"):
        png(imgs / f"{stem}.png")
    write(imgs / "Thumbs.db", b"junk")
    xml = root / "ecgen-radiology"
    write(xml / "1.xml", openi_report("CXR1", ["normal"],
                                      ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]))
    write(xml / "2.xml", openi_report("CXR2", ["Cardiomegaly/borderline", "normal"],
                                      ["CXR2_1_IM-0652-1001"]))
    write(xml / "3.xml", openi_report("CXR3", ["Opacity/lung/base/left"], []))  # no image named
    write(xml / "4.xml", openi_report("CXR4", ["normal"], []))
    write(xml / ".DS_Store", b"junk")

    scan = get_spec("indiana").scan(root)
    assert rel(root, scan.records) == ["NLMCXR_png/CXR1_1_IM-0001-3001.png",
                                       "NLMCXR_png/CXR1_1_IM-0001-4001.png",
                                       "NLMCXR_png/CXR2_1_IM-0652-1001.png"]
    assert [r.label for r in scan.records] == [0, 0, 1]
    assert [r.group for r in scan.records] == ["CXR1", "CXR1", "CXR2"]
    assert [(r.path, r.reason.split(":")[0]) for r in scan.rejects] == [
        ("NLMCXR_png/CXR3_1_IM-0003-1001.png", "no report"),
        ("NLMCXR_png/CXR9_1_IM-0009-1001.png", "no report"),
    ]


def test_indiana_kaggle_layout(tmp_path):
    root = tmp_path / "chest-xrays-indiana-university"
    imgs = root / "images" / "images_normalized"
    for name in ("1_IM-0001-3001.dcm.png", "1_IM-0001-4001.dcm.png", "2_IM-0652-1001.dcm.png",
                 "3_IM-1384-1001.dcm.png", "7_IM-0007-1001.dcm.png"):
        png(imgs / name)
    write(imgs / "Thumbs.db", b"junk")
    write(root / "indiana_reports.csv", "\ufeff" + "\n".join([
        "uid,MeSH,Problems,image,indication,comparison,findings,impression",
        '1,normal,normal,Xray Chest PA and Lateral,"Positive TB test, cough",None.,'
        '"The lungs are clear, no effusion.",Normal chest x-XXXX.',
        "2,Cardiomegaly/borderline;Pulmonary Artery/enlarged,Cardiomegaly;Pulmonary Artery,"
        "Chest PA,,,,Borderline cardiomegaly.",
        "",
        "3,normal,Nodule,Chest,,,,",  # MeSH normal but a Problems entry is not
        "5, normal , normal ,Chest,,,,",
    ]) + "\n")
    write(root / "indiana_projections.csv", "\n".join([
        "uid,filename,projection",
        "1,1_IM-0001-3001.dcm.png,Frontal",
        "1,1_IM-0001-4001.dcm.png,Lateral",
        "2,2_IM-0652-1001.dcm.png,Frontal",
        "3,3_IM-1384-1001.dcm.png,Frontal",
        "5,5_IM-0005-1001.dcm.png,Frontal",  # listed, file absent
    ]) + "\n")

    scan = get_spec("indiana").scan(root)
    pre = "images/images_normalized/"
    assert rel(root, scan.records) == [pre + n for n in (
        "1_IM-0001-3001.dcm.png", "1_IM-0001-4001.dcm.png", "2_IM-0652-1001.dcm.png",
        "3_IM-1384-1001.dcm.png")]
    assert [r.label for r in scan.records] == [0, 0, 1, 1]
    assert [r.group for r in scan.records] == ["1", "1", "2", "3"]
    assert [(r.path, r.reason.split(":")[0]) for r in scan.rejects] == [
        (pre + "5_IM-0005-1001.dcm.png", "file missing"),
        (pre + "7_IM-0007-1001.dcm.png", "no report"),
    ]


def test_indiana_images_without_reports_is_a_layout_error(tmp_path):
    png(tmp_path / "NLMCXR_png/CXR1_1_IM-0001-3001.png")
    with pytest.raises(LayoutError, match="^indiana: .*ecgen-radiology"):
        get_spec("indiana").scan(tmp_path)


# --- boneage -----------------------------------------------------------------------------------

def test_boneage_doubly_nested_sparse_ids(tmp_path):
    root = tmp_path / "rsna-bone-age"
    imgs = root / "boneage-training-dataset" / "boneage-training-dataset"
    for i in (1377, 1378, 1381, 15610, 9999):
        png(imgs / f"{i}.png")
    write(imgs / "Thumbs.db", b"junk")
    png(root / "boneage-test-dataset/boneage-test-dataset/4360.png")  # unlabelled test set
    write(root / "boneage-training-dataset.csv", "\ufeff" + "\r\n".join([
        "id,boneage,male",
        "1377,180,False",
        "1378, 12 ,True",
        "",
        "1381,82.5,TRUE",
        "1383,94,False",  # file absent
        "15610,228,false",
    ]) + "\r\n")

    scan = get_spec("boneage").scan(root)
    pre = "boneage-training-dataset/boneage-training-dataset/"
    assert rel(root, scan.records) == [pre + f"{i}.png" for i in (1377, 1378, 1381, 15610)]
    assert [r.boneage for r in scan.records] == [180.0, 12.0, 82.5, 228.0]
    assert all(isinstance(r.boneage, float) for r in scan.records)
    assert [r.male for r in scan.records] == [0, 1, 1, 0]
    assert [r.group for r in scan.records] == ["1377", "1378", "1381", "15610"]
    assert [(r.path, r.reason.split(":")[0]) for r in scan.rejects] == [
        (pre + "1383.png", "file missing"),
        (pre + "9999.png", "label missing"),
    ]


def test_boneage_anchor_one_level_deeper(tmp_path):
    root = tmp_path / "boneage"
    base = root / "rsna"
    png(base / "boneage-training-dataset/boneage-training-dataset/5.png")
    write(base / "boneage-training-dataset.csv", "id,boneage,male\n5,30,True\n")
    scan = get_spec("boneage").scan(root)
    assert rel(root, scan.records) == [
        "rsna/boneage-training-dataset/boneage-training-dataset/5.png"]
    assert scan.rejects == []
