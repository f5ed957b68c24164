"""MultiMix's weak and strong views of an 8-bit gray image: FixMatch's, as the MultiMix
authors' code has them (``transform_weak``, ``transform_strong``, ``RandAugmentMC`` and its
13-operation pool, from FixMatch-pytorch's ``randaugment.py``), on PIL images as theirs.

- weak: horizontal flip (p 0.5), then a random crop of the image's size from the image padded
  by 1/8 of each side by reflection (their 32 px at 256);
- strong: the same flip and crop with a pad of 1/64 (their 4 px at 256), then 2 operations
  drawn with replacement from the pool, each applied with probability 0.5 at a magnitude
  drawn in 1-9 (of 10). Their Cutout is commented out; so it is here.

Every draw comes from a generator seeded by (seed, epoch, image index, view), so a view is
the same whichever rank draws it and after a resume.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

PARAMETER_MAX = 10
WEAK_PAD, STRONG_PAD = 1 / 8, 1 / 64
VIEWS = {"weak": 1, "strong": 2}


def _float(v: int, max_v: float) -> float:
    return float(v) * max_v / PARAMETER_MAX


def _int(v: int, max_v: float) -> int:
    return int(v * max_v / PARAMETER_MAX)


def _signed(x: float, rng: np.random.Generator) -> float:
    return -x if rng.random() < 0.5 else x


# (operation, max_v, bias): FixMatch-pytorch's fixmatch_augment_pool, in its order.
POOL = (
    ("autocontrast", None, None),
    ("brightness", 0.9, 0.05),
    ("contrast", 0.9, 0.05),
    ("equalize", None, None),
    ("identity", None, None),
    ("posterize", 4, 4),
    ("rotate", 30, 0),
    ("sharpness", 0.9, 0.05),
    ("shear_x", 0.3, 0),
    ("shear_y", 0.3, 0),
    ("solarize", 256, 0),
    ("translate_x", 0.3, 0),
    ("translate_y", 0.3, 0),
)


def apply(op: str, img: Image.Image, v: int, max_v, bias, rng: np.random.Generator
          ) -> Image.Image:
    """One pool operation at magnitude ``v``, as FixMatch-pytorch defines it."""
    if op == "autocontrast":
        return ImageOps.autocontrast(img)
    if op == "equalize":
        return ImageOps.equalize(img)
    if op == "identity":
        return img
    if op in ("brightness", "contrast", "sharpness"):
        enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                    "sharpness": ImageEnhance.Sharpness}[op]
        return enhancer(img).enhance(_float(v, max_v) + bias)
    if op == "posterize":
        return ImageOps.posterize(img, _int(v, max_v) + bias)
    if op == "solarize":
        return ImageOps.solarize(img, 256 - (_int(v, max_v) + bias))
    if op == "rotate":
        return img.rotate(_signed(_int(v, max_v) + bias, rng))
    s = _signed(_float(v, max_v) + bias, rng)
    matrix = {"shear_x": (1, s, 0, 0, 1, 0), "shear_y": (1, 0, 0, s, 1, 0),
              "translate_x": (1, 0, int(s * img.size[0]), 0, 1, 0),
              "translate_y": (1, 0, 0, 0, 1, int(s * img.size[1]))}[op]
    return img.transform(img.size, Image.Transform.AFFINE, matrix)


def flip_crop(img: np.ndarray, pad_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """torchvision's ``RandomHorizontalFlip()`` then ``RandomCrop(size, padding,
    padding_mode="reflect")`` at the image's own size."""
    if rng.random() < 0.5:
        img = img[:, ::-1]
    h, w = img.shape
    ph, pw = round(h * pad_fraction), round(w * pad_fraction)
    padded = np.pad(img, ((ph, ph), (pw, pw)), mode="reflect")
    top, left = int(rng.integers(0, 2 * ph + 1)), int(rng.integers(0, 2 * pw + 1))
    return np.ascontiguousarray(padded[top:top + h, left:left + w])


def rand_augment(img: np.ndarray, rng: np.random.Generator, n: int = 2, m: int = 10
                 ) -> np.ndarray:
    """``RandAugmentMC(n, m)`` without its Cutout."""
    pil = Image.fromarray(img)
    for i in rng.integers(0, len(POOL), size=n):
        op, max_v, bias = POOL[i]
        v = int(rng.integers(1, m))
        if rng.random() < 0.5:
            pil = apply(op, pil, v, max_v, bias, rng)
    return np.asarray(pil, dtype=np.uint8)


def view(img: np.ndarray, kind: str, seed: int, epoch: int, index: int) -> np.ndarray:
    """The ``kind`` view (weak or strong) of the uint8 (H, W) image of shard index ``index``
    in ``epoch``."""
    rng = np.random.default_rng([seed, epoch, index, VIEWS[kind], 0x4D4958])
    if kind == "weak":
        return flip_crop(img, WEAK_PAD, rng)
    return rand_augment(flip_crop(img, STRONG_PAD, rng), rng)
