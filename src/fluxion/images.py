"""Reading images as people hand them over: any PIL mode to the RGB it shows, and a named error for a bad file;
and the conversions trainers use (uint8 batches to tensors and back, a grid of samples).

PIL's own `convert("RGB")` is right for palette, grey, grey+alpha, RGBA (alpha dropped, as diffusers'
`load_image` does) and CMYK, but clips 16- and 32-bit integer images (a 16-bit grey of 76/255 becomes white)
and float images: those are scaled here from their full range instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit PNGs open as I;16 or I, values 0..65535


def to_rgb(image: Image.Image) -> Image.Image:
    """The RGB image `image` shows, whatever its mode."""
    if image.mode in WIDE_INT_MODES or image.mode == "F":
        arr = np.asarray(image).astype(np.float64)
        if image.mode == "F":
            top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0  # float images in [0, 1] or [0, 255]
        else:
            top = 65535.0 if image.mode != "I" or (arr.size and arr.max() > 255) else 255.0
        grey = np.clip(np.nan_to_num(arr) / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """An image file as RGB; a missing, corrupt or non-image file raises ValueError naming it."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{what} {path}: not a readable image ({e})") from None


def images_to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (converted on `device`: a quarter of the bytes travel)."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = -(-len(images) // columns)
    out = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im, ((i % columns) * w, (i // columns) * h))
    return out
