"""Drawing of synthetic radiographs: chests, limbs and hands.

The pictures must be learnable *through anatomy only*. Each class leaves a local, visible
trace (pneumonia = consolidation of part of one lobe, TB = compact lesions, a fracture = a
broken, displaced and angulated bone, older hands = longer fused bones), while everything that
sets an image's gray-level histogram is drawn per image, independently of the label: the
acquisition (:class:`Film`: exposure, contrast, gamma, heel-effect gradient, collimation
borders, a burned-in L/R side marker, sharpness and noise) and the body's size, position and
tilt on the film. Every sample function draws its :class:`Film` first, then the anatomy, then
the finding, so a positive and a negative drawn from the same rng share film and body.

Everything works on float32 canvases in 0..255; small shapes are drawn on their bounding-box
crop only, so a 512 px image costs a few milliseconds. Every random choice comes from the
``rng`` passed in, so a seed fixes the pixels.

Why one module over ~450 lines: the drawing primitives and the bodies drawn with them are tuned
together (what makes a finding local and visible).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import cv2
import numpy as np

NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
                "Pleural_Thickening", "Hernia")


@lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """u in [-1, 1] left to right, v in [0, 1] top to bottom (read-only, shared)."""
    u = np.linspace(-1, 1, w, dtype=np.float32)[None, :].repeat(h, 0)
    v = np.linspace(0, 1, h, dtype=np.float32)[:, None].repeat(w, 1)
    u.flags.writeable = v.flags.writeable = False
    return u, v


@dataclass(frozen=True)
class Film:
    """How one film was taken: drawn by :func:`film` from the image's rng before anything of
    the label, so every class gets the same distribution of all of it."""

    gamma: float  # the film's characteristic curve, on the drawn densities in 0..1
    contrast: float  # gain around mid-gray
    exposure: float  # offset, gray levels
    heel: tuple[float, float]  # a linear gradient across x and y, gray levels edge to edge
    bands: tuple[float, ...]  # collimation at left, top, right, bottom: fraction of the side
    band_level: float  # the unexposed film under the collimator leaves: bright
    marker: str  # the side marker, "L" or "R" ("" for none)
    marker_at: tuple[int, int]  # (horizontal -1 image left / 1 right, vertical -1 top / 1 bottom)
    marker_size: float  # letter height, fraction of the short side
    marker_level: float
    blur: float  # soft-edge sigma, times the image's base sharpness
    noise: float  # grain, gray levels
    seed: int  # of the grain


def film(rng: np.random.Generator, pa_chest: bool = False) -> Film:
    """Draw a film's acquisition. Always the same number of draws. A chest's side marker sits
    on the side it names (a PA film: the patient's left is the image right); a limb's on a
    random side."""
    gamma = float(np.exp(rng.uniform(np.log(0.7), np.log(1.45))))
    contrast, exposure = rng.uniform(0.7, 1.15), rng.uniform(-30, 30)
    heel = tuple(float(x) for x in rng.uniform(-14, 14, 2))
    present, widths = rng.random(4) < 0.55, rng.uniform(0.03, 0.12, 4)
    bands = tuple(float(x) for x in np.where(present, widths, 0.0))
    band_level = rng.uniform(200, 248)
    marker = ("", "L", "R")[int(rng.choice(3, p=(0.15, 0.425, 0.425)))]
    side, vert = (int(x) for x in rng.choice((-1, 1), 2))
    if pa_chest and marker:
        side = 1 if marker == "L" else -1
    return Film(gamma, contrast, exposure, heel, bands, band_level, marker, (side, vert),
                rng.uniform(0.035, 0.06), rng.uniform(215, 252), rng.uniform(0.7, 1.6),
                rng.uniform(1.5, 8.0), int(rng.integers(2 ** 31)))


def _marker(h: int, w: int, f: Film, field: tuple[float, float, float, float]):
    """The marker letter as (row slice, column slice, coverage 0..1) in the ``field`` of view
    (x0, y0, x1, y1) at the film's corner, or None where it does not fit."""
    size = max(6.0, f.marker_size * min(h, w))
    scale = size / 22.0  # FONT_HERSHEY_SIMPLEX capitals are ~22 px high at scale 1
    thick = max(1, int(round(size / 7)))
    (tw, th), _ = cv2.getTextSize(f.marker, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    margin = 0.025 * min(h, w)
    x0, y0, x1, y1 = field
    x = int(round(x0 + margin if f.marker_at[0] < 0 else x1 - margin - tw))
    y = int(round(y0 + margin if f.marker_at[1] < 0 else y1 - margin - th))
    pad = thick + 1
    ya, yb, xa, xb = y - pad, y + th + pad, x - pad, x + tw + pad
    if xa < 0 or ya < 0 or xb > w or yb > h:
        return None
    m = np.zeros((yb - ya, xb - xa), np.uint8)
    cv2.putText(m, f.marker, (pad, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick,
                cv2.LINE_AA)
    return slice(ya, yb), slice(xa, xb), m.astype(np.float32) / 255


def _grain(h: int, w: int, seed: int) -> np.ndarray:
    """Zero-mean, unit-variance film grain (a sum of two uniform bytes: triangular, and four
    times faster to draw than normal deviates)."""
    b = np.frombuffer(np.random.default_rng(seed).bytes(2 * h * w), np.uint8).reshape(2, h, w)
    return (b[0].astype(np.float32) + b[1] - np.float32(255)) * np.float32(1 / 104.5)


def expose(img: np.ndarray, f: Film, clear: np.ndarray | None = None,
           margin: float = 0.02) -> np.ndarray:
    """Develop drawn densities (float32, 0..255) into the film ``f``: uint8.

    ``clear`` (bool, the image's shape) marks what the collimation and the marker must leave
    visible (the lung fields), so that no ground truth is hidden: a collimator leaf stops
    ``margin`` (of the short side) short of its bounding box, and a marker that would touch
    it goes to the other corner or is left out. It must not depend on the label."""
    h, w = img.shape
    img = cv2.GaussianBlur(img, (0, 0), f.blur * max(0.6, min(h, w) / 400))
    y = cv2.pow(np.clip(img, 0, 255) * np.float32(1 / 255), f.gamma)
    y *= np.float32(255 * f.contrast)
    y += np.float32(128 * (1 - f.contrast) + f.exposure)
    y += np.linspace(-0.5 * f.heel[0], 0.5 * f.heel[0], w, dtype=np.float32)[None, :]
    y += np.linspace(-0.5 * f.heel[1], 0.5 * f.heel[1], h, dtype=np.float32)[:, None]
    # collimation: bright bands at the edges, stopping short of what must stay visible
    left, top, right, bottom = (b * n for b, n in zip(f.bands, (w, h, w, h)))
    if clear is not None and clear.any():
        rows, cols = np.nonzero(clear.any(1))[0], np.nonzero(clear.any(0))[0]
        gap = margin * min(h, w)
        left, right = min(left, cols[0] - gap), min(right, w - 1 - cols[-1] - gap)
        top, bottom = min(top, rows[0] - gap), min(bottom, h - 1 - rows[-1] - gap)
    left, top, right, bottom = (max(0.0, float(b)) for b in (left, top, right, bottom))
    if f.marker:
        field = (left, top, w - right, h - bottom)
        m = _marker(h, w, f, field)
        if m is not None and clear is not None and clear[m[0], m[1]][m[2] > 0].any():
            m = _marker(h, w, replace(f, marker_at=(f.marker_at[0], -f.marker_at[1])), field)
            if m is not None and clear[m[0], m[1]][m[2] > 0].any():
                m = None
        if m is not None:
            rs, cs, cover = m
            y[rs, cs] += cover * np.maximum(np.float32(f.marker_level) - y[rs, cs], 0)
    level = np.float32(f.band_level)
    for width, axis, far in ((left, 1, False), (top, 0, False), (right, 1, True),
                             (bottom, 0, True)):
        if width <= 0:
            continue
        full = int(width)
        view = y if axis == 0 else y.T  # rows of ``view`` run across the band
        n = view.shape[0]
        under = slice(n - full, n) if far else slice(0, full)
        view[under] = level
        if full < n:  # the leaf's edge: one partly covered line
            edge = n - full - 1 if far else full
            a = np.float32(width - full)
            view[edge] += a * (level - view[edge])
    y += np.float32(f.noise) * _grain(h, w, f.seed)
    return np.clip(y, 0, 255).astype(np.uint8)


def finish(img: np.ndarray, rng: np.random.Generator, clear: np.ndarray | None = None
           ) -> np.ndarray:
    """:func:`expose` on a film drawn now (for pictures that carry no label)."""
    return expose(img, film(rng), clear)


def smooth_noise(h: int, w: int, rng, cells: int) -> np.ndarray:
    """Unit-variance-ish noise with about ``cells`` blobs across, whatever the image size."""
    small = rng.standard_normal((max(2, cells * h // w), cells), dtype=np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _crop(shape, x0, y0, x1, y1):
    h, w = shape
    xa, ya = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    xb, yb = min(int(np.ceil(x1)) + 1, w), min(int(np.ceil(y1)) + 1, h)
    if xa >= xb or ya >= yb:
        return None
    ys, xs = np.mgrid[ya:yb, xa:xb].astype(np.float32)
    return (slice(ya, yb), slice(xa, xb)), xs, ys


def blob(img, cx, cy, sigma, amp, weight=None, hard=False):
    """Add a Gaussian (``hard``: a flat disc of radius ``sigma``) at pixel (cx, cy);
    ``weight`` (same shape as img) confines it, e.g. to the lungs."""
    reach = sigma * (1.5 if hard else 3)
    c = _crop(img.shape, cx - reach, cy - reach, cx + reach, cy + reach)
    if c is None:
        return
    sl, xs, ys = c
    d2 = (xs - cx) ** 2 + (ys - cy) ** 2
    if hard:
        val = np.clip(sigma - np.sqrt(d2) + 0.5, 0, 1)
    else:
        val = np.exp(-d2 / (2 * sigma * sigma))
    if weight is not None:
        val = val * weight[sl]
    img[sl] += amp * val


def capsule(img, p0, p1, r, value, cortex=0.0, mode="max"):
    """A rounded bar from p0 to p1 (pixels) of radius r. ``cortex`` brightens the rim, as the
    dense outer shell of a bone does; ``mode`` "max" lets overlapping bones not add up, "set"
    paints over (a fracture line)."""
    (x0, y0), (x1, y1) = p0, p1
    c = _crop(img.shape, min(x0, x1) - r, min(y0, y1) - r, max(x0, x1) + r, max(y0, y1) + r)
    if c is None:
        return
    sl, xs, ys = c
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
    d = np.hypot(xs - (x0 + t * dx), ys - (y0 + t * dy))
    alpha = np.clip(r - d + 0.5, 0, 1)
    val = alpha * (value + cortex * np.clip(d / max(r, 1e-6), 0, 1) ** 2)
    if mode == "max":
        np.maximum(img[sl], val, out=img[sl])
    elif mode == "set":
        img[sl] = img[sl] * (1 - alpha) + val
    else:
        img[sl] += val


# --- chest -------------------------------------------------------------------------------------

@dataclass
class Chest:
    image: np.ndarray  # float32, 0..255
    right: np.ndarray  # patient's right lung (image left), bool
    left: np.ndarray  # patient's left lung (image right), bool
    u: np.ndarray  # body coordinates of each pixel: u -1..1 across the body, patient's right
    v: np.ndarray  # first; v 0..1 head to feet (the lungs span about 0.12..0.8)
    pose: tuple[float, ...]  # (xc, yc, kx, ky, cos, sin): body coordinates -> pixels
    body_level: float  # soft tissue's gray level as drawn
    lung_level: float  # aerated lung's

    @property
    def lungs(self) -> np.ndarray:
        return self.right | self.left

    @property
    def density(self) -> float:
        """Gray levels between aerated lung and soft tissue: what a fully consolidated lung
        adds, so findings keep their contrast whatever the film's levels."""
        return max(60.0, self.body_level - self.lung_level)

    def px(self, u: float, v: float) -> tuple[float, float]:
        return _pose_px(self.pose, u, v)


def _pose_px(pose, u: float, v: float) -> tuple[float, float]:
    """Body coordinates (u, v) -> pixel (x, y) under a chest's pose."""
    xc, yc, kx, ky, c, s = pose
    x, y = u * kx, (v - 0.45) * ky
    return xc + c * x - s * y, yc + s * x + c * y


def chest(h: int, w: int, rng: np.random.Generator, heart: float = 1.0,
          emphysema: bool = False) -> Chest:
    """A PA chest film: bright body, two dark lung fields cut by the heart, ribs, clavicles and
    spine. The body's size (70-100 % of the film), position (+-8 % across, +-5 % down) and tilt
    (+-5 deg) vary per image. The returned lung masks are exactly the dark fields drawn."""
    aspect = w / h
    size = rng.uniform(0.7, 1.0)
    sx = size * min(1.0, 1.15 / aspect) * rng.uniform(0.94, 1.06)  # keep the torso chest-shaped
    dx, dy = rng.uniform(-0.08, 0.08), rng.uniform(-0.05, 0.05)
    tilt = np.deg2rad(rng.uniform(-5, 5))
    xc, yc = (w - 1) / 2 * (1 + dx), (h - 1) * (0.45 + dy)
    kx, ky = sx * (w - 1) / 2, size * (h - 1)
    c, sn = float(np.cos(tilt)), float(np.sin(tilt))
    X = np.arange(w, dtype=np.float32)[None, :] - np.float32(xc)
    Y = np.arange(h, dtype=np.float32)[:, None] - np.float32(yc)
    u = (c * X + sn * Y) / np.float32(kx)
    vv = np.float32(0.45) + (c * Y - sn * X) / np.float32(ky)
    body_level = rng.uniform(135, 165)
    lung_level = rng.uniform(45, 70) - (18 if emphysema else 0)
    marking, rib = rng.uniform(8, 36), rng.uniform(20, 44)
    # soft tissue over both lower zones (breasts, pectoral muscles): none on half the films
    overlay = rng.uniform(0.1, 0.5) * (body_level - lung_level) if rng.random() < 0.5 else 0.0

    # Arithmetic on float masks rather than boolean indexing: a 512 px film in ~10 ms.
    au = np.abs(u)
    f32 = np.float32
    body = np.square(np.square(au / f32(0.96))) + np.square(np.square((vv - f32(0.62))
                                                                      / f32(0.64))) < 1
    body |= (au < 0.2) & (vv < 0.2)

    hx, hy = 0.14, 0.64
    heart *= rng.uniform(0.8, 1.3)  # normal hearts vary, as does the depth of inspiration
    ha, hb = 0.21 * heart, 0.15 * heart ** 0.6
    heart_in = np.square((u - f32(hx)) / f32(ha)) + np.square((vv - f32(hy)) / f32(hb)) < 1
    bottom = rng.uniform(0.68, 0.86) + (0.06 if emphysema else 0.0)
    dome = 0.02 if emphysema else 0.07
    noise = np.clip(smooth_noise(h, w, rng, 28), 0, None)
    img = f32(12) + body.astype(f32) * f32(body_level - 12)
    img += (heart_in & body).astype(f32) * f32(15)
    lungs = []
    for side in (-1, 1):  # each lung on the crop that holds it
        cx, ax = side * 0.42, 0.3 * rng.uniform(0.85, 1.1)
        top = 0.12 + rng.uniform(-0.015, 0.015)
        bot = bottom - (0.03 if side < 0 else 0.0)
        mask = np.zeros((h, w), bool)
        lungs.append(mask)
        corners = [_pose_px((xc, yc, kx, ky, c, sn), cx + side * du, dv)
                   for du in (-0.73 * ax, 1.01 * ax) for dv in (top, bot)]
        xs, ys = [p[0] for p in corners], [p[1] for p in corners]
        crop = _crop((h, w), min(xs) - 2, min(ys) - 2, max(xs) + 2, max(ys) + 2)
        if crop is None:
            continue
        sl = crop[0]
        uc, vc = u[sl], vv[sl]
        t = np.clip((vc - f32(top)) / f32(bot - top), 0, 1)
        lat = (uc - f32(cx)) * f32(side)  # >0 towards the ribs
        half = f32(ax) * cv2.pow(t, 0.3)
        inside = (vc > top) & (lat < half) & (-lat < f32(0.72) * half)
        inside &= vc < f32(bot) - f32(dome) * np.clip(1 - np.square(lat / f32(ax)), 0, 1)
        inside &= ~heart_in[sl]
        mask[sl] = inside
        # Lung field: dark with vascular markings fading from the hilum outwards.
        hilum = cv2.magnitude(uc - f32(side * 0.22), vc - f32(0.45))
        marks = noise[sl] * cv2.exp(hilum * f32(-1 / 0.3))
        img[sl] += inside.astype(f32) * (f32(lung_level - body_level) + f32(marking) * marks)
    right, left = lungs
    fl = (right | left).astype(f32)
    if overlay:
        shade = np.minimum(cv2.magnitude((au - f32(0.47)) / f32(0.3), (vv - f32(0.7))
                                         / f32(0.2)), 1)
        img += f32(overlay) * (1 - np.square(shade)) * body.astype(f32)

    # Ribs: one phase trick draws every rib of both sides at once.
    curve = vv - (f32(0.30) * np.square(au - f32(0.35)) - f32(0.04) + f32(0.05) * au)
    step, v0, nrib, thick = 0.072, 0.09, 9, 0.22
    r = (curve - f32(v0)) / f32(step)
    frac = r - np.floor(r)
    band = np.maximum(1 - np.abs(frac - f32(thick / 2)) / f32(thick / 2), 0)
    band *= ((r > 0) & (r < nrib) & (au > 0.07) & (au < 0.9) & body).astype(f32)
    img += band * (f32(12) + f32(rib - 12) * fl)
    img += ((au < 0.055) & body).astype(f32) * f32(22)  # spine behind the mediastinum

    ch = Chest(img, right, left, u, vv, (xc, yc, kx, ky, c, sn), body_level, lung_level)
    for side in (-1, 1):  # clavicles
        capsule(img, ch.px(side * 0.08, 0.13), ch.px(side * 0.62, 0.09), 0.018 * size * h, 28,
                mode="add")
    return ch


def _lung_point(ch: Chest, rng, side=None, upper=False) -> tuple[float, float]:
    """A random pixel inside a lung (upper two thirds when ``upper``)."""
    mask = ch.lungs if side is None else (ch.right if side < 0 else ch.left)
    ys, xs = np.nonzero(mask)
    if upper and len(ys):
        keep = ys < np.percentile(ys, 60)
        ys, xs = ys[keep], xs[keep]
    i = rng.integers(len(ys))
    return float(xs[i]), float(ys[i])


# Lobes as bands of a lung's height: the right lung has three, the left two.
LOBES = {-1: ((0.0, 0.42), (0.38, 0.66), (0.62, 1.0)), 1: ((0.0, 0.52), (0.48, 1.0))}


def pneumonia(ch: Chest, rng) -> None:
    """Lobar pneumonia: part of one lobe of one lung consolidates, an irregular patch nearly as
    dense as soft tissue, with a mottled texture and a soft edge; the rest of the film is
    untouched."""
    h, w = ch.image.shape
    side = int(rng.choice((-1, 1)))
    lung = ch.right if side < 0 else ch.left
    rows = np.nonzero(lung.any(1))[0]
    cols = np.nonzero(lung.any(0))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    lobes = LOBES[side]
    z0, z1 = lobes[int(rng.integers(len(lobes)))]
    ya, yb = y0 + z0 * (y1 - y0), y0 + z1 * (y1 - y0)
    ys, xs = np.nonzero(lung[int(ya):int(np.ceil(yb))])
    i = int(rng.integers(len(ys)))
    cx, cy = float(xs[i]), float(ys[i]) + int(ya)
    rx = rng.uniform(0.4, 0.6) * (x1 - x0)
    ry = rng.uniform(0.7, 1.0) * (yb - ya)
    density = rng.uniform(0.75, 1.0) * ch.density
    edge = rng.normal(0, 1, (6, 6)).astype(np.float32)
    mottle = rng.normal(0, 1, (12, 12)).astype(np.float32)
    blur = max(1.0, 0.012 * w)
    pad = int(3 * blur) + 1
    c = _crop((h, w), cx - rx - pad, max(ya, cy - ry) - pad, cx + rx + pad,
              min(yb, cy + ry) + pad)
    if c is None:
        return
    sl, xx, yy = c
    ch_, cw = xx.shape
    field = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    field += 0.35 * cv2.resize(edge, (cw, ch_), interpolation=cv2.INTER_CUBIC)
    region = ((field < 1) & (yy >= ya) & (yy < yb) & lung[sl]).astype(np.float32)
    weight = cv2.GaussianBlur(region, (0, 0), blur) * lung[sl]
    texture = 1 + 0.18 * cv2.resize(mottle, (cw, ch_), interpolation=cv2.INTER_CUBIC)
    ch.image[sl] += density * weight * texture


def tb_lesion(img, x, y, size, kind, rng, weight=None, density=100.0):
    """Compact TB lesion(s) of about ``size`` px centred at (x, y), as dense as ``density``
    gray levels above aerated lung. kind 1 active: fluffy nodules, sometimes cavitated;
    2 latent/obsolete: a few tiny dense calcified spots; 3 pulmonary TB: a denser
    fibro-nodular cluster."""
    if kind == 2:
        for _ in range(rng.integers(1, 4)):
            ox, oy = rng.uniform(-0.25, 0.25, 2) * size
            blob(img, x + ox, y + oy, max(1.5, rng.uniform(0.12, 0.18) * size), 1.3 * density,
                 weight, hard=True)
        return
    n = rng.integers(2, 5) if kind == 1 else rng.integers(3, 6)
    for _ in range(n):
        ox, oy = rng.uniform(-0.22, 0.22, 2) * size
        s = rng.uniform(0.09, 0.14) * size
        blob(img, x + ox, y + oy, s, (rng.uniform(0.7, 1.0) if kind == 1 else 0.9) * density,
             weight)
    if kind == 1 and rng.random() < 0.4:
        blob(img, x, y, 0.08 * size, -0.5 * density, weight)


def tb(ch: Chest, rng) -> None:
    """Active-looking TB in one or both upper zones (Shenzhen / Montgomery positives), in the
    lung parenchyma only."""
    w = ch.image.shape[1]
    weight = ch.lungs.astype(np.float32)
    for _ in range(rng.integers(1, 4)):
        x, y = _lung_point(ch, rng, upper=True)
        tb_lesion(ch.image, x, y, rng.uniform(0.12, 0.2) * w, 1, rng, weight, ch.density)


def nih_finding(ch: Chest, name: str, rng) -> None:
    """One of the 14 ChestX-ray14 findings as a visibly distinct pattern (Cardiomegaly and
    Emphysema are shape changes passed to :func:`chest` instead)."""
    img, (h, w) = ch.image, ch.image.shape
    side = int(rng.choice((-1, 1)))
    lung = ch.right if side < 0 else ch.left
    ys, xs = np.nonzero(lung)
    if not len(ys):
        return
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    if name == "Effusion":  # fluid fills the costophrenic angle: blunted, bright base
        level = y1 - rng.uniform(0.25, 0.4) * (y1 - y0)
        meniscus = level - 0.08 * h * np.abs(ch.u) * (ch.u * side > 0)
        fluid = lung & (np.arange(h)[:, None] > meniscus)
        img[fluid] = 150
    elif name == "Atelectasis":  # a horizontal plate of collapsed lung
        y = rng.uniform(y0 + 0.55 * (y1 - y0), y0 + 0.8 * (y1 - y0))
        capsule(img, (x0 + 0.1 * (x1 - x0), y), (x1 - 0.1 * (x1 - x0), y + 0.03 * h),
                0.015 * h, 70, mode="add")
    elif name == "Infiltration":
        x, y = _lung_point(ch, rng, side)
        blob(img, x, y, 0.12 * w, 35, lung.astype(np.float32))
    elif name == "Mass":
        x, y = _lung_point(ch, rng, side)
        blob(img, x, y, rng.uniform(0.06, 0.08) * w, 85, hard=True)
    elif name == "Nodule":
        x, y = _lung_point(ch, rng, side)
        blob(img, x, y, rng.uniform(0.015, 0.025) * w, 95, hard=True)
    elif name == "Pneumonia":
        x, y = _lung_point(ch, rng, side)
        blob(img, x, y, 0.09 * w, 65, lung.astype(np.float32))
    elif name == "Pneumothorax":  # collapsed lung edge: a dark rim without markings
        cx = (x0 + x1) / 2
        far = (np.arange(w)[None, :] - cx) * side > 0.15 * (x1 - x0)
        img[lung & far] -= 35
    elif name == "Consolidation":
        ym = (y0 + y1) / 2
        zone = lung & ((np.arange(h)[:, None] < ym) if rng.random() < 0.5
                       else (np.arange(h)[:, None] >= ym))
        img[zone] += 60
    elif name == "Edema":  # bilateral perihilar "bat wing" haze
        weight = ch.lungs.astype(np.float32)
        for s in (-1, 1):
            x, y = ch.px(s * 0.25, 0.47)
            blob(img, x, y, 0.1 * w, 45, weight)
    elif name == "Fibrosis":  # reticular net in the lower zones
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        period = max(3.0, w / 40)
        net = (np.abs(np.sin(np.pi * xx / period)) < 0.25) | (np.abs(np.sin(np.pi * yy / period))
                                                            < 0.25)
        img[ch.lungs & net & (yy > y0 + 0.45 * (y1 - y0))] += 40
    elif name == "Pleural_Thickening":  # a bright rind along the outer lung edge
        k = max(1, int(0.025 * w)) * 2 + 1
        inner = cv2.erode(lung.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
        img[lung & ~inner] += 65
    elif name == "Hernia":  # hiatal hernia: air bubble with fluid level behind the heart
        x, y = ch.px(0.05, 0.7)
        blob(img, x, y, 0.06 * w, -70, hard=True)
        capsule(img, (x - 0.05 * w, y + 0.02 * h), (x + 0.05 * w, y + 0.02 * h), 0.02 * h, 150)


def lateral(h: int, w: int, rng) -> np.ndarray:
    """A lateral chest view (Indiana pairs each frontal with one): one big lung field, the
    spine at the back and the heart in front; size and position vary like the frontal's."""
    u0, v0 = _grid(h, w)
    size = rng.uniform(0.8, 1.0)
    dx, dy = rng.uniform(-0.06, 0.06), rng.uniform(-0.04, 0.04)
    u, v = (u0 - dx) / size, (v0 - 0.5 - dy) / size + 0.5
    img = np.full((h, w), 12.0, np.float32)
    body = (np.abs(u) / 0.85) ** 4 + (np.abs(v - 0.6) / 0.62) ** 4 < 1
    img[body] = rng.uniform(135, 160)
    lung = ((u + 0.05) / 0.5) ** 2 + ((v - 0.48) / 0.32) ** 2 < 1
    heart = ((u + 0.35) / 0.25) ** 2 + ((v - 0.62) / 0.17) ** 2 < 1
    img[lung & ~heart] = rng.uniform(50, 70)

    def px(uu, vv):
        return (uu * size + dx + 1) / 2 * (w - 1), ((vv - 0.5) * size + 0.5 + dy) * (h - 1)
    for k in range(10):  # vertebrae
        vk = 0.15 + 0.075 * k
        capsule(img, px(0.52, vk), px(0.72, vk), 0.025 * size * h, 190)
    return img


# --- bones -------------------------------------------------------------------------------------

Bone = tuple[tuple[float, float], tuple[float, float], float]  # (p0, p1, radius), unit square

LIMBS: dict[str, list[Bone]] = {
    "XR_HUMERUS": [((0.5, 0.06), (0.5, 0.94), 0.075), ((0.5, 0.06), (0.5, 0.08), 0.11)],
    "XR_FOREARM": [((0.42, 0.05), (0.45, 0.95), 0.042), ((0.59, 0.05), (0.56, 0.95), 0.036)],
    "XR_ELBOW": [((0.5, 0.0), (0.5, 0.47), 0.075), ((0.5, 0.47), (0.5, 0.48), 0.11),
                 ((0.44, 0.56), (0.3, 1.0), 0.045), ((0.58, 0.55), (0.47, 1.0), 0.04)],
    "XR_WRIST": [((0.42, 1.0), (0.43, 0.6), 0.06), ((0.6, 1.0), (0.58, 0.62), 0.04),
                 ((0.35, 0.42), (0.3, 0.08), 0.03), ((0.45, 0.42), (0.44, 0.05), 0.03),
                 ((0.55, 0.42), (0.56, 0.05), 0.028), ((0.64, 0.43), (0.68, 0.1), 0.026)],
    "XR_FINGER": [((0.5, 0.98), (0.5, 0.68), 0.07), ((0.5, 0.64), (0.5, 0.4), 0.06),
                  ((0.5, 0.36), (0.5, 0.2), 0.052), ((0.5, 0.16), (0.5, 0.05), 0.045)],
    "XR_SHOULDER": [((0.62, 0.55), (0.68, 1.0), 0.08), ((0.55, 0.45), (0.56, 0.46), 0.16),
                    ((0.28, 0.2), (0.34, 0.85), 0.05), ((0.0, 0.22), (0.62, 0.18), 0.04)],
}
CARPALS = [(0.4, 0.5), (0.5, 0.49), (0.6, 0.5), (0.45, 0.56), (0.55, 0.56), (0.35, 0.56)]


def _transform(h, w, rng):
    """Random rotation / scale / shift mapping the unit square into pixels."""
    ang = np.deg2rad(rng.uniform(-20, 20))
    s = rng.uniform(0.75, 1.0) * min(h, w)
    c, si = np.cos(ang), np.sin(ang)
    ox, oy = w / 2 + rng.uniform(-0.05, 0.05) * w, h / 2 + rng.uniform(-0.05, 0.05) * h

    def f(p):
        x, y = (p[0] - 0.5) * s * (w / min(h, w)) ** 0.3, (p[1] - 0.5) * s * (h / min(h, w))
        return ox + c * x - si * y, oy + si * x + c * y
    return f, s


def fracture_line(img, centre, axis, radius, rng) -> None:
    """The lucent line of a fracture: darker than soft tissue, oblique to the bone's axis
    (joint spaces are square to it), running a little past the cortex."""
    axis = np.asarray(axis, float) / max(np.hypot(*axis), 1e-6)
    ang = np.deg2rad(rng.uniform(35, 60) * rng.choice((-1, 1)))
    c, s = np.cos(ang), np.sin(ang)
    across = np.array([-axis[1] * c - axis[0] * s, axis[0] * c - axis[1] * s]) * 1.4 * radius
    capsule(img, centre - across, centre + across, max(1.0, 0.15 * radius), 10, mode="set")


def broken_bone(img, a, b, radius, rng, t=None) -> None:
    """A long bone from ``a`` to ``b`` (pixels) broken at ``t`` of its length: a gap, the
    distal piece displaced sideways by 0.7-1.3 radii and angulated 6-16 degrees, and the
    lucent fracture line."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = b - a
    length = max(np.hypot(*d), 1e-6)
    n = np.array([-d[1], d[0]]) / length
    t = rng.uniform(0.35, 0.65) if t is None else t
    half_gap = max(1.5, rng.uniform(0.6, 0.9) * radius) / length
    shift = n * radius * rng.uniform(0.7, 1.3) * rng.choice((-1, 1))
    ang = np.deg2rad(rng.uniform(6, 16) * rng.choice((-1, 1)))
    c, s = np.cos(ang), np.sin(ang)
    p = a + d * t

    def turn(q):  # angulate the distal piece about the break
        x, y = q - p
        return p + np.array([c * x - s * y, s * x + c * y]) + shift
    capsule(img, a, a + d * (t - half_gap), radius, 150, cortex=60)
    capsule(img, turn(a + d * (t + half_gap)), turn(b), radius, 150, cortex=60)
    fracture_line(img, p, d, radius, rng)


def limb(h: int, w: int, rng, part: str, fracture: bool) -> np.ndarray:
    """A MURA study image: soft tissue, the bones of ``part`` and, when ``fracture``, one long
    bone broken (:func:`broken_bone`)."""
    if part == "XR_HAND":
        return hand(h, w, rng, age=rng.uniform(200, 228), fracture=fracture)
    img = np.full((h, w), rng.uniform(5, 25), np.float32)
    f, s = _transform(h, w, rng)
    bones = LIMBS[part]
    for p0, p1, r in bones:
        capsule(img, f(p0), f(p1), 2.3 * r * s, rng.uniform(55, 70))
    broken = max(range(len(bones)), key=lambda i: np.hypot(*np.subtract(*bones[i][:2])))
    for i, (p0, p1, r) in enumerate(bones):
        if fracture and i == broken:
            broken_bone(img, f(p0), f(p1), r * s, rng)
        else:
            capsule(img, f(p0), f(p1), r * s, 150, cortex=60)
    if part == "XR_WRIST":
        for p in CARPALS:
            blob(img, *f(p), 0.035 * s, 0, hard=True)
            capsule(img, f(p), f(p), 0.035 * s, 150, cortex=40)
    return img


FINGERS = (  # angle (deg from vertical), metacarpal, proximal, middle, distal length
    (-48, 0.14, 0.11, 0.0, 0.08), (-12, 0.22, 0.14, 0.09, 0.06), (0, 0.21, 0.15, 0.1, 0.065),
    (11, 0.19, 0.14, 0.09, 0.06), (23, 0.17, 0.11, 0.07, 0.055))
BASES = ((-0.12, 0.28), (-0.07, 0.3), (0.0, 0.31), (0.065, 0.3), (0.12, 0.28))


def hand(h: int, w: int, rng, age: float, fracture: bool = False) -> np.ndarray:
    """A hand radiograph (bone age / MURA hand). With age (months, 0..228) the bones lengthen
    and thicken, the carpal bones appear one by one and the growth-plate gaps between
    epiphyses and shafts narrow until they close (~190 months)."""
    g = float(np.clip(age / 228, 0, 1))
    img = np.full((h, w), rng.uniform(5, 20), np.float32)
    s = min(h, w * 1.25) * (0.72 + 0.25 * g) * rng.uniform(0.92, 1.04)
    ang = np.deg2rad(rng.uniform(-10, 10))
    ox, oy = w / 2 + rng.uniform(-0.04, 0.04) * w, h * rng.uniform(0.9, 0.96)

    def f(x, y):  # hand coordinates: x right, y up from the wrist, unit = s
        return ox + s * (x * np.cos(ang) + y * np.sin(ang)), oy - s * (y * np.cos(ang)
                                                                       - x * np.sin(ang))
    thick = 0.6 + 0.4 * g
    gap = 0.018 * max(0.0, 1 - age / 190)
    tissue = rng.uniform(55, 70)
    capsule(img, f(0, 0.05), f(0, 0.3), 0.15 * s, tissue)  # palm
    bones = []
    for (deg, *lengths), (bx, by) in zip(FINGERS, BASES):
        d = np.array([np.sin(np.deg2rad(deg)), np.cos(np.deg2rad(deg))])
        start = p = np.array([bx, by]) - d * lengths[0] * 0.6
        radius = 0.018 * thick * (1.3 if deg == 0 else 1.1 if deg != -48 else 1.2)
        for k, length in enumerate(lengths):
            if length == 0:
                continue
            q = p + d * length * (0.65 + 0.35 * g)
            bones.append((p, q, radius * (1.0 - 0.12 * k), k > 0))
            p = q + d * 0.012
        capsule(img, f(*start), f(*p), 2.6 * radius * s, tissue)
    pieces = []
    for p, q, r, has_epiphysis in bones:
        if has_epiphysis and gap > 0:  # epiphysis cap separated by the growth plate
            d = (q - p) / np.linalg.norm(q - p)
            cap = p + d * 0.02
            pieces += [(p, cap, r * 1.05), (cap + d * gap, q, r)]
        else:
            pieces.append((p, q, r))
    # a fracture goes through one of the three longest shafts (metacarpals)
    longest = sorted(range(len(pieces)), key=lambda i: -np.linalg.norm(pieces[i][1] - pieces[i][0]))
    broken = longest[rng.integers(3)] if fracture else -1
    for i, (p, q, r) in enumerate(pieces):
        if i == broken:
            broken_bone(img, f(*p), f(*q), r * s, rng, t=rng.uniform(0.4, 0.6))
        else:
            capsule(img, f(*p), f(*q), r * s, 150, cortex=60)
    # radius and ulna with distal epiphyses
    for x, r in ((-0.06, 0.04), (0.08, 0.028)):
        top = 0.1 + 0.01 * g
        capsule(img, f(x, -0.4), f(x, top - gap - 0.03), r * thick * s, 150, cortex=60)
        capsule(img, f(x, top - 0.02), f(x, top), r * thick * s * 1.05, 150, cortex=40)
    n_carpals = int(np.clip(round(8 * age / 150), 0, 8))
    spots = [(-0.08, 0.17), (-0.02, 0.16), (0.05, 0.17), (0.1, 0.19), (-0.06, 0.22),
             (0.0, 0.22), (0.06, 0.23), (-0.12, 0.21)]
    for x, y in spots[:n_carpals]:
        capsule(img, f(x, y), f(x, y), (0.012 + 0.016 * g) * s, 150, cortex=40)
    return img
