"""Decode any X-ray file to 1-channel uint8 at the shard size, with its mask and boxes.

Resizing is a plain resize to W×H (no letterbox), the paper's 800×500 input; boxes are scaled
with it. Downscaling uses area averaging (anti-aliased), upscaling bilinear; masks nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps

from .datasets.base import Record

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must be a reject, not grey padding
Image.MAX_IMAGE_PIXELS = 64_000_000  # Montgomery is 20 Mpx; far above that is a bad file

MAX_BOXES = 32


class Unusable(Exception):
    """The file cannot be packed; the message is the reject reason."""


def to_uint8(im: Image.Image) -> np.ndarray:
    """Gray uint8 from any PIL mode. High-bit-depth images are windowed min→0, max→255 over
    their own range, so nothing is clipped (``convert('L')`` would clip I;16 at 255)."""
    if im.mode in ("L", "1", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "PA"):
        if im.mode in ("RGBA", "LA", "PA"):
            im = im.convert("RGB" if im.mode != "LA" else "L")
        return np.asarray(im.convert("L"), dtype=np.uint8)
    arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=2)
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def open_image(path) -> Image.Image:
    """The image as viewers show it: an EXIF orientation (phones, some scanners, JPEGs exported
    from PACS viewers) is applied, as annotation tools apply it before anyone draws a mask or a
    box. Stored as the raw pixels, an orientation that mirrors would swap the patient's sides."""
    try:
        im = Image.open(path)
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
    except FileNotFoundError:
        raise Unusable("file missing") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise Unusable(f"unreadable: {e}") from None
    return im


def resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    if arr.shape == (h, w):
        return arr
    shrink = arr.shape[0] * arr.shape[1] > w * h
    return cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def load_mask(paths, size: tuple[int, int]) -> np.ndarray:
    """Union of binary masks (any bit depth, any size) at ``size``, values 0/1."""
    w, h = size
    union = np.zeros((h, w), np.uint8)
    for p in paths:
        im = open_image(p)
        arr = np.asarray(im.convert("L") if im.mode in ("RGB", "RGBA", "P", "LA") else im)
        if arr.ndim == 3:
            arr = arr.max(axis=2)
        binary = (arr > 0).astype(np.uint8)
        union |= cv2.resize(binary, (w, h), interpolation=cv2.INTER_NEAREST)
    return union


def load_class_masks(class_masks, size: tuple[int, int]) -> np.ndarray:
    """Class index per pixel at ``size``: 0 background, ``k + 1`` where the union of
    ``class_masks[k]`` is set. Painted in order, so where two classes overlap the later one
    wins (an overlap is an annotation conflict; a fixed rule keeps the result reproducible)."""
    w, h = size
    out = np.zeros((h, w), np.uint8)
    for k, paths in enumerate(class_masks):
        out[load_mask(paths, size) > 0] = k + 1
    return out


# Modes whose pixels are the values as stored: gray at any depth, a palette's indices, 1 bit.
LABEL_MAP_MODES = ("L", "P", "1", "I", "I;16", "I;16L", "I;16B")


def load_label_map(path, classes: int, size: tuple[int, int]) -> np.ndarray:
    """A label map (pixel value = class index, 0 background, 1..``classes``) at ``size``.

    Read as stored, never converted: a palette image's indices are the classes, not its
    colours, and a 16-bit map keeps its values. A colour map or a value above ``classes`` makes
    the image a reject rather than a guess (a 0/255 binary mask read this way would be class
    255; that is ``--mask-mode union``)."""
    im = open_image(path)
    if im.mode not in LABEL_MAP_MODES:
        raise Unusable(f"label map in mode {im.mode}: values are read from gray or palette "
                       "images")
    arr = np.asarray(im).astype(np.int64)
    bad = np.unique(arr[(arr < 0) | (arr > classes)])
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:3]) + (", ..." if bad.size > 3 else "")
        hint = "; a 0/255 mask is --mask-mode union" if 255 in bad else ""
        raise Unusable(f"label map has value {shown}, not a class (0 background, 1..{classes})"
                       + hint)
    w, h = size
    return cv2.resize(arr.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)


@dataclass
class Decoded:
    image: np.ndarray  # (H, W) uint8
    mask: np.ndarray | None = None  # (H, W) uint8 class index (0 background)
    boxes: np.ndarray | None = None  # (n, 4) float32 xyxy in output pixels
    box_labels: np.ndarray | None = None  # (n,) int64 category ids


def decode(record: Record, size: tuple[int, int]) -> Decoded:
    im = open_image(record.image)
    src_w, src_h = im.size
    out = Decoded(resize(to_uint8(im), size))
    if record.masks:
        out.mask = load_mask(record.masks, size)
    elif record.class_masks:
        out.mask = load_class_masks(record.class_masks, size)
    elif record.label_map is not None:
        out.mask = load_label_map(record.label_map, record.label_map_classes, size)
    if record.boxes is not None:
        if len(record.boxes) > MAX_BOXES:
            raise Unusable(f"too many boxes: {len(record.boxes)} > {MAX_BOXES}")
        bw, bh = record.box_space or (src_w, src_h)
        sx, sy = size[0] / bw, size[1] / bh
        xywh = np.array([b[:4] for b in record.boxes], np.float64).reshape(-1, 4)
        xyxy = np.stack([xywh[:, 0] * sx, xywh[:, 1] * sy,
                         (xywh[:, 0] + xywh[:, 2]) * sx, (xywh[:, 1] + xywh[:, 3]) * sy], 1)
        boxes = np.clip(xyxy, 0, [size[0], size[1], size[0], size[1]]).astype(np.float32)
        # Clipping keeps the part of a box inside its image; a box with no such part would be
        # packed as a zero-area box, which Faster R-CNN refuses (a NaN loss at best).
        empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if empty.any():
            box = ", ".join(f"{float(v):g}" for v in xywh[np.flatnonzero(empty)[0]])
            raise Unusable(f"bad box: [{box}] (x, y, w, h) is empty after clipping to the "
                           f"{bw:g}x{bh:g} image")
        out.boxes = boxes
        out.box_labels = np.array([int(b[4]) for b in record.boxes], np.int64)
    return out
