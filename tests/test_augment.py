"""The view recipes' kernels against torchvision, and their keyed randomness."""

import math

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from muscle_hpc.data import augment


def _smooth(n=3, h=120, w=200):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(120 + 60 * np.sin(xx / 17 + i) * np.cos(yy / 11)).astype(np.uint8)
                     for i in range(n)])


def _run(src, degrees, flip, mean=0.0, std=1.0):
    out = np.empty((len(degrees), 1, *src.shape[1:]), np.float32)
    augment.rotate_flip_normalize(src, np.arange(len(degrees)) % len(src), np.array(degrees),
                                  np.array(flip), mean, std, out)
    return out[:, 0]


@pytest.mark.parametrize("deg", [-10.0, -3.3, 0.4, 4.0, 10.0])
def test_rotation_matches_bilinear_warp(deg):
    src = _smooth(1)
    h, w = src.shape[1:]
    got = _run(src, [deg], [False])[0]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), -deg, 1.0)
    ref = cv2.warpAffine(src[0].astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    diff = np.abs(got - ref)
    assert np.median(diff) < 0.5
    assert diff[20:-20, 20:-20].max() < 6  # interior: same picture, resampled differently
    if abs(deg) > 1:
        assert got[0, 0] == pytest.approx(0, abs=1e-3)  # black fill at the corners


def test_larger_angles_still_rotate():
    src = _smooth(1)
    h, w = src.shape[1:]
    got = _run(src, [30.0], [False])[0]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), -30.0, 1.0)
    ref = cv2.warpAffine(src[0].astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR)
    assert np.median(np.abs(got - ref)) < 1.0


def test_zero_angle_is_exact_and_flip_mirrors():
    src = _smooth(2)
    out = _run(src, [0.0, 0.0], [False, True], mean=122.786, std=18.390)
    expected = (src.astype(np.float32) - np.float32(122.786)) * np.float32(1 / 18.390)
    np.testing.assert_allclose(out[0], expected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[1], expected[1][:, ::-1], rtol=0, atol=1e-5)


def test_flip_after_rotation_is_the_mirror_image():
    src = _smooth(1)
    a, b = _run(src[[0, 0]], [7.0, 7.0], [False, True])
    np.testing.assert_array_equal(a[:, ::-1], b)


def test_keyed_uniforms_do_not_depend_on_batch_composition():
    ds, idx = np.array([0, 1, 2, 1]), np.array([5, 5, 9, 7])
    u = augment.uniforms(3, 2, ds, idx, view=0, stream=1)
    assert ((u >= 0) & (u < 1)).all()
    alone = [augment.uniforms(3, 2, ds[i:i + 1], idx[i:i + 1], 0, 1)[0] for i in range(4)]
    assert u.tolist() == alone
    assert len(set(u.tolist())) == 4
    for changed in (dict(seed=4), dict(epoch=3), dict(view=1), dict(stream=0)):
        args = dict(seed=3, epoch=2, view=0, stream=1) | changed
        other = augment.uniforms(args["seed"], args["epoch"], ds, idx, args["view"],
                                 args["stream"])
        assert not np.allclose(u, other)
    big = augment.uniforms(0, 0, np.zeros(20000, np.int64), np.arange(20000), 0, 0)
    assert abs(big.mean() - 0.5) < 0.01 and abs((big < 0.25).mean() - 0.25) < 0.01


def test_batch_stays_valid_while_the_next_one_is_in_use(flat_shards):
    import time

    from muscle_hpc.data import TwoViewLoader, pretrain_shards

    loader = TwoViewLoader(pretrain_shards(flat_shards, ["dark", "bright"]), 4, seed=9,
                           num_workers=1)
    reference = [q.clone() for q, _ in loader.epoch_batches(0)]
    it = loader.epoch_batches(0)
    first = next(it)[0]
    second = next(it)[0]
    time.sleep(0.5)  # let the producer run as far ahead as it may
    assert torch.equal(first, reference[0])
    assert torch.equal(second, reference[1])


# The recipes against torchvision ------------------------------------------------------------
# Ours·std + mean against 255·torchvision on float images in [0, 1]: the same arithmetic in
# float32, ordered differently (coordinates, blur sums, the contrast mean), so the outputs
# agree to a few 1e-4 gray levels, at the film's edges as inside it; gamma by table adds
# < 1e-3 (augment.GAMMA_TABLE). Tolerance: 0.01 of a gray level, 1/100 of the uint8 step.
GRAY_ATOL = 0.01


def _textured(n=3, h=48, w=80, seed=0):
    """Smooth structure, noise and a saturated patch (brightness must clip there)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    imgs = []
    for i in range(n):
        img = 120 + 70 * np.sin(xx / 7 + i) * np.cos(yy / 5) + rng.normal(0, 12, (h, w))
        img[h // 4:h // 2, w // 5:w // 3] = 250
        imgs.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(imgs)


def _tensor(img):
    return torch.from_numpy(img[None].astype(np.float32) / 255)


def _render(recipe, src, src_of, params):
    h, w = src.shape[1:]
    vw, vh = augment.view_size(recipe, w, h)
    out = np.empty((len(src_of), 1, vh, vw), np.float32)
    augment.render(recipe, src, np.asarray(src_of), params, MEAN, STD, out)
    return out[:, 0] * np.float32(STD) + np.float32(MEAN)  # back to gray levels


MEAN, STD = 122.786, 18.390


@pytest.mark.parametrize("portrait", [False, True])
def test_mococxr_is_torchvisions_flip_rotation_crop(portrait):
    src = _textured()
    if portrait:
        src = np.ascontiguousarray(src.transpose(0, 2, 1))
    h, w = src.shape[1:]
    side = min(h, w)
    along = max(h, w) - side  # the crop moves along the long side only
    params = {"degrees": np.array([-7.3, 0.0, 9.9, 4.0]),
              "flip": np.array([True, False, True, False]),
              "top": np.array([0, 0, 0, 0]), "left": np.array([3, along, 0, 17])}
    if portrait:
        params["top"], params["left"] = params["left"], params["top"]
    src_of = [0, 1, 2, 0]
    got = _render("mococxr", src, src_of, params)
    assert got.shape == (4, side, side)
    for n, k in enumerate(src_of):
        ref = _tensor(src[k])
        if params["flip"][n]:
            ref = TF.hflip(ref)
        ref = TF.rotate(ref, float(params["degrees"][n]), InterpolationMode.BILINEAR)
        ref = TF.crop(ref, int(params["top"][n]), int(params["left"][n]), side, side)
        diff = np.abs(got[n] - 255 * ref[0].numpy())
        assert diff.max() < GRAY_ATOL, (n, diff.max())
    # the zero fill outside the rotated film shows in a rotated view's corners
    assert (np.abs(got[2]) < 1e-3).any() and (np.abs(got[1]) > 1).all()


def test_mococxr_views_are_square_and_their_crops_translate():
    h, w = 24, 40
    ramp = np.broadcast_to((np.arange(w) * 6).astype(np.uint8), (h, w))[None].copy()
    lefts = np.arange(w - h + 1)
    n = len(lefts)
    got = _render("mococxr", ramp, np.zeros(n, np.int64),
                  {"degrees": np.zeros(n), "flip": np.zeros(n, bool),
                   "top": np.zeros(n, np.int64), "left": lefts})
    for k in lefts:
        np.testing.assert_allclose(got[k], ramp[0, :, k:k + h], atol=1e-3)  # exact translation
    p = augment.draw("mococxr", 0, 0, np.zeros(4000, np.int64), np.arange(4000), width=w,
                     height=h, max_degrees=10.0)
    assert augment.view_size("mococxr", w, h) == (h, h) and (p["top"] == 0).all()
    counts = np.bincount(p["left"], minlength=w - h + 1)  # RandomCrop: uniform offsets
    assert len(counts) == w - h + 1 and counts.min() > 0.7 * counts.mean()
    assert np.abs(p["degrees"]).max() <= 10 and np.abs(p["degrees"]).mean() == \
        pytest.approx(5, abs=0.3)


MOCOV2_CASES = {  # top, left, crop_h, crop_w, jitter, brightness, contrast, gamma, sigma, flip
    "crop only": (3, 5, 30, 41, False, 1, 1, 1, 0.0, False),
    "whole image, blur, flip": (0, 0, 48, 80, False, 1, 1, 1, 0.9, True),
    "saturating brightness, low contrast, gamma": (10, 20, 17, 29, True, 1.4, 0.6, 1.4, 0.0,
                                                   False),
    "dark, high contrast, gamma < 1, blur, flip": (0, 13, 48, 64, True, 0.6, 1.4, 0.6, 1.5,
                                                   True),
    "largest blur at this size, jitter": (7, 2, 40, 53, True, 1.3, 1.2, 1.0,
                                          2.0 * 48 / 224, False),
}


def test_mocov2_is_torchvisions_resized_crop_jitter_blur_flip():
    src = _textured()
    h, w = src.shape[1:]
    cols = list(zip(*MOCOV2_CASES.values()))
    names = ("top", "left", "crop_h", "crop_w", "jitter", "brightness", "contrast", "gamma",
             "sigma", "flip")
    params = {k: np.array(v) for k, v in zip(names, cols)}
    src_of = np.arange(len(cols[0])) % len(src)
    got = _render("mocov2", src, src_of, params)
    for n, case in enumerate(MOCOV2_CASES):
        top, left, ch, cw, jitter, b, c, g, sigma, flip = MOCOV2_CASES[case]
        ref = TF.resized_crop(_tensor(src[src_of[n]]), top, left, ch, cw, [h, w],
                              InterpolationMode.BILINEAR, antialias=False)
        # a crop never exceeds the output size: resizing it only upsamples, where
        # antialiasing changes nothing (so plain bilinear sampling is torchvision's default)
        aa = TF.resized_crop(_tensor(src[src_of[n]]), top, left, ch, cw, [h, w],
                             InterpolationMode.BILINEAR, antialias=True)
        assert (aa - ref).abs().max() < 1e-6
        if jitter:
            ref = TF.adjust_gamma(TF.adjust_contrast(TF.adjust_brightness(ref, b), c), g)
        if sigma:
            size = 2 * math.ceil(3 * sigma) + 1
            ref = TF.gaussian_blur(ref, [size, size], [sigma, sigma])
        if flip:
            ref = TF.hflip(ref)
        diff = np.abs(got[n] - 255 * ref[0].numpy())
        assert diff.max() < GRAY_ATOL, (case, diff.max())


class _Feed:
    """Stands in for torch's RNG inside torchvision's ``RandomResizedCrop.get_params``:
    serves the uniforms ``resized_crop_params`` reads, in the order get_params draws them."""

    def __init__(self, u_scale, u_ratio, u_top, u_left):
        self.u, self.pos = (u_scale, u_ratio, u_top, u_left), (0, 0)

    def empty(self, *size, **kwargs):
        return self

    def uniform_(self, lo, hi):  # try t: the scale's draw, then the ratio's
        calls, ints = self.pos
        self.pos = calls + 1, ints
        u = self.u[calls % 2][calls // 2]
        return torch.tensor([float(lo) + u * (float(hi) - float(lo))], dtype=torch.float64)

    def randint(self, lo, hi, size):  # the top, then the left
        calls, ints = self.pos
        self.pos = calls, ints + 1
        return torch.tensor([lo + math.floor(self.u[2 + ints] * (hi - lo))])


@pytest.mark.parametrize("height, width", [(500, 800), (40, 400), (400, 40), (64, 64)])
def test_resized_crop_draws_are_torchvisions_get_params(monkeypatch, height, width):
    """Fed the same uniforms, torchvision's own get_params picks the same crops: its 10 tries,
    area and log-ratio rule, rounding, position, and the centre-crop fallback."""
    rng = np.random.default_rng(height)
    n = 300
    u_scale, u_ratio = rng.random((10, n)), rng.random((10, n))
    # force the fallback for 20 crops: every try wants all the area at ratio 4/3
    u_scale[:, :20], u_ratio[:, :20] = 1 - 1e-12, 1 - 1e-12
    u_top, u_left = rng.random(n), rng.random(n)
    ours = np.stack(augment.resized_crop_params(u_scale, u_ratio, u_top, u_left, height, width),
                    axis=1)
    img = torch.empty(1, height, width)
    for k in range(n):
        feed = _Feed(u_scale[:, k], u_ratio[:, k], u_top[k], u_left[k])
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", feed.empty)
            m.setattr(torch, "randint", feed.randint)
            theirs = RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3])
        assert tuple(ours[k]) == theirs, k
    fallback = {(500, 800): (500, 667), (40, 400): (40, 53), (400, 40): (53, 40),
                (64, 64): (64, 64)}[(height, width)]
    assert (ours[:20, 2:] == fallback).all()


def test_mocov2_draws_follow_torchvisions_distributions():
    n, h, w = 20000, 500, 800
    p = augment.draw("mocov2", 1, 2, np.zeros(n, np.int64), np.arange(n), width=w, height=h)
    assert len(p["flip"]) == 2 * n  # two views each
    jitter, blur = p["jitter"], p["sigma"] > 0
    assert jitter.mean() == pytest.approx(0.8, abs=0.01)  # RandomApply(ColorJitter, p=0.8)
    assert blur.mean() == pytest.approx(0.5, abs=0.01)  # RandomApply(GaussianBlur, p=0.5)
    assert p["flip"].mean() == pytest.approx(0.5, abs=0.01)
    for k in ("brightness", "contrast", "gamma"):
        on = p[k][jitter]
        assert (p[k][~jitter] == 1).all() and 0.6 <= on.min() and on.max() <= 1.4
        assert on.mean() == pytest.approx(1, abs=0.01) and on.std() == pytest.approx(
            0.8 / math.sqrt(12), abs=0.01)
    sigma = p["sigma"][blur] * 224 / min(h, w)  # the draw at MoCo v2's 224 px
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0 and sigma.mean() == pytest.approx(
        1.05, abs=0.02)
    # crops: the same distribution as torchvision's own draws (its RNG, not ours)
    torch.manual_seed(0)
    img = torch.empty(1, h, w)
    theirs = np.array([RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3])
                       for _ in range(4000)])
    ours = np.stack([p["top"], p["left"], p["crop_h"], p["crop_w"]], axis=1)
    for a in (ours, theirs):
        assert ((a[:, :2] >= 0) & (a[:, :2] + a[:, 2:] <= (h, w))).all()
    for stat in (lambda a: a[:, 2] * a[:, 3] / (h * w), lambda a: np.log(a[:, 3] / a[:, 2]),
                 lambda a: (a[:, 1] + a[:, 3] / 2) / w):
        qs = [0.1, 0.25, 0.5, 0.75, 0.9]
        np.testing.assert_allclose(np.quantile(stat(ours), qs), np.quantile(stat(theirs), qs),
                                   atol=0.03)


def test_mocov2_gamma_is_torchvisions_at_every_gray_level():
    """Gamma goes through a table (augment.GAMMA_TABLE): every level from 0 to 255, and
    levels between them, against adjust_gamma at the ends of the range drawn."""
    levels = np.linspace(0, 255, 1021)
    src = np.round(levels).astype(np.uint8)[None, None].repeat(2, axis=1)  # 2 x 1021 ramp
    n, width = 4, src.shape[2]
    params = {"top": np.zeros(n, np.int64), "left": np.zeros(n, np.int64),
              "crop_h": np.full(n, 2), "crop_w": np.full(n, width - 3),  # resampled: in-between
              "jitter": np.ones(n, bool), "brightness": np.ones(n), "contrast": np.ones(n),
              "gamma": np.array([0.6, 0.8, 1.2, 1.4]), "sigma": np.zeros(n),
              "flip": np.zeros(n, bool)}
    got = _render("mocov2", src, np.zeros(n, np.int64), params)
    for k in range(n):
        ref = TF.resized_crop(_tensor(src[0]), 0, 0, 2, width - 3, [2, width],
                              InterpolationMode.BILINEAR, antialias=False)
        ref = 255 * TF.adjust_gamma(ref, params["gamma"][k])[0].numpy()
        assert np.abs(got[k] - ref).max() < GRAY_ATOL
