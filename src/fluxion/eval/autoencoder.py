"""Autoencoder colour check: a plain disc of each palette colour on each background, encoded and decoded."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.shapes import BACKGROUNDS, COLORS
from ..images import images_to_tensor


@torch.no_grad()
def colour_round_trip(vae) -> dict[tuple[str, str], float]:
    """(colour, background) -> how far the decoded disc's centre is from the colour: the largest per-channel
    difference, in 0-255 levels, of the mean over the centre's 16x16 pixels."""
    errors = {}
    for colour, rgb in COLORS.items():
        for background, bg in BACKGROUNDS.items():
            im = Image.new("RGB", (128, 128), bg)
            ImageDraw.Draw(im).ellipse([40, 40, 88, 88], fill=rgb)
            x = images_to_tensor(np.array(im)[None])
            y = vae.decode(vae.encode(x))
            centre = (y[0, :, 56:72, 56:72].float().mean((1, 2)) + 1) * 127.5
            errors[colour, background] = (centre - torch.tensor(rgb, dtype=torch.float32)).abs().max().item()
    return errors
