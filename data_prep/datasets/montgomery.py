"""Montgomery County TB: ``CXR_png/MCUCXR_0001_0.png`` with lung masks.

``label`` = last digit of the stem (0 normal, 1 TB). ``masks`` = (left, right) from
``ManualMask/leftMask/<same name>`` and ``ManualMask/rightMask/<same name>``; the converter ORs
them. An image lacking either mask is a ``mask missing`` reject; a name that is not
``MCUCXR_<4 digits>_<0|1>.<image>`` is a ``bad name`` reject. Group = the 4-digit number.
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

NAME = re.compile(r"MCUCXR_(\d{4})_([01])")
SIDES = ("left", "right")


def _child(parent: Path, name: str) -> Path | None:
    """``parent/name``, matching the name case-insensitively."""
    if (parent / name).is_dir():
        return parent / name
    for c in sorted(parent.iterdir()):
        if c.is_dir() and c.name.lower() == name.lower():
            return c
    return None


def _mask(folder: Path | None, image: Path) -> Path | None:
    if folder is None:
        return None
    for name in (image.name, image.stem + ".png", image.stem + ".PNG"):
        if (folder / name).is_file():
            return folder / name
    return None


def scan(root: Path) -> Scan:
    images = find_dir(root, "CXR_png")
    if images is None:
        raise LayoutError(f"montgomery: no CXR_png/ folder in {root} or 2 levels below")
    manual = find_dir(images.parent, "ManualMask", 1) or find_dir(root, "ManualMask")
    if manual is None:
        raise LayoutError(f"montgomery: no ManualMask/ folder next to {images.name}/")
    folders = [_child(manual, f"{side}Mask") for side in SIDES]
    out = Scan()
    for p in list_files(images):
        m = NAME.fullmatch(p.stem)
        if m is None or not is_image(p):
            out.reject(root, p, "bad name: expected MCUCXR_NNNN_0.png or MCUCXR_NNNN_1.png")
            continue
        masks = [_mask(f, p) for f in folders]
        missing = [side for side, mask in zip(SIDES, masks) if mask is None]
        if missing:
            out.reject(root, p, f"mask missing: no {' and no '.join(missing)} mask")
            continue
        out.records.append(Record(p, m.group(1), label=int(m.group(2)), masks=tuple(masks)))
    out.records.sort(key=lambda r: r.image.as_posix())
    out.rejects.sort(key=lambda r: r.path)
    return out


LICENCE = Licence(
    terms='custom terms: research use, no sharing, attribution',
    summary=('The README: "Please do not share the data set outside of your research '
             'group/organization, but forward new data set requests to us"; publications '
             'attribute the National Library of Medicine, NIH and cite two papers. No '
             'statement on commercial use found.'),
    url=('https://lhncbc.nlm.nih.gov/LHC-publications/pubs/TuberculosisChestXrayImageDataS'
         'ets.html'),
    citation=NLM_TB_CITATION,
    read='the README (Citation and Use) through a copy of its text',
)

SPEC = DatasetSpec(name="montgomery", folder_names=("MontgomerySet", "Montgomery"),
                   role="pretrain", fields=("label", "mask"), scan=scan,
                   label_names=("normal", "tb"), mask_classes=("lung",),
                   licence=LICENCE)
