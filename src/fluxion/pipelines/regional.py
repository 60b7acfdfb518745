"""Regional prompts: each region of the image follows its own prompt, through one attention mask.

The scheme of Regional-Prompting-FLUX (arXiv 2411.02395): the region prompts' T5 embeddings are concatenated
into one text sequence, and a boolean mask over [region text, image tokens] lets
  (1) each region's text attend to itself only,
  (2) a region's text and the image tokens inside that region attend to each other,
  (3) image tokens attend to image tokens of a region they share, and background tokens (in no region) to
      each other.
That masked pass is blended with the base prompt's ordinary pass, `(1 - base_ratio) * regional + base_ratio *
base` on the velocities, for the first `steps` steps; later steps run the base prompt alone (the layout is
decided early). The mask is built once per call, every region into its own blocks (one known implementation
overwrites its image-to-image block per region, so only the last region survives; tests check each keeps its
block).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..flow import text_ids
from .core import RegionalInputs, TextConditioning


@dataclass
class Regions:
    prompts: list[str]
    masks: list[np.ndarray]  # float [H, W] in [0, 1], white = inside
    base_ratio: float
    steps: int


def _mask_array(mask, i: int) -> np.ndarray:
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    elif isinstance(mask, (np.ndarray, Tensor)):
        arr = mask.detach().cpu().float().numpy() if isinstance(mask, Tensor) else np.asarray(mask, np.float32)
        arr = arr.squeeze()
        if arr.ndim == 3:  # a colour mask: its mean over channels (either layout)
            arr = arr.mean(axis=0 if arr.shape[0] in (1, 3, 4) else -1)
        if arr.size and arr.max() > 1:
            arr = arr / 255.0
    else:
        raise ValueError(f"regional_masks[{i}] must be a PIL image, a numpy array or a tensor, got {type(mask).__name__}")
    if arr.ndim != 2 or min(arr.shape) < 1 or not np.isfinite(arr).all():
        raise ValueError(f"regional_masks[{i}] must be one finite greyscale image [H, W], got shape {arr.shape}")
    return arr


def check(prompts, masks, base_ratio, steps, num_steps: int) -> Regions | None:
    """Checks before any model runs; None when no regions are given."""
    if prompts is None and masks is None:
        return None
    if prompts is None or masks is None:
        raise ValueError("regional prompting needs both regional_prompts and regional_masks (one mask per prompt)")
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("regional_prompts must be a non-empty list of str")
    if not isinstance(masks, (list, tuple)) or len(masks) != len(prompts):
        got = len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__
        raise ValueError(f"regional_masks must be a list with one mask per regional prompt: {len(prompts)} prompts, "
                         f"got {got} masks")
    if isinstance(base_ratio, bool) or not isinstance(base_ratio, (int, float)) or not 0 <= base_ratio <= 1:
        raise ValueError(f"regional_base_ratio must be a number in [0, 1], got {base_ratio!r}")
    steps = max(1, num_steps // 3) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"regional_steps must be an integer >= 0, got {steps!r}")
    return Regions(list(prompts), [_mask_array(m, i) for i, m in enumerate(masks)], float(base_ratio), steps)


def token_regions(masks: list[np.ndarray], lat_h: int, lat_w: int) -> Tensor:
    """bool [R, N]: which packed tokens (a 2x2 latent patch each) lie in each region; a mask is resized to the
    token grid by nearest neighbour and thresholded at 0.5."""
    h, w = lat_h // 2, lat_w // 2
    rows = []
    for m in masks:
        small = Image.fromarray((np.clip(m, 0, 1) * 255).astype(np.uint8)).resize((w, h), Image.NEAREST)
        rows.append(torch.from_numpy(np.asarray(small) >= 128).reshape(-1))
    return torch.stack(rows)


def attention_mask(text_lengths: list[int], regions: Tensor) -> Tensor:
    """bool [(T + N), (T + N)] over [region text (lengths in order), image tokens]; True = may attend."""
    total_text, n = sum(text_lengths), regions.shape[1]
    mask = torch.zeros(total_text + n, total_text + n, dtype=torch.bool)
    img = slice(total_text, total_text + n)
    start = 0
    for length, inside in zip(text_lengths, regions):
        txt = slice(start, start + length)
        mask[txt, txt] = True  # (1) the region's text sees itself
        cols = torch.nonzero(inside).reshape(-1) + total_text
        mask[txt, cols] = True  # (2) text <-> its region's image tokens
        mask[cols, txt] = True
        mask[img, img] |= inside[:, None] & inside[None, :]  # (3) image tokens within the region (|=: kept)
        start += length
    background = ~regions.any(0)
    mask[img, img] |= background[:, None] & background[None, :]
    return mask


def prepare(pipe, a, regions: Regions, pooled: Tensor) -> RegionalInputs:
    """Encode the region prompts (T5, concatenated) and build the mask for this call's size; the pooled CLIP
    vector stays the base prompt's."""
    embeds, _, _ = pipe.encode_prompt(regions.prompts, None, 1, a.max_sequence_length)
    text = embeds.reshape(1, -1, embeds.shape[-1]).expand(a.total, -1, -1)
    lat_h, lat_w = pipe._latent_grid(a)
    mask = attention_mask([embeds.shape[1]] * len(regions.prompts), token_regions(regions.masks, lat_h, lat_w))
    return RegionalInputs(TextConditioning(text, pooled, text_ids(text.shape[1], text.device)),
                          mask.to(text.device), regions.base_ratio, regions.steps)


def describe(regions: Regions) -> dict:
    return {"regional_prompts": regions.prompts, "regional_base_ratio": regions.base_ratio,
            "regional_steps": regions.steps}
