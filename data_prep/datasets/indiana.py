"""Indiana University chest X-rays (OpenI), in either of its two download layouts.

OpenI: ``NLMCXR_png/CXR1_1_IM-0001-3001.png`` and report XMLs ``ecgen-radiology/1.xml``; a report
names its images by ``<parentImage id="<png stem>">`` (some reports name none).
Kaggle: ``indiana_reports.csv`` (uid, MeSH, Problems, ...) and ``indiana_projections.csv``
(uid, filename, projection) with images in ``images/images_normalized/``.

``label`` is 0 when every MeSH major (and, in the CSV, every Problems entry) is ``normal``, else
1. Group = the report uid. An image that no report refers to is a ``no report`` reject.
When both layouts are present the OpenI one is read.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from .base import (
    DatasetSpec,
    LayoutError,
    Licence,
    Record,
    Scan,
    find_dir,
    find_file,
    is_image,
    list_files,
    read_csv,
)

REPORTS_CSV, PROJECTIONS_CSV = "indiana_reports.csv", "indiana_projections.csv"


def read_table(path: Path) -> list[dict[str, str]]:
    """Rows as {lower-case header: stripped cell}; BOM, blank lines and ragged rows tolerated."""
    rows = read_csv(path)
    if not rows:
        return []
    header = [h.lower() for h in rows[0]]
    return [dict(zip(header, r)) for r in rows[1:]]


def label_of(entries: list[str]) -> int | None:
    """0 if every entry is ``normal``, 1 if any is not, None if there is none."""
    entries = [e.strip().lower() for e in entries if e.strip()]
    if not entries:
        return None
    return 0 if all(e == "normal" for e in entries) else 1


def _parse_report(path: Path) -> tuple[str, int | None, list[str]]:
    """(uid, label, referenced image stems) of one OpenI report XML."""
    tree = ET.parse(path)
    uid_el = tree.find(".//uId")
    uid = (uid_el.get("id") or "").strip() if uid_el is not None else ""
    if not uid:
        uid = f"CXR{path.stem}" if path.stem.isdigit() else path.stem
    majors = [el.text or "" for el in tree.findall(".//MeSH/major")]
    stems = []
    for el in tree.findall(".//parentImage"):
        stem = (el.get("id") or "").strip()
        if not stem:
            url = el.findtext("url") or ""
            stem = Path(url.strip()).stem if url.strip() else ""
        if stem:
            stems.append(stem)
    return uid, label_of(majors), stems


def _scan_openi(root: Path, images: Path, reports: Path) -> Scan:
    out = Scan()
    by_stem: dict[str, tuple[str, int | None]] = {}
    for xml in list_files(reports):
        if xml.suffix.lower() != ".xml":
            continue
        try:
            uid, label, stems = _parse_report(xml)
        except ET.ParseError as e:
            out.reject(root, xml, f"no report: unreadable report XML ({e})")
            continue
        for stem in stems:
            by_stem.setdefault(stem, (uid, label))
    for p in list_files(images):
        if not is_image(p):
            out.reject(root, p, "bad name: not an image file")
            continue
        report = by_stem.get(p.stem)
        if report is None:
            out.reject(root, p, "no report: no report XML names this image")
        elif report[1] is None:
            out.reject(root, p, "label missing: report has no MeSH major")
        else:
            out.records.append(Record(p, report[0], label=report[1]))
    return out


def _scan_kaggle(root: Path, reports_csv: Path, projections_csv: Path) -> Scan:
    base = reports_csv.parent
    images = (find_dir(base, "images_normalized") or find_dir(root, "images_normalized")
              or (base / "images" if (base / "images").is_dir() else None))
    if images is None:
        raise LayoutError(f"indiana: no images/images_normalized/ folder next to {REPORTS_CSV}")
    out = Scan()
    labels: dict[str, int | None] = {}
    for row in read_table(reports_csv):
        uid = row.get("uid", "")
        if uid and uid not in labels:
            entries = row.get("mesh", "").split(";") + row.get("problems", "").split(";")
            labels[uid] = label_of(entries)
    uid_of: dict[str, str] = {}
    for row in read_table(projections_csv):
        name = Path(row.get("filename", "")).name
        if name and name not in uid_of:
            uid_of[name] = row.get("uid", "")
    files = {}
    for p in list_files(images):
        if not is_image(p):
            out.reject(root, p, "bad name: not an image file")
        else:
            files.setdefault(p.name, p)
    for name in sorted(set(uid_of) - set(files)):
        out.reject(root, images / name, f"file missing: listed in {PROJECTIONS_CSV}")
    for name, p in files.items():
        uid = uid_of.get(name)
        if not uid or uid not in labels:
            out.reject(root, p, f"no report: not listed with a report uid in {PROJECTIONS_CSV}"
                       if not uid else f"no report: uid not in {REPORTS_CSV}")
        elif labels[uid] is None:
            out.reject(root, p, "label missing: report has no MeSH/Problems entry")
        else:
            out.records.append(Record(p, uid, label=labels[uid]))
    return out


def scan(root: Path) -> Scan:
    images, reports = find_dir(root, "NLMCXR_png"), find_dir(root, "ecgen-radiology")
    reports_csv = find_file(root, (REPORTS_CSV,))
    projections_csv = find_file(root, (PROJECTIONS_CSV,))
    if images is not None and reports is not None:
        out = _scan_openi(root, images, reports)
    elif reports_csv is not None and projections_csv is not None:
        out = _scan_kaggle(root, reports_csv, projections_csv)
    elif images is not None:
        raise LayoutError(f"indiana: found NLMCXR_png/ but no ecgen-radiology/ reports in {root}")
    else:
        raise LayoutError(f"indiana: neither NLMCXR_png/ + ecgen-radiology/ nor {REPORTS_CSV} + "
                          f"{PROJECTIONS_CSV} found in {root} or 2 levels below")
    out.records.sort(key=lambda r: r.image.as_posix())
    out.rejects.sort(key=lambda r: r.path)
    return out


LICENCE = Licence(
    terms='not confirmed (third parties: CC BY-NC-ND 4.0)',
    summary=("The publisher's terms (Open-i's FAQ) could not be read; third parties give "
             'CC BY-NC-ND 4.0 (non-commercial, no derivatives, attribution), one mirror CC'
             " BY-ND 4.0. Read Open-i's FAQ before sharing weights trained on it."),
    url='https://openi.nlm.nih.gov/faq',
    citation=('Demner-Fushman D et al., Preparing a collection of radiology examinations '
              'for distribution and retrieval, JAMIA 23(2):304-310, 2016'),
    read='not found from the publisher; second-hand statements that disagree',
)

SPEC = DatasetSpec(name="indiana",
                   folder_names=("OpenI", "IndianaOpenI", "indiana",
                                 "chest-xrays-indiana-university"),
                   role="pretrain", fields=("label",), scan=scan,
                   label_names=("normal", "abnormal"),
                   licence=LICENCE)
