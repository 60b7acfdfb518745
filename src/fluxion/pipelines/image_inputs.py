"""Image and mask arguments as diffusers' pipelines take them: a PIL image, a numpy array ([H, W, C] or
[B, H, W, C], values in [0, 1]), a tensor ([C, H, W] or [B, C, H, W], values in [0, 1], or [-1, 1] taken as
already normalised), or a list of one kind. Resized to exactly (height, width) as diffusers resizes: PIL with
lanczos, arrays and tensors by nearest interpolation (`F.interpolate`'s default); aspect ratio is not kept.
Unlike diffusers, PIL images are converted to RGB first (an RGBA or greyscale file would otherwise reach the VAE
with the wrong channel count).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

KINDS = "a PIL image, a numpy array, a torch tensor, or a list of one of these"


def as_list(image, name: str) -> list:
    """The items of an image argument; a clear ValueError for anything else."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"{name} is an empty list: give {KINDS}")
    kinds = {Image.Image if isinstance(i, Image.Image) else type(i) for i in items}
    if not kinds <= {Image.Image, np.ndarray, Tensor} or len(kinds) != 1:
        got = ", ".join(sorted(k.__name__ for k in kinds))
        raise ValueError(f"{name} must be {KINDS}; got {got}")
    for i in items:
        if not isinstance(i, Image.Image):
            arr = i if isinstance(i, np.ndarray) else i.detach()
            if arr.ndim not in (2, 3, 4) or 0 in arr.shape:
                raise ValueError(f"{name} must be [H, W(, C)] / [B, H, W, C] (numpy) or [C, H, W] / [B, C, H, W] "
                                 f"(tensor), got shape {tuple(arr.shape)}")
            values = torch.as_tensor(np.asarray(arr, dtype=np.float32)) if isinstance(arr, np.ndarray) else arr
            if not torch.isfinite(values.float()).all():
                raise ValueError(f"{name} contains NaN or infinite values")
    return items


def size_of(image) -> tuple[int, int]:
    """(height, width) of the first image of an image argument."""
    first = as_list(image, "image")[0]
    if isinstance(first, Image.Image):
        return first.height, first.width
    if isinstance(first, np.ndarray):
        return (first.shape[-3], first.shape[-2]) if first.ndim >= 3 else first.shape
    return tuple(first.shape[-2:])


def _to_batch(items: list, grey: bool, height: int, width: int) -> Tensor:
    """[B, C, height, width] float32 in the input's value range (PIL: [0, 1])."""
    if isinstance(items[0], Image.Image):
        mode = "L" if grey else "RGB"
        arrays = [np.asarray(i.convert(mode).resize((width, height), Image.LANCZOS) if i.size != (width, height)
                             else i.convert(mode), dtype=np.float32) / 255.0 for i in items]
        x = torch.from_numpy(np.stack(arrays))
        return x[:, None] if grey else x.permute(0, 3, 1, 2)
    if isinstance(items[0], np.ndarray):
        arrays = [a.astype(np.float32) for a in items]
        if grey:
            arrays = [a[..., None] if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] != 1 and len(items) > 1) else a
                      for a in arrays]
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
        x = torch.from_numpy(np.concatenate(arrays) if arrays[0].ndim == 4 else np.stack(arrays)).permute(0, 3, 1, 2)
    else:
        ts = [t.detach().float().cpu() for t in items]
        if grey:
            ts = [t[None] if t.ndim == 2 else t for t in ts]
        ts = [t[None] if t.ndim == 2 else t for t in ts]
        x = torch.cat(ts) if ts[0].ndim == 4 else torch.stack(ts)
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width))
    return x


def preprocess_image(image, height: int, width: int, name: str = "image") -> Tensor:
    """[B, 3, height, width] in [-1, 1], float32."""
    x = _to_batch(as_list(image, name), False, height, width)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"{name} must have 3 colour channels (RGB), got {x.shape[1]}")
    return x if x.min() < 0 else x * 2 - 1  # a tensor already in [-1, 1] is kept, as diffusers keeps it


def preprocess_mask(mask, height: int, width: int, name: str = "mask_image", binarize: bool = True) -> Tensor:
    """[B, 1, height, width]: greyscale, white (1) = the region to repaint; binarised at 0.5 (diffusers' mask
    processor), not normalised."""
    x = _to_batch(as_list(mask, name), True, height, width)
    if x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    return (x >= 0.5).float() if binarize else x
