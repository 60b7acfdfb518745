"""Control images for FluxControlPipeline (FLUX.1 Canny / Depth [dev]).

- `canny(image, low_threshold=50, high_threshold=200)`: OpenCV's Canny edges of the RGB image, as the reference
  (BFL's `CannyImageEncoder`: `cv2.Canny` on the uint8 RGB array, thresholds 50 / 200), white edges on black,
  returned as an RGB PIL image.
- `depth_image(depth)`: a depth map computed elsewhere (Depth Anything and the like; fluxion ships no depth
  estimator) as the RGB PIL image the pipeline takes: 8-bit maps are kept, float maps are scaled min..max to
  0..255 (as diffusers' documented depth preprocessor does), one channel is repeated to three.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch
from PIL import Image


def _as_uint8(image, name: str) -> np.ndarray:
    """[H, W] or [H, W, C] uint8 from a PIL image, a numpy array ([0, 255] integers or [0, 1] floats) or a
    tensor ([C, H, W] / [H, W], [0, 1] floats)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3:
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    a = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)) or 0 in a.shape:
        raise ValueError(f"{name} must be one image [H, W] or [H, W, 1/3/4] (tensor [C, H, W]), got shape "
                         f"{tuple(image.shape)}")
    if a.dtype == np.uint8:
        out = a
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"{name}: float images must hold values in [0, 1]")
        out = np.round(a * 255).astype(np.uint8)
    else:
        raise ValueError(f"{name}: expected uint8 or float values, got {a.dtype}")
    if out.ndim == 3 and out.shape[-1] == 1:
        out = out[..., 0]
    return out[..., :3] if out.ndim == 3 else out


def canny(image, low_threshold: float = 50, high_threshold: float = 200) -> Image.Image:
    """Canny edge map (white edges on black) of `image`, as an RGB PIL image of the same size.

    The edges come from `cv2.Canny` on the uint8 RGB array (greyscale input is made RGB first), as the
    reference's Canny encoder computes them; the thresholds go to cv2 unchanged (hysteresis: gradients above
    `high_threshold` start an edge, those above `low_threshold` continue one)."""
    import cv2

    for name, value in (("low_threshold", low_threshold), ("high_threshold", high_threshold)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < float("inf"):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if low_threshold > high_threshold:
        raise ValueError(f"low_threshold ({low_threshold}) must not exceed high_threshold ({high_threshold})")
    rgb = _as_uint8(image, "image")
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    edges = cv2.Canny(np.ascontiguousarray(rgb), float(low_threshold), float(high_threshold))
    return Image.fromarray(edges).convert("RGB")


def depth_image(depth) -> Image.Image:
    """A depth map (PIL image, numpy array or tensor [H, W] / [1, H, W], any value range for floats) as the RGB
    PIL control image: 8-bit maps as they are, float and 16-bit maps scaled min..max to 0..255 (near = bright
    is the convention of Depth Anything's output, which FLUX.1 Depth was trained with)."""
    if isinstance(depth, Image.Image):
        if depth.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float depth files: scaled below
            depth = np.asarray(depth).astype(np.float64)
        else:
            depth = np.asarray(depth if depth.mode in ("L", "RGB") else depth.convert("L"))
    elif isinstance(depth, torch.Tensor):
        depth = depth.detach().cpu().float().numpy()
    if not isinstance(depth, np.ndarray):
        raise ValueError(f"depth must be a PIL image, a numpy array or a torch tensor, got {type(depth).__name__}")
    d = depth[0] if depth.ndim == 3 and depth.shape[0] == 1 else depth
    if d.ndim == 3 and d.shape[-1] in (1, 3):
        d = d[..., 0] if d.shape[-1] == 1 else d
    if d.ndim not in (2, 3) or 0 in d.shape:
        raise ValueError(f"depth must be one map [H, W] (or [1, H, W] / [H, W, 1] / RGB), got shape {depth.shape}")
    if d.dtype != np.uint8:
        d = d.astype(np.float64)
        if not np.isfinite(d).all():
            raise ValueError("depth contains NaN or infinite values")
        lo, hi = d.min(), d.max()
        d = np.zeros_like(d) if hi == lo else (d - lo) / (hi - lo)
        d = np.round(d * 255).astype(np.uint8)
    return Image.fromarray(d).convert("RGB")
