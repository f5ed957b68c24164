"""The augmentation kernel and its keyed randomness."""

import cv2
import numpy as np
import pytest
import torch

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


def test_intensity_jitter_is_torchvisions_brightness_then_contrast():
    import torchvision.transforms.functional as TF

    rng = np.random.default_rng(0)
    src = rng.integers(60, 180, (3, 30, 50)).astype(np.uint8)
    b, c = np.array([0.8, 1.0, 1.2]), np.array([1.3, 0.6, 1.0])
    gain, offset = augment.intensity_jitter(np.zeros(3), (b - 0.6) / 0.8, (c - 0.6) / 0.8,
                                            src.mean(axis=(1, 2)), prob=1.0, brightness=0.4,
                                            contrast=0.4)
    out = np.empty((3, 1, 30, 50), np.float32)
    augment.rotate_flip_normalize(src, np.arange(3), np.zeros(3), np.zeros(3, bool), 0.0, 1.0,
                                  out, gain, offset)
    for n in range(3):
        img = torch.from_numpy(src[n][None].astype(np.float32) / 255)
        ref = TF.adjust_contrast(TF.adjust_brightness(img, b[n]), c[n])[0].numpy() * 255
        np.testing.assert_allclose(out[n, 0], ref, atol=1e-3)


def test_jitter_off_or_not_drawn_is_the_identity_and_clips_to_the_gray_range():
    u = np.array([0.9, 0.1])
    gain, offset = augment.intensity_jitter(np.array([0.5, 0.5]), u, u, np.full(2, 100.0),
                                            prob=0.4, brightness=0.4, contrast=0.4)
    assert (gain, offset) == (pytest.approx([1, 1]), pytest.approx([0, 0]))
    src = np.full((1, 8, 8), 200, np.uint8)
    out = np.empty((1, 1, 8, 8), np.float32)
    augment.rotate_flip_normalize(src, [0], [0.0], [False], 0.0, 1.0, out, [2.0], [10.0])
    assert (out == 255).all()
