"""Image and mask arguments as diffusers' pipelines take them: a PIL image, a numpy array ([H, W, C] or
[B, H, W, C], values in [0, 1]), a tensor ([C, H, W] or [B, C, H, W], values in [0, 1], or [-1, 1] taken as
already normalised), or a list of one kind. Resized to exactly (height, width) as diffusers resizes: PIL with
lanczos, arrays and tensors by nearest interpolation (`F.interpolate`'s default); aspect ratio is not kept.
PIL images are resized in their own mode and then converted, as diffusers does; unlike diffusers, images are
converted to RGB (an RGBA or greyscale file would otherwise reach the VAE with the wrong channel count).

Inpainting's `padding_mask_crop` (PIL only): `crop_region` finds the box around the mask, the image and mask
are cropped to it and resized with `resize_mode="fill"`, and `overlay` pastes the result back.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
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


RESIZE_MODES = ("default", "fill", "crop")


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit inside (width, height) keeping the aspect ratio, centred on an RGB canvas; the bands left over are
    filled by stretching the resized image's edge rows (or columns) outwards (diffusers' resize_mode="fill")."""
    src, dst = image.width / image.height, width / height
    fit_w = width if src > dst else image.width * height // image.height
    fit_h = height if dst >= src else image.height * width // image.width
    fitted = image.resize((fit_w, fit_h), Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(fitted, (width // 2 - fit_w // 2, height // 2 - fit_h // 2))
    if src > dst and height // 2 - fit_h // 2 > 0:  # bands above and below
        band = height // 2 - fit_h // 2
        out.paste(fitted.resize((width, band), box=(0, 0, width, 0)), (0, 0))
        out.paste(fitted.resize((width, band), box=(0, fitted.height, width, fitted.height)), (0, band + fit_h))
    elif dst > src and width // 2 - fit_w // 2 > 0:  # bands left and right
        band = width // 2 - fit_w // 2
        out.paste(fitted.resize((band, height), box=(0, 0, 0, height)), (0, 0))
        out.paste(fitted.resize((band, height), box=(fitted.width, 0, fitted.width, height)), (band + fit_w, 0))
    return out


def resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover (width, height) keeping the aspect ratio, centred, the excess cut off (resize_mode="crop")."""
    src, dst = image.width / image.height, width / height
    fit_w = width if dst > src else image.width * height // image.height
    fit_h = height if dst <= src else image.height * width // image.width
    out = Image.new("RGB", (width, height))
    out.paste(image.resize((fit_w, fit_h), Image.LANCZOS), (width // 2 - fit_w // 2, height // 2 - fit_h // 2))
    return out


def _resize_pil(image: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    if resize_mode == "fill":
        return resize_fill(image, width, height)
    if resize_mode == "crop":
        return resize_crop(image, width, height)
    return image.resize((width, height), Image.LANCZOS) if image.size != (width, height) else image


def _to_batch(items: list, grey: bool, height: int, width: int, crop: tuple | None = None,
              resize_mode: str = "default") -> Tensor:
    """[B, C, height, width] float32 in the input's value range (PIL: [0, 1])."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if isinstance(items[0], Image.Image):
        mode = "L" if grey else "RGB"
        items = [i.crop(crop) for i in items] if crop is not None else items
        arrays = [np.asarray(_resize_pil(i, width, height, resize_mode).convert(mode), dtype=np.float32) / 255.0
                  for i in items]
        x = torch.from_numpy(np.stack(arrays))
        return x[:, None] if grey else x.permute(0, 3, 1, 2)
    if crop is not None or resize_mode != "default":
        raise ValueError(f"cropping and resize_mode {resize_mode!r} take PIL images only")
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


def preprocess_image(image, height: int, width: int, name: str = "image", crop: tuple | None = None,
                     resize_mode: str = "default") -> Tensor:
    """[B, 3, height, width] in [-1, 1], float32. `crop` (x1, y1, x2, y2) and `resize_mode` "fill" / "crop"
    (PIL only) as diffusers' image processor applies them: crop first, then resize."""
    x = _to_batch(as_list(image, name), False, height, width, crop, resize_mode)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"{name} must have 3 colour channels (RGB), got {x.shape[1]}")
    return x if x.min() < 0 else x * 2 - 1  # a tensor already in [-1, 1] is kept, as diffusers keeps it


def preprocess_mask(mask, height: int, width: int, name: str = "mask_image", binarize: bool = True,
                    crop: tuple | None = None, resize_mode: str = "default") -> Tensor:
    """[B, 1, height, width]: greyscale, white (1) = the region to repaint; binarised at 0.5 (diffusers' mask
    processor), not normalised. `crop` and `resize_mode` as in `preprocess_image`."""
    x = _to_batch(as_list(mask, name), True, height, width, crop, resize_mode)
    if x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    return (x >= 0.5).float() if binarize else x


def init_image(image, height: int, width: int, total: int, latent_shape: tuple[int, int, int], name: str = "image",
               crop: tuple | None = None, resize_mode: str = "default") -> Tensor:
    """The init image of img2img, inpainting and Fill: [n, 3, height, width] pixels in [-1, 1], or, for a
    tensor with the VAE's latent channels (`latent_shape` = (C, h, w)), those latents unchanged (diffusers
    encodes them not again); n must divide `total` (the images are tiled over the batch, as diffusers does)."""
    if image is None:
        raise ValueError(f"{name} is required: {KINDS}")
    first = image[0] if isinstance(image, (list, tuple)) and image else image
    if isinstance(first, Tensor) and first.ndim in (3, 4) and first.shape[-3] == latent_shape[0]:
        items = as_list(image, name)
        x = torch.cat([t.detach()[None] if t.ndim == 3 else t.detach() for t in items])
        if tuple(x.shape[1:]) != tuple(latent_shape):
            raise ValueError(f"{name} as latents must be [n, {', '.join(map(str, latent_shape))}] for "
                             f"{height}x{width}, got {list(x.shape)}")
    else:
        x = preprocess_image(image, height, width, name, crop, resize_mode)
    if x.shape[0] > total or total % x.shape[0]:
        raise ValueError(f"{name} holds {x.shape[0]} images for {total} outputs (batch x num_images_per_prompt): "
                         "give one image, or a number that divides the outputs")
    return x


def padding_crop(image, mask_image, pad, output_type: str, width: int, height: int) -> tuple | None:
    """The crop box of inpainting's `padding_mask_crop` (None without it), after diffusers' checks: one PIL
    image and one PIL mask (of one size here, as the paste-back needs) and output_type "pil"."""
    if pad is None:
        return None
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"padding_mask_crop must be an integer >= 0 (pixels), got {pad!r}")
    if not isinstance(image, Image.Image) or not isinstance(mask_image, Image.Image):
        raise ValueError(f"padding_mask_crop needs image and mask_image as single PIL images, got "
                         f"{type(image).__name__} and {type(mask_image).__name__}")
    if output_type != "pil":
        raise ValueError(f"padding_mask_crop needs output_type='pil', got {output_type!r}")
    if image.size != mask_image.size:
        raise ValueError(f"padding_mask_crop needs image and mask_image of one size, got {image.size} and "
                         f"{mask_image.size}")
    return crop_region(mask_image, width, height, pad)


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box around the mask's non-zero pixels, grown by `pad` on each side (within the
    image), then widened or heightened about its centre to the width/height aspect ratio (shifted back inside
    the image where it overflows), as diffusers' `get_crop_region`."""
    m = np.asarray(mask.convert("L"))
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if not len(cols):
        raise ValueError("mask_image is black everywhere: padding_mask_crop needs a region to repaint")
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    aspect = width / height
    if (x2 - x1) / (y2 - y1) > aspect:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / aspect - (y2 - y1)), h)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * aspect - (x2 - x1)), w)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    lo, hi = lo - grow // 2, hi + grow - grow // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def overlay(mask: Image.Image, original: Image.Image, generated: Image.Image,
            box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The generated image (resized with resize_mode="crop" into `box` of a canvas the original's size, black
    around it) under the original, which shows where the (unbinarised) mask is black and blends where it is
    grey: diffusers' `apply_overlay`."""
    kept = Image.new("RGBa", original.size)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    if box is not None:
        x1, y1, x2, y2 = box
        canvas = Image.new("RGBA", original.size)
        canvas.paste(resize_crop(generated, x2 - x1, y2 - y1), (x1, y1))
        generated = canvas.convert("RGB")
    out = generated.convert("RGBA")
    out.alpha_composite(kept.convert("RGBA"))
    return out.convert("RGB")
