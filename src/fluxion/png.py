"""Writing images: PNG with the generation parameters in its text chunks, written atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from .files import atomic_path


def png_info(parameters: dict | None) -> PngImagePlugin.PngInfo:
    """The PNG text chunks for `parameters`: all of them as JSON under `parameters`, and one chunk per key."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", json.dumps(parameters, default=str))
        for k, v in parameters.items():
            if v is not None:
                info.add_text(f"fluxion:{k}", str(v))
    return info


def save_png(image: Image.Image, path: str | os.PathLike, parameters: dict | None = None) -> Path:
    """Save `image` to `path`, atomically, with `parameters` in its text chunks (`png_info`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(parameters))
    return path


def read_parameters(path: str | os.PathLike) -> dict:
    with Image.open(path) as im:
        raw = im.text.get("parameters") if hasattr(im, "text") else None
    return json.loads(raw) if raw else {}
