"""Flip + small rotation + Z-score in one pass over uint8 gray images.

Random parameters are a pure function of ``(seed, epoch, dataset, sample index, view)``
(a SplitMix64 hash), not of a generator's running state. A sample is therefore augmented the
same way whichever rank, batch or worker thread it lands on, which is what makes a resumed
run bit-identical to an uninterrupted one. The warp is one numba kernel that reads uint8 and
writes normalised float32 directly, parallel over images and releasing the GIL, so it runs in
the loader's background thread beside training.
"""

from __future__ import annotations

import math

import numba
import numpy as np

MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, dataset: np.ndarray, index: np.ndarray, view: int,
             stream: int) -> np.ndarray:
    """Uniform [0, 1) floats, one per (dataset, index) pair, reproducible anywhere."""
    with np.errstate(over="ignore"):
        key = np.uint64(((seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF)) & MASK64)
        h = _splitmix64(np.full(len(index), key, np.uint64))
        h = _splitmix64(h ^ (np.asarray(dataset, np.uint64) << np.uint64(48))
                        ^ np.asarray(index, np.uint64))
        h = _splitmix64(h ^ np.uint64(view << 8 | stream))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def affine_params(u_flip: np.ndarray, u_angle: np.ndarray, flip_prob: float,
                  max_degrees: float, width: int, height: int) -> np.ndarray:
    """Per image, the 2×3 map from output pixel (x, y) to source pixel: rotation by an angle in
    [-max_degrees, max_degrees] about the centre, then a horizontal flip with ``flip_prob``."""
    theta = np.deg2rad((2 * u_angle - 1) * max_degrees)
    c, s = np.cos(theta), np.sin(theta)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    flip = u_flip < flip_prob
    m = np.empty((len(theta), 2, 3), np.float32)
    # source = R(-theta) (out - centre) + centre, x mirrored afterwards when flipped
    m[:, 0, 0], m[:, 0, 1] = c, s
    m[:, 1, 0], m[:, 1, 1] = -s, c
    m[:, 0, 2] = cx - c * cx - s * cy
    m[:, 1, 2] = cy + s * cx - c * cy
    m[flip, 0] *= -1
    m[flip, 0, 2] += width - 1
    return m


@numba.njit(parallel=True, nogil=True, fastmath=True, cache=True)
def warp_normalize(src, src_of, mats, mean, std, out):
    """out[n, 0] = (bilinear(src[src_of[n]] at mats[n] · (x, y, 1)) - mean) / std.

    ``src``: (B, H, W) uint8; ``out``: (N, 1, H, W) float32; pixels from outside are 0."""
    n_out, _, h, w = out.shape
    inv = 1.0 / std
    for n in numba.prange(n_out):
        img = src[src_of[n]]
        a, b, c = mats[n, 0, 0], mats[n, 0, 1], mats[n, 0, 2]
        d, e, f = mats[n, 1, 0], mats[n, 1, 1], mats[n, 1, 2]
        exact = b == 0.0 and d == 0.0 and a * a == 1.0 and e == 1.0 and f == 0.0
        for y in range(h):
            row = out[n, 0, y]
            if exact:  # flip or identity: a copy, no interpolation
                for x in range(w):
                    row[x] = (img[y, int(a * x + c)] - mean) * inv
                continue
            sx0, sy0 = b * y + c, e * y + f
            for x in range(w):
                sx, sy = a * x + sx0, d * x + sy0
                x0, y0 = math.floor(sx), math.floor(sy)
                fx, fy = sx - x0, sy - y0
                x0, y0 = int(x0), int(y0)
                v00 = v01 = v10 = v11 = 0.0
                if 0 <= y0 < h:
                    if 0 <= x0 < w:
                        v00 = img[y0, x0]
                    if 0 <= x0 + 1 < w:
                        v01 = img[y0, x0 + 1]
                if 0 <= y0 + 1 < h:
                    if 0 <= x0 < w:
                        v10 = img[y0 + 1, x0]
                    if 0 <= x0 + 1 < w:
                        v11 = img[y0 + 1, x0 + 1]
                top = v00 + (v01 - v00) * fx
                bottom = v10 + (v11 - v10) * fx
                row[x] = (top + (bottom - top) * fy - mean) * inv


@numba.njit(parallel=True, nogil=True, cache=True)
def flip_copy(src, flip, out):
    """out[n] = src[n] mirrored in x where ``flip[n]`` (masks: no interpolation)."""
    for n in numba.prange(src.shape[0]):
        if flip[n]:
            out[n] = src[n, :, ::-1]
        else:
            out[n] = src[n]
