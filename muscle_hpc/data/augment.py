"""MD-MoCo's two views (three named recipes) and the task loaders' flip, over uint8 gray
images, straight into Z-scored float32.

Recipes (``data.views``; README, "Loaders" and the fidelity table):

- ``paper``: MUSCLE's: each view flipped (p ``flip_prob``) and rotated in ±``max_degrees``
  about its centre; no crop, blur or intensity change (``rotate_flip_normalize``).
- ``mococxr``: MoCo-CXR's (Sowrirajan et al. 2021, ``get_transform(training=True)``):
  flip, rotation in ±``max_degrees``, then a random square crop of side min(H, W), a
  translation along the long side; views are min(H, W) square (``affine_normalize``).
- ``mocov2``: MoCo v2's ``--aug-plus`` for one gray channel: RandomResizedCrop back to H×W,
  brightness → contrast → gamma with p 0.8, Gaussian blur with p 0.5, flip
  (``mocov2_normalize``).

Random parameters are a pure function of ``(seed, epoch, dataset, sample index, view,
stream)`` (a SplitMix64 hash), not of a generator's running state. A sample is therefore
augmented the same way whichever rank, batch or worker thread it lands on, which is what makes
a resumed run bit-identical to an uninterrupted one. Each recipe is one numba kernel that reads
uint8 and writes normalised float32, parallel over images and releasing the GIL, so it runs in
the loader's background thread beside training.

Why one module over ~450 lines: the recipes' parameter draws and the numba kernels that render
them must agree field by field; they change together.
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


def rotate_flip_normalize(src, src_of, degrees, flip, mean, std, out) -> None:
    """out[n, 0] = Z-score of src[src_of[n]] rotated by degrees[n] about its centre (zero fill),
    then mirrored in x where flip[n]: the ``paper`` recipe (and the task loaders' flip).

    The rotation is done as three shears (Paeth): x-shear by tan(θ/2), y-shear by -sin(θ),
    x-shear by tan(θ/2), each a linear interpolation with one weight per row (or column). The
    x-passes vectorise fully and the y-pass is one gather per pixel, about 5x cheaper here than
    a per-pixel bilinear warp, and within a gray level or two of it for the small angles used.
    θ = 0 is an exact copy. ``src``: (B, H, W) uint8; ``out``: (N, 1, H, W) float32.
    """
    threads = max(1, min(numba.get_num_threads(), len(out)))
    _rotate_flip_normalize(src, np.asarray(src_of, np.int64), np.asarray(degrees, np.float64),
                           np.asarray(flip, np.bool_), float(mean), float(std), out, threads)


@numba.njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _rotate_flip_normalize(src, src_of, degrees, flip, mean, std, out, threads):
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


# Named view recipes (``data.views``) ------------------------------------------------------------

RECIPES = ("paper", "mococxr", "mocov2")

# Streams of ``uniforms``. 0 and 1 are the paper's (flip, angle) and mean the same in every
# recipe; the others are new with the recipes.
FLIP, ANGLE = 0, 1
CROP_TOP, CROP_LEFT = 2, 3  # a crop's position (mococxr's RandomCrop, mocov2's accepted try)
JITTER, BRIGHTNESS, CONTRAST, GAMMA = 4, 5, 6, 7
BLUR, SIGMA = 8, 9
RRC_SCALE, RRC_RATIO, RRC_TRIES = 16, 32, 10  # RandomResizedCrop try t: streams 16 + t, 32 + t

# MoCo v2's --aug-plus (facebookresearch/moco, main_moco.py), for one gray channel.
MOCOV2_SCALE = (0.2, 1.0)
MOCOV2_RATIO = (3.0 / 4.0, 4.0 / 3.0)
MOCOV2_JITTER_P = 0.8
MOCOV2_JITTER = 0.4  # brightness, contrast, and gamma in saturation's place: factors 1 ± 0.4
MOCOV2_BLUR_P = 0.5
MOCOV2_SIGMA = (0.1, 2.0)  # pixels at MOCOV2_SIGMA_AT px, scaled by min(H, W) / MOCOV2_SIGMA_AT
MOCOV2_SIGMA_AT = 224


def view_size(recipe: str, width: int, height: int) -> tuple[int, int]:
    """(width, height) of the views ``recipe`` makes from width×height images."""
    if recipe not in RECIPES:
        raise ValueError(f"views must be one of {', '.join(RECIPES)}, not {recipe!r}")
    if recipe == "mococxr":
        side = min(width, height)
        return side, side
    return width, height


def random_int(u: np.ndarray, n) -> np.ndarray:
    """``torch.randint(0, n)`` from uniforms in [0, 1): floor(u·n), uniform over 0..n-1."""
    return np.minimum(np.floor(u * n), np.asarray(n) - 1).astype(np.int64)


def resized_crop_params(u_scale: np.ndarray, u_ratio: np.ndarray, u_top: np.ndarray,
                        u_left: np.ndarray, height: int, width: int,
                        scale: tuple[float, float] = MOCOV2_SCALE,
                        ratio: tuple[float, float] = MOCOV2_RATIO):
    """torchvision's ``RandomResizedCrop.get_params`` from uniforms: ``(top, left, h, w)``, one
    per column of ``u_scale``/``u_ratio`` (tries × N). Try t draws an area fraction uniform in
    ``scale`` and a log-uniform aspect ratio w/h in ``ratio``, rounds w = √(area·r),
    h = √(area/r) half to even (Python's ``round``), and is taken if it fits; the crop's
    position is then uniform over the integer offsets (``torch.randint``). After all tries fail:
    the centre crop of the image clamped to ``ratio`` (the whole image if its ratio is inside)."""
    n = u_top.shape[0]
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    h = np.zeros(n, np.int64)
    w = np.zeros(n, np.int64)
    done = np.zeros(n, np.bool_)
    for t in range(len(u_scale)):
        target = area * (scale[0] + (scale[1] - scale[0]) * u_scale[t])
        aspect = np.exp(log_lo + (log_hi - log_lo) * u_ratio[t])
        wt = np.rint(np.sqrt(target * aspect)).astype(np.int64)
        ht = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        ok = ~done & (wt > 0) & (wt <= width) & (ht > 0) & (ht <= height)
        w[ok], h[ok] = wt[ok], ht[ok]
        done |= ok
    top = random_int(u_top, height - h + 1)
    left = random_int(u_left, width - w + 1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    h[~done], w[~done] = fh, fw
    top[~done], left[~done] = (height - fh) // 2, (width - fw) // 2
    return top, left, h, w


def draw(recipe: str, seed: int, epoch: int, dataset: np.ndarray, index: np.ndarray, *,
         width: int, height: int, max_degrees: float = 10.0, flip_prob: float = 0.5,
         views=(0, 1)) -> dict[str, np.ndarray]:
    """The parameters of ``views`` of each image (dataset, index) of width×height, for
    ``render``: view 0 of every image, then view 1, ... Every value comes from ``uniforms``
    of its own stream, so it depends on (seed, epoch, dataset, index, view) alone."""
    view_size(recipe, width, height)
    parts = [_draw(recipe, seed, epoch, dataset, index, v, width, height, max_degrees,
                   flip_prob) for v in views]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _draw(recipe, seed, epoch, dataset, index, view, width, height, max_degrees, flip_prob):
    def u(stream):
        return uniforms(seed, epoch, dataset, index, view, stream)

    u_flip, u_angle = u(FLIP), u(ANGLE)
    flip = u_flip < flip_prob
    if recipe == "paper":
        return {"degrees": (2 * u_angle - 1) * max_degrees, "flip": flip}
    if recipe == "mococxr":
        # RandomHorizontalFlip, RandomRotation(max_degrees), RandomCrop(side)
        side = min(width, height)
        return {"flip": flip, "degrees": (2 * u_angle - 1) * max_degrees,
                "top": random_int(u(CROP_TOP), height - side + 1),
                "left": random_int(u(CROP_LEFT), width - side + 1)}
    top, left, h, w = resized_crop_params(
        np.stack([u(RRC_SCALE + t) for t in range(RRC_TRIES)]),
        np.stack([u(RRC_RATIO + t) for t in range(RRC_TRIES)]), u(CROP_TOP), u(CROP_LEFT),
        height, width)
    jitter = u(JITTER) < MOCOV2_JITTER_P

    def factor(stream):  # ColorJitter's uniform(1 - x, 1 + x), 1 where jitter is not applied
        return np.where(jitter, 1 + MOCOV2_JITTER * (2 * u(stream) - 1), 1.0)

    blur = u(BLUR) < MOCOV2_BLUR_P
    lo, hi = MOCOV2_SIGMA
    sigma = (lo + (hi - lo) * u(SIGMA)) * min(width, height) / MOCOV2_SIGMA_AT
    return {"top": top, "left": left, "crop_h": h, "crop_w": w, "jitter": jitter,
            "brightness": factor(BRIGHTNESS), "contrast": factor(CONTRAST),
            "gamma": factor(GAMMA), "sigma": np.where(blur, sigma, 0.0), "flip": flip}


def render(recipe: str, src, src_of, params: dict, mean: float, std: float, out) -> None:
    """out[n, 0] = view n of src[src_of[n]] by ``recipe`` with ``draw``'s ``params``,
    Z-scored. ``src``: (B, H, W) uint8; ``out``: (N, 1, h, w) float32, (w, h) = ``view_size``."""
    if recipe == "paper":
        rotate_flip_normalize(src, src_of, params["degrees"], params["flip"], mean, std, out)
    elif recipe == "mococxr":
        height, width = src.shape[1:]
        affine_normalize(src, src_of, mococxr_matrices(
            params["degrees"], params["flip"], params["top"], params["left"], width, height),
            mean, std, out)
    elif recipe == "mocov2":
        mocov2_normalize(src, src_of, params, mean, std, out)
    else:
        raise ValueError(f"views must be one of {', '.join(RECIPES)}, not {recipe!r}")


def mococxr_matrices(degrees, flip, top, left, width: int, height: int) -> np.ndarray:
    """(N, 6) inverse maps (a, b, c, d, e, f) for ``affine_normalize``: output pixel (x, y)
    reads the source at (a·x + b·y + c, d·x + e·y + f). The source is mirrored in x where
    ``flip``, rotated by ``degrees`` about its centre (torchvision's ``rotate``: counter-
    clockwise for positive angles, centre ((W - 1)/2, (H - 1)/2)), then cropped at
    (``top``, ``left``)."""
    t = np.deg2rad(np.asarray(degrees, np.float64))
    cos, sin = np.cos(t), np.sin(t)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    xc = np.asarray(left, np.float64) - cx  # rotated-image coordinates of the crop's corner,
    yc = np.asarray(top, np.float64) - cy   # about the centre
    a, b, c = cos, -sin, cos * xc - sin * yc + cx
    d, e, f = sin, cos, sin * xc + cos * yc + cy
    flip = np.asarray(flip, np.bool_)
    a, b, c = np.where(flip, -a, a), np.where(flip, -b, b), np.where(flip, width - 1 - c, c)
    return np.ascontiguousarray(np.stack([a, b, c, d, e, f], axis=1))


def affine_normalize(src, src_of, mats, mean, std, out) -> None:
    """out[n, 0](x, y) = Z-score of the bilinear sample of src[src_of[n]] at
    (a·x + b·y + c, d·x + e·y + f), ``mats[n]`` = (a, b, c, d, e, f); pixels outside the
    source count as 0 (``grid_sample``'s zeros padding, torchvision's ``rotate`` with no
    fill). One pass from uint8 to float32 per output pixel: crop, rotation and flip at once."""
    threads = max(1, min(numba.get_num_threads(), len(out)))
    _affine_normalize(src, np.asarray(src_of, np.int64), np.asarray(mats, np.float64),
                      float(mean), float(std), out, threads)


@numba.njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _affine_normalize(src, src_of, mats, mean, std, out, threads):
    n_out, _, h, w = out.shape
    sh, sw = src.shape[1], src.shape[2]
    inv, mu = np.float32(1.0 / std), np.float32(mean)
    one = np.float32(1.0)
    for t in numba.prange(threads):
        for n in range(t, n_out, threads):
            img = src[src_of[n]]
            a, b, c, d, e, f = mats[n, 0], mats[n, 1], mats[n, 2], mats[n, 3], mats[n, 4], \
                mats[n, 5]
            for y in range(h):
                row = out[n, 0, y]
                cx, cy = b * y + c, e * y + f
                for x in range(w):
                    fx, fy = a * x + cx, d * x + cy
                    x0, y0 = int(math.floor(fx)), int(math.floor(fy))
                    wx, wy = np.float32(fx - x0), np.float32(fy - y0)
                    if 0 <= x0 and x0 < sw - 1 and 0 <= y0 and y0 < sh - 1:
                        top = (one - wx) * np.float32(img[y0, x0]) + wx * np.float32(
                            img[y0, x0 + 1])
                        bot = (one - wx) * np.float32(img[y0 + 1, x0]) + wx * np.float32(
                            img[y0 + 1, x0 + 1])
                        v = (one - wy) * top + wy * bot
                    else:  # at the film's edge: neighbours outside count as 0
                        v = np.float32(0.0)
                        for yy, gy in ((y0, one - wy), (y0 + 1, wy)):
                            if 0 <= yy and yy < sh:
                                if 0 <= x0 and x0 < sw:
                                    v += gy * (one - wx) * np.float32(img[yy, x0])
                                if 0 <= x0 + 1 and x0 + 1 < sw:
                                    v += gy * wx * np.float32(img[yy, x0 + 1])
                    row[x] = (v - mu) * inv


def gaussian_kernels(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's ``gaussian_blur`` kernels for ``sigma`` (0: no blur): radius
    ceil(3σ) (kernel size 2·ceil(3σ) + 1) and the normalised 1-D weights, one row per σ
    (zero padded to the largest size)."""
    sigma = np.asarray(sigma, np.float64)
    radius = np.array([math.ceil(3 * s) if s > 0 else 0 for s in sigma], np.int64)
    weights = np.zeros((len(sigma), 2 * int(radius.max(initial=0)) + 1), np.float32)
    for n, (s, r) in enumerate(zip(sigma, radius)):
        if r:
            x = np.linspace(-r, r, 2 * r + 1)
            pdf = np.exp(-0.5 * (x / s) ** 2)
            weights[n, :2 * r + 1] = pdf / pdf.sum()
    return radius, weights


def mocov2_normalize(src, src_of, params: dict, mean, std, out) -> None:
    """The ``mocov2`` views, as torchvision computes them on float images in [0, 1] (×255):

    1. ``resized_crop`` of (top, left, crop_h, crop_w) to the output size, bilinear as
       ``interpolate(align_corners=False)`` (sources clamped to the crop; crops never exceed
       the output size, so this is an upsampling, for which antialiasing changes nothing);
    2. where ``jitter``: ``adjust_brightness`` (v·b, clipped), ``adjust_contrast`` (blend
       with the mean gray level of the brightened image, clipped), ``adjust_gamma``
       (255·(v/255)^γ, by table: ``GAMMA_TABLE``), in that order;
    3. where ``sigma`` > 0: ``gaussian_blur`` (kernel 2·ceil(3σ) + 1, reflect padding),
       separable, along rows then columns;
    4. ``hflip`` where ``flip`` (folded into step 1: every later step commutes with it).

    Views with neither jitter nor blur are written in one pass from uint8; the others take
    two (contrast needs the whole image's mean) or three (blur's column pass) through
    per-thread float scratch."""
    n = len(out)
    radius, weights = gaussian_kernels(params["sigma"])
    h, w = out.shape[2:]
    if len(radius) and radius.max() >= min(h, w):
        raise ValueError(f"blur sigma {params['sigma'].max():.2f} is too large for {w}x{h} "
                         f"views (reflect padding needs radius < size)")
    crops = np.stack([params["top"], params["left"], params["crop_h"], params["crop_w"]],
                     axis=1).astype(np.int64)
    factors = np.stack([params["brightness"], params["contrast"], params["gamma"]],
                       axis=1).astype(np.float32)
    threads = max(1, min(numba.get_num_threads(), n))
    _mocov2_normalize(src, np.asarray(src_of, np.int64), crops, np.asarray(params["flip"],
                      np.bool_), np.asarray(params["jitter"], np.bool_), factors, radius,
                      weights, float(mean), float(std), out, threads)


@numba.njit(nogil=True, cache=True)
def _reflect(i, n):
    """torch's ``reflect`` padding index (the edge pixel is not repeated)."""
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


# gamma by table: v -> 255·(v/255)^γ is tabulated at GAMMA_TABLE + 1 points evenly spaced in
# u = √(v/255) (as 255·u^2γ, smooth where v^γ bends most, near 0) and interpolated linearly:
# within 1e-3 gray level of pow everywhere (1e-4 at integer levels), at a fraction of its cost
GAMMA_TABLE = 4096


@numba.njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _mocov2_normalize(src, src_of, crops, flip, jitter, factors, radius, weights, mean, std, out,
                      threads):
    n_out, _, h, w = out.shape
    inv, mu = np.float32(1.0 / std), np.float32(mean)
    zero, one, half, white = np.float32(0.0), np.float32(1.0), np.float32(0.5), np.float32(255.0)
    r_max = (weights.shape[1] - 1) // 2
    nodes = np.float32(GAMMA_TABLE)
    for t in numba.prange(threads):
        # scratch once per thread: fresh large arrays per image would page-fault every time
        a = np.empty((h, w), np.float32)
        b = np.empty((h, w), np.float32)
        x0 = np.empty(w, np.int64)
        x1 = np.empty(w, np.int64)
        lx = np.empty(w, np.float32)
        rows = np.empty((2, w), np.float32)  # the two source rows, resized along x
        pad = np.empty(w + 2 * r_max, np.float32)
        acc = np.empty(w, np.float32)
        table = np.empty(GAMMA_TABLE + 2, np.float32)
        for n in range(t, n_out, threads):
            img = src[src_of[n]]
            top, left, ch, cw = crops[n, 0], crops[n, 1], crops[n, 2], crops[n, 3]
            jit, r = jitter[n], radius[n]
            direct = not jit and r == 0
            # 1. resized crop: column sources once per image (mirrored where flipped)
            scale_x = np.float32(cw / w)
            for x in range(w):
                xs = w - 1 - x if flip[n] else x
                s = max(scale_x * (np.float32(xs) + half) - half, zero)
                k = min(int(s), cw - 1)
                x0[x] = left + k
                x1[x] = left + k + (1 if k < cw - 1 else 0)
                lx[x] = min(max(s - np.float32(k), zero), one)
            scale_y = np.float32(ch / h)
            bright = factors[n, 0]
            total = 0.0
            held = (-1, -1)  # the crop rows now in rows[0], rows[1]
            for y in range(h):
                s = max(scale_y * (np.float32(y) + half) - half, zero)
                k = min(int(s), ch - 1)
                k1 = k + (1 if k < ch - 1 else 0)
                ly = min(max(s - np.float32(k), zero), one)
                if held[0] != k:
                    if held[1] == k:  # moving down one source row: reuse it
                        rows[0, :] = rows[1]
                    else:
                        src_row = img[top + k]
                        for x in range(w):
                            rows[0, x] = np.float32(src_row[x0[x]]) + lx[x] * (
                                np.float32(src_row[x1[x]]) - np.float32(src_row[x0[x]]))
                    src_row = img[top + k1]
                    for x in range(w):
                        rows[1, x] = np.float32(src_row[x0[x]]) + lx[x] * (
                            np.float32(src_row[x1[x]]) - np.float32(src_row[x0[x]]))
                    held = (k, k1)
                r0, r1 = rows[0], rows[1]
                if direct:
                    row = out[n, 0, y]
                    for x in range(w):
                        row[x] = (r0[x] + ly * (r1[x] - r0[x]) - mu) * inv
                    continue
                row = a[y]
                if jit:  # brightness, and the sum for contrast's mean
                    row_sum = zero
                    for x in range(w):
                        v = min((r0[x] + ly * (r1[x] - r0[x])) * bright, white)
                        row[x] = v
                        row_sum += v
                    total += row_sum
                else:
                    for x in range(w):
                        row[x] = r0[x] + ly * (r1[x] - r0[x])
            if direct:
                continue
            # 2. contrast (blend with the brightened image's mean) and gamma, row by row,
            # straight into the output or into the blur's row pass
            c, gamma = factors[n, 1], factors[n, 2]
            blend = np.float32((1.0 - c) * total / (h * w))
            curve = jit and gamma != one
            if curve:
                for i in range(GAMMA_TABLE + 1):
                    table[i] = white * (np.float32(i) / nodes) ** (np.float32(2.0) * gamma)
                table[GAMMA_TABLE + 1] = white
            kw = weights[n]
            k_mid = kw[r]
            for y in range(h):
                row = a[y]
                dst = out[n, 0, y] if r == 0 else pad[r:r + w]
                if curve:  # a vectorised pass to table positions, then the lookups
                    for x in range(w):
                        acc[x] = np.sqrt(min(max(c * row[x] + blend, zero), white) / white) * \
                            nodes
                    for x in range(w):
                        pos = acc[x]
                        i = int(pos)
                        v = table[i] + (pos - np.float32(i)) * (table[i + 1] - table[i])
                        dst[x] = (v - mu) * inv if r == 0 else v
                elif jit:
                    for x in range(w):
                        v = min(max(c * row[x] + blend, zero), white)
                        dst[x] = (v - mu) * inv if r == 0 else v
                else:
                    for x in range(w):
                        dst[x] = row[x]
                if r == 0:
                    continue
                # 3. Gaussian blur, reflect padding: this row into b, then columns b -> out;
                # the kernel is symmetric, so taps k and 2r - k share one multiply
                for q in range(r):
                    pad[r - 1 - q] = pad[r + _reflect(-1 - q, w)]
                    pad[r + w + q] = pad[r + _reflect(w + q, w)]
                dst = b[y]
                mid = pad[r:r + w]
                for x in range(w):
                    dst[x] = k_mid * mid[x]
                for k in range(r):
                    kk = kw[k]
                    lo, hi = pad[k:k + w], pad[2 * r - k:2 * r - k + w]
                    for x in range(w):
                        dst[x] += kk * (lo[x] + hi[x])
            if r == 0:
                continue
            for y in range(h):
                mid = b[y]
                for x in range(w):
                    acc[x] = k_mid * mid[x]
                for k in range(r):
                    kk = kw[k]
                    lo, hi = b[_reflect(y + k - r, h)], b[_reflect(y + r - k, h)]
                    for x in range(w):
                        acc[x] += kk * (lo[x] + hi[x])
                dst = out[n, 0, y]
                for x in range(w):
                    dst[x] = (acc[x] - mu) * inv
