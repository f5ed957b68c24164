"""Flip + small rotation (+ optional brightness/contrast jitter) + Z-score over uint8 gray
images, straight into float32.

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


def rotate_flip_normalize(src, src_of, degrees, flip, mean, std, out, gain=None,
                          offset=None) -> None:
    """out[n, 0] = Z-score of src[src_of[n]] rotated by degrees[n] about its centre (zero fill),
    then mirrored in x where flip[n]. With ``gain``/``offset`` (float, one per output), each
    source gray level v is first mapped to clip(gain[n]·v + offset[n], 0, 255): intensity
    jitter (``intensity_jitter``); the fill outside the rotated film stays 0.

    The rotation is done as three shears (Paeth): x-shear by tan(θ/2), y-shear by -sin(θ),
    x-shear by tan(θ/2), each a linear interpolation with one weight per row (or column). The
    x-passes vectorise fully and the y-pass is one gather per pixel, about 5x cheaper here than
    a per-pixel bilinear warp, and within a gray level or two of it for the small angles used.
    θ = 0 is an exact copy. ``src``: (B, H, W) uint8; ``out``: (N, 1, H, W) float32.
    """
    threads = max(1, min(numba.get_num_threads(), len(out)))
    n = len(out)
    jitter = gain is not None or offset is not None
    gain = np.ones(n, np.float32) if gain is None else np.asarray(gain, np.float32)
    offset = np.zeros(n, np.float32) if offset is None else np.asarray(offset, np.float32)
    _rotate_flip_normalize(src, np.asarray(src_of, np.int64), np.asarray(degrees, np.float64),
                           np.asarray(flip, np.bool_), float(mean), float(std), out, threads,
                           gain, offset, jitter)


def intensity_jitter(u_apply, u_brightness, u_contrast, image_mean, prob: float,
                     brightness: float, contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-view ``(gain, offset)`` for ``rotate_flip_normalize``: torchvision's
    ``adjust_brightness`` (v·b) then ``adjust_contrast`` (blend with the image's mean gray
    level, (v - m)·c + m), as MoCo v2's ``ColorJitter(brightness, contrast)`` draws them
    (b in [1 - brightness, 1 + brightness], c likewise), applied with probability ``prob``.
    Composed into one affine map clipped once: torchvision also clips between the two, which
    matters only for pixels the brightness step saturates. ``u_*``: uniforms in [0, 1) per
    view; ``image_mean``: each view's source image mean gray level."""
    on = u_apply < prob
    b = np.where(on, 1 + brightness * (2 * u_brightness - 1), 1.0)
    c = np.where(on, 1 + contrast * (2 * u_contrast - 1), 1.0)
    return (b * c).astype(np.float32), ((1 - c) * b * image_mean).astype(np.float32)


@numba.njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _rotate_flip_normalize(src, src_of, degrees, flip, mean, std, out, threads, gain, offset,
                           jitter):
    n_out, _, h, w = out.shape
    inv, mu = np.float32(1.0 / std), np.float32(mean)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    max_t = np.abs(np.tan(np.deg2rad(degrees) / 2.0)).max() if n_out else 0.0
    px_max = int(math.ceil(max_t * cy)) + 2
    py_max = int(math.ceil(min(1.0, 2 * max_t) * (cx + px_max))) + 2
    for t in numba.prange(threads):
        # scratch once per thread: fresh large arrays per image would page-fault every time
        a_buf = np.empty((h + 2 * py_max) * (w + 2 * px_max), np.float32)
        b_buf = np.empty(h * (w + 2 * px_max), np.float32)
        off = np.empty(w + 2 * px_max, np.int64)
        wgt = np.empty(w + 2 * px_max, np.float32)
        row_f = np.empty(w, np.float32)
        for n in range(t, n_out, threads):
            img = src[src_of[n]]
            g_n, o_n = gain[n], offset[n]
            theta = degrees[n] * math.pi / 180.0
            alpha, beta = math.tan(theta / 2.0), -math.sin(theta)
            px = int(math.ceil(abs(alpha) * cy)) + 2
            py = int(math.ceil(abs(beta) * (cx + px))) + 2
            wa, ha = w + 2 * px, h + 2 * py
            a = a_buf[:ha * wa]
            a[:] = 0.0
            # pass 1: A(x, y) = src(x + alpha (y - cy), y); A is padded by px, py
            for y in range(h):
                s = alpha * (y - cy)
                k = math.floor(s)
                f = np.float32(s - k)
                g = np.float32(1.0) - f
                i0 = (y + py) * wa + px - int(k)
                if jitter:
                    for i in range(w):
                        row_f[i] = min(max(g_n * np.float32(img[y, i]) + o_n, np.float32(0.0)),
                                       np.float32(255.0))
                else:
                    for i in range(w):
                        row_f[i] = np.float32(img[y, i])
                r0, r1, dst = row_f[0:w - 1], row_f[1:w], a[i0:i0 + w - 1]
                for i in range(w - 1):
                    dst[i] = g * r0[i] + f * r1[i]
                a[i0 - 1] = f * row_f[0]
                a[i0 + w - 1] = g * row_f[w - 1]
            # pass 2: B(x, y) = A(x, y + beta (x - cx)), one row offset and weight per column
            for i in range(wa):
                s = beta * (i - px - cx)
                k = math.floor(s)
                off[i] = (py + int(k)) * wa + i
                wgt[i] = np.float32(s - k)
            for y in range(h):
                src_rows = a[y * wa:]
                dst = b_buf[y * wa:(y + 1) * wa]
                for i in range(wa):
                    v0 = src_rows[off[i]]
                    dst[i] = v0 + wgt[i] * (src_rows[off[i] + wa] - v0)
            # pass 3: out(x, y) = B(x + alpha (y - cy), y), mirrored if flipped, Z-scored
            for y in range(h):
                s = alpha * (y - cy)
                k = math.floor(s)
                f = np.float32(s - k)
                g = np.float32(1.0) - f
                j = y * wa + px + int(k)
                b0, b1 = b_buf[j:j + w], b_buf[j + 1:j + 1 + w]
                dst = out[n, 0, y, ::-1] if flip[n] else out[n, 0, y]
                for x in range(w):
                    dst[x] = (g * b0[x] + f * b1[x] - mu) * inv


@numba.njit(parallel=True, nogil=True, cache=True)
def flip_copy(src, flip, out):
    """out[n] = src[n] mirrored in x where ``flip[n]`` (masks: no interpolation)."""
    for n in numba.prange(src.shape[0]):
        if flip[n]:
            out[n] = src[n, :, ::-1]
        else:
            out[n] = src[n]
