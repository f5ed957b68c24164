"""Drawing of synthetic radiographs: chests, limbs and hands.

The pictures only need to be *learnable*: each class must leave a visible, consistent trace
(pneumonia = diffuse bright patches in the lungs, TB = compact bright lesions, a fracture = a
dark gap across a bone, older hands = longer fused bones). Everything works on float32 canvases
in 0..255; small shapes are drawn on their bounding-box crop only, so a 512 px image costs a
few milliseconds. Every random choice comes from the ``rng`` passed in, so a seed fixes the
pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def finish(img: np.ndarray, rng: np.random.Generator, noise: float = 3.0) -> np.ndarray:
    """Soft edges and film grain, then uint8."""
    h, w = img.shape
    img = cv2.GaussianBlur(img, (0, 0), max(0.6, min(h, w) / 400))
    img += noise * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


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
    scale: float  # pixels per unit of u (half the body width)
    cx: float  # pixel column of the midline

    @property
    def lungs(self) -> np.ndarray:
        return self.right | self.left

    def px(self, u: float, v: float) -> tuple[float, float]:
        h = self.image.shape[0]
        return self.cx + u * self.scale, v * (h - 1)


def chest(h: int, w: int, rng: np.random.Generator, heart: float = 1.0,
          emphysema: bool = False) -> Chest:
    """A PA chest film: bright body, two dark lung fields cut by the heart, ribs, clavicles and
    spine. The returned lung masks are exactly the dark fields drawn."""
    u0, v = _grid(h, w)
    aspect = w / h
    dx, dy = rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.03)
    sx = rng.uniform(0.88, 1.0) * min(1.0, 1.15 / aspect)  # keep the torso chest-shaped
    u, vv = (u0 - dx) / sx, v - dy
    img = np.full((h, w), 12.0, np.float32)
    body = (np.abs(u) / 0.96) ** 4 + (np.abs(vv - 0.62) / 0.64) ** 4 < 1
    body |= (np.abs(u) < 0.2) & (vv < 0.2)
    img[body] = rng.uniform(135, 165)

    hx, hy = 0.14, 0.64
    ha, hb = 0.21 * heart, 0.15 * heart ** 0.6
    heart_in = ((u - hx) / ha) ** 2 + ((vv - hy) / hb) ** 2 < 1
    bottom = rng.uniform(0.76, 0.8) + (0.06 if emphysema else 0.0)
    dome = 0.02 if emphysema else 0.07
    lungs = []
    for side in (-1, 1):
        cx, ax = side * 0.42, 0.3 * rng.uniform(0.93, 1.05)
        top = 0.12 + rng.uniform(-0.015, 0.015)
        bot = bottom - (0.03 if side < 0 else 0.0)
        t = np.clip((vv - top) / (bot - top), 0, 1)
        lat = (u - cx) * side  # >0 towards the ribs
        half = ax * t ** 0.3
        inside = (vv > top) & (lat < half) & (-lat < 0.72 * half)
        inside &= vv < bot - dome * np.clip(1 - (lat / ax) ** 2, 0, 1)
        lungs.append(inside & ~heart_in)
    right, left = lungs
    lung = right | left

    # Lung fields: dark with vascular markings fading from the hila outwards.
    hila = np.minimum(np.hypot(u + 0.22, vv - 0.45), np.hypot(u - 0.22, vv - 0.45))
    marks = np.clip(smooth_noise(h, w, rng, 28), 0, None) * np.exp(-hila / 0.3) * 16
    lung_val = rng.uniform(45, 70) - (18 if emphysema else 0)
    img[lung] = lung_val + marks[lung]
    img[heart_in & body] += 15

    # Ribs: one phase trick draws every rib of both sides at once.
    x = np.abs(u)
    curve = vv - (0.30 * (x - 0.35) ** 2 - 0.04 + 0.05 * x)
    step, v0, nrib, thick = 0.072, 0.09, 9, 0.22
    r = (curve - v0) / step
    frac = r - np.floor(r)
    band = np.clip(1 - np.abs(frac - thick / 2) / (thick / 2), 0, 1)
    band *= (r > 0) & (r < nrib) & (x > 0.07) & (x < 0.9) & body
    img += band * np.where(lung, 32.0, 12.0)
    img[(np.abs(u) < 0.055) & body] += 22  # spine behind the mediastinum

    scale = sx * (w - 1) / 2
    ch = Chest(img, right, left, scale, (dx + 1) * (w - 1) / 2)
    for side in (-1, 1):  # clavicles
        capsule(img, ch.px(side * 0.08, 0.13 + dy), ch.px(side * 0.62, 0.09 + dy),
                0.018 * h, 28, mode="add")
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


def pneumonia(ch: Chest, rng) -> None:
    """Diffuse, patchy consolidation confined to the lungs."""
    h, w = ch.image.shape
    weight = cv2.GaussianBlur(ch.lungs.astype(np.float32), (0, 0), max(1.0, w / 100))
    patch = np.clip(0.75 + 0.35 * smooth_noise(h, w, rng, 12), 0.2, None)
    for _ in range(rng.integers(3, 6)):
        x, y = _lung_point(ch, rng)
        blob(ch.image, x, y, rng.uniform(0.07, 0.13) * w, rng.uniform(90, 120), weight * patch)


def tb_lesion(img, x, y, size, kind, rng, weight=None):
    """Compact TB lesion(s) of about ``size`` px centred at (x, y). kind 1 active: fluffy
    nodules, sometimes cavitated; 2 latent/obsolete: a few tiny dense calcified spots;
    3 pulmonary TB: a denser fibro-nodular cluster."""
    if kind == 2:
        for _ in range(rng.integers(1, 4)):
            ox, oy = rng.uniform(-0.25, 0.25, 2) * size
            blob(img, x + ox, y + oy, max(1.5, rng.uniform(0.12, 0.18) * size), 160, hard=True)
        return
    n = rng.integers(2, 5) if kind == 1 else rng.integers(3, 6)
    for _ in range(n):
        ox, oy = rng.uniform(-0.22, 0.22, 2) * size
        s = rng.uniform(0.09, 0.14) * size
        blob(img, x + ox, y + oy, s, rng.uniform(90, 120) if kind == 1 else 125, weight)
    if kind == 1 and rng.random() < 0.4:
        blob(img, x, y, 0.08 * size, -60)


def tb(ch: Chest, rng) -> None:
    """Active-looking TB in one or both upper zones (Shenzhen / Montgomery positives)."""
    w = ch.image.shape[1]
    for _ in range(rng.integers(1, 4)):
        x, y = _lung_point(ch, rng, upper=True)
        tb_lesion(ch.image, x, y, rng.uniform(0.12, 0.2) * w, 1, rng)


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
        _, vv = _grid(h, w)
        uu = (np.arange(w, dtype=np.float32)[None, :] - ch.cx) / ch.scale
        meniscus = level - 0.08 * h * np.abs(uu) * (uu * side > 0)
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
    spine at the back and the heart in front."""
    u, v = _grid(h, w)
    img = np.full((h, w), 12.0, np.float32)
    body = (np.abs(u) / 0.85) ** 4 + (np.abs(v - 0.6) / 0.62) ** 4 < 1
    img[body] = rng.uniform(135, 160)
    lung = ((u + 0.05) / 0.5) ** 2 + ((v - 0.48) / 0.32) ** 2 < 1
    heart = ((u + 0.35) / 0.25) ** 2 + ((v - 0.62) / 0.17) ** 2 < 1
    img[lung & ~heart] = rng.uniform(50, 70)
    for k in range(10):  # vertebrae
        y = (0.15 + 0.075 * k) * (h - 1)
        capsule(img, (0.76 * (w - 1), y), (0.86 * (w - 1), y), 0.025 * h, 190)
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
    s = rng.uniform(0.85, 1.0) * min(h, w)
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
    capsule(img, centre - across, centre + across, max(1.0, 0.12 * radius), 10, mode="set")


def limb(h: int, w: int, rng, part: str, fracture: bool) -> np.ndarray:
    """A MURA study image: soft tissue, the bones of ``part`` and, when ``fracture``, one long
    bone broken: a dark gap across it with the distal piece shifted sideways."""
    if part == "XR_HAND":
        return hand(h, w, rng, age=rng.uniform(200, 228), fracture=fracture)
    img = np.full((h, w), rng.uniform(5, 25), np.float32)
    f, s = _transform(h, w, rng)
    bones = LIMBS[part]
    for p0, p1, r in bones:
        capsule(img, f(p0), f(p1), 2.3 * r * s, rng.uniform(55, 70))
    broken = max(range(len(bones)), key=lambda i: np.hypot(*np.subtract(*bones[i][:2])))
    for i, (p0, p1, r) in enumerate(bones):
        a, b = np.array(f(p0)), np.array(f(p1))
        if not (fracture and i == broken):
            capsule(img, a, b, r * s, 150, cortex=60)
            continue
        d = b - a
        n = np.array([-d[1], d[0]]) / max(np.hypot(*d), 1e-6)
        t = rng.uniform(0.35, 0.65)
        gap = max(2.0, 0.02 * s) / max(np.hypot(*d), 1e-6)
        shift = n * r * s * rng.uniform(0.6, 1.0) * rng.choice((-1, 1))
        capsule(img, a, a + d * (t - gap), r * s, 150, cortex=60)
        capsule(img, a + d * (t + gap) + shift, b + shift, r * s, 150, cortex=60)
        fracture_line(img, a + d * t, d, r * s, rng)
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
    s = min(h, w * 1.25) * (0.72 + 0.25 * g)
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
            m = (p + q) / 2
            d = (q - p) / np.linalg.norm(q - p)
            shift = np.array([d[1], -d[0]]) * r * 1.0
            capsule(img, f(*p), f(*(m - d * 0.015)), r * s, 150, cortex=60)
            capsule(img, f(*(m + d * 0.015 + shift)), f(*(q + shift)), r * s, 150, cortex=60)
            a, b = np.array(f(*p)), np.array(f(*q))
            fracture_line(img, (a + b) / 2, b - a, r * s, rng)
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
