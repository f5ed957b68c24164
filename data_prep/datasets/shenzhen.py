"""Shenzhen (China set) TB: ``CXR_png/CHNCXR_0001_0.png``, label = last digit of the stem.

``ClinicalReadings/`` is not needed (the label is in the file name). ``Thumbs.db`` is junk and
skipped silently; any other file whose name is not ``CHNCXR_<4 digits>_<0|1>.<image>`` is a
``bad name`` reject. Group = the 4-digit number.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import (
    NLM_TB_CITATION,
    DatasetSpec,
    LayoutError,
    Licence,
    Record,
    Scan,
    find_dir,
    is_image,
    list_files,
)

NAME = re.compile(r"CHNCXR_(\d{4})_([01])")


def scan(root: Path) -> Scan:
    images = find_dir(root, "CXR_png")
    if images is None:
        raise LayoutError(f"shenzhen: no CXR_png/ folder in {root} or 2 levels below")
    out = Scan()
    for p in list_files(images):
        m = NAME.fullmatch(p.stem)
        if m is None or not is_image(p):
            out.reject(root, p, "bad name: expected CHNCXR_NNNN_0.png or CHNCXR_NNNN_1.png")
            continue
        out.records.append(Record(p, m.group(1), label=int(m.group(2))))
    out.records.sort(key=lambda r: r.image.as_posix())
    out.rejects.sort(key=lambda r: r.path)
    return out


LICENCE = Licence(
    terms='custom terms: research use, attribution',
    summary=('NLM: the sets "are available to the research community"; the README asks '
             'publications to attribute the National Library of Medicine, NIH and Shenzhen'
             " No.3 People's Hospital and to cite two papers. No statement on commercial "
             'use found.'),
    url=('https://lhncbc.nlm.nih.gov/LHC-publications/pubs/TuberculosisChestXrayImageDataS'
         'ets.html'),
    citation=NLM_TB_CITATION,
    read=("NLM's page; the README through copies of its text (whether it also holds "
          "Montgomery's do-not-share clause was not confirmed)"),
)

SPEC = DatasetSpec(name="shenzhen", folder_names=("ChinaSet_AllFiles", "Shenzhen"),
                   role="pretrain", fields=("label",), scan=scan, label_names=("normal", "tb"),
                   licence=LICENCE)
