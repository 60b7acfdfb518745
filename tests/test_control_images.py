"""fluxion.control: Canny edge maps (a thin wrapper over cv2.Canny, as the reference's Canny encoder) and depth
maps given as images. cv2 is the oracle for the edges: what is tested is the input/output format handling and
that the thresholds reach cv2."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fluxion.control import canny, depth_image


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """A random picture with some structure (smooth gradients plus noise, a bright square)."""
    rng = np.random.default_rng(0)
    h, w = 48, 64
    x = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.3, 0.6]) + rng.integers(0, 90, (h, w, 3))
    x[10:30, 20:44] = 240
    return np.clip(x, 0, 255).astype(np.uint8)


def expected(rgb: np.ndarray, low=50, high=200) -> np.ndarray:
    return np.repeat(cv2.Canny(rgb, low, high)[..., None], 3, axis=-1)


def test_pil_rgb_matches_cv2(rgb):
    out = canny(Image.fromarray(rgb))
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (64, 48)
    got = np.asarray(out)
    assert np.array_equal(got, expected(rgb))
    assert set(np.unique(got)) == {0, 255} and 0.02 < (got > 0).mean() < 0.9  # some edges, not all


@pytest.mark.parametrize("low, high", [(10, 40), (100, 300), (0, 0)])
def test_thresholds_reach_cv2(rgb, low, high):
    got = np.asarray(canny(Image.fromarray(rgb), low, high))
    assert np.array_equal(got, expected(rgb, low, high))
    default = np.asarray(canny(Image.fromarray(rgb), low_threshold=low, high_threshold=high))
    assert np.array_equal(got, default)


def test_thresholds_change_the_edges(rgb):
    few, many = np.asarray(canny(Image.fromarray(rgb), 200, 400)), np.asarray(canny(Image.fromarray(rgb), 10, 30))
    assert (many > 0).sum() > (few > 0).sum()


def test_array_tensor_and_other_modes(rgb):
    want = expected(rgb)
    assert np.array_equal(np.asarray(canny(rgb)), want)  # uint8 [H, W, 3]
    assert np.array_equal(np.asarray(canny(rgb.astype(np.float32) / 255)), want)  # floats in [0, 1]
    assert np.array_equal(np.asarray(canny(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)), want)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 128, np.uint8)], axis=-1)
    assert np.array_equal(np.asarray(canny(Image.fromarray(rgba, "RGBA"))), want)  # alpha dropped
    assert np.array_equal(np.asarray(canny(rgba)), want)
    grey = rgb[..., 1]
    grey_rgb = np.repeat(grey[..., None], 3, axis=-1)
    assert np.array_equal(np.asarray(canny(Image.fromarray(grey, "L"))), expected(grey_rgb))  # made RGB first
    assert np.array_equal(np.asarray(canny(grey)), expected(grey_rgb))


@pytest.mark.parametrize("args, message", [
    ((-1, 200), "low_threshold must be a number >= 0"),
    ((50, float("nan")), "high_threshold must be a number >= 0"),
    ((True, 200), "low_threshold"),
    ((200, 50), "must not exceed"),
])
def test_bad_thresholds(rgb, args, message):
    with pytest.raises(ValueError, match=message):
        canny(rgb, *args)


@pytest.mark.parametrize("image, message", [
    ("edges.png", "PIL image, a numpy array or a torch tensor"),
    (np.zeros((4, 4, 2), np.uint8), "one image"),
    (np.zeros((2, 4, 4, 3), np.uint8), "one image"),
    (np.full((4, 4, 3), 2.0), r"\[0, 1\]"),
    (np.zeros((4, 4, 3), np.int64), "uint8 or float"),
])
def test_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        canny(image)


def test_depth_image():
    d8 = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = depth_image(d8)
    assert out.mode == "RGB" and out.size == (4, 3)
    assert np.array_equal(np.asarray(out), np.repeat(d8[..., None], 3, axis=-1))  # 8-bit kept
    depth = torch.linspace(2.0, 7.0, 12).reshape(1, 3, 4)  # float: scaled min..max to 0..255
    got = np.asarray(depth_image(depth))[..., 0]
    assert got.min() == 0 and got.max() == 255 and np.all(np.diff(got.reshape(-1).astype(int)) >= 0)
    assert np.array_equal(np.asarray(depth_image(Image.fromarray(d8))), np.asarray(out))
    assert not np.asarray(depth_image(np.ones((3, 4), np.float32))).any()  # flat map: all zero
    d16 = Image.fromarray((np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16))
    assert np.array_equal(np.asarray(depth_image(d16))[..., 0], np.round(np.arange(12).reshape(3, 4) / 11 * 255))
    with pytest.raises(ValueError, match="NaN"):
        depth_image(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="one map"):
        depth_image(np.zeros((2, 3, 4, 5)))
