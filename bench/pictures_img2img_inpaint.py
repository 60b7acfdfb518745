"""Pictures for the README: an img2img strength sweep and an inpainting before/after, on fluxion-mini (128x128).

    .venv/bin/python bench/pictures_img2img_inpaint.py            # about 2 minutes on 2 CPU cores

Writes docs/images/img2img_strength.png (the init image, then strength 0.2 ... 1.0 towards a new prompt, one
seed) and docs/images/inpaint_before_after.png (the image, the mask, and the masked part repainted at two
strengths). The init images are drawn by the shapes world fluxion-mini was trained on (`fluxion.data.shapes`).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fluxion import FluxImg2ImgPipeline, FluxInpaintPipeline
from fluxion.data.shapes import Scene, ShapeObject, render

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
SCALE = 2  # thumbnails drawn at 2x (nearest) so the 128-pixel images read on a page
LABEL_H = 18


def strip(panels: list[tuple[Image.Image, str]]) -> Image.Image:
    """The images side by side, each with its label underneath."""
    side = 128 * SCALE
    sheet = Image.new("RGB", (len(panels) * (side + 6) + 6, side + LABEL_H + 12), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(panels):
        x = 6 + i * (side + 6)
        sheet.paste(image.resize((side, side), Image.NEAREST), (x, 6))
        draw.text((x + 4, side + 10), label, fill=(0, 0, 0))
    return sheet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=28)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731

    pipe = FluxImg2ImgPipeline.from_pretrained()  # fluxion-mini
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()

    # img2img: a blue square turned towards a red circle, more of it the higher the strength
    init = render(Scene("white", (ShapeObject("blue", "square", "large", 64, 64, 52),), "single"))
    prompt = "a large red circle on a black background"
    panels = [(init, "init image")]
    for strength in (0.2, 0.4, 0.6, 0.8, 1.0):
        out = pipe(prompt, image=init, strength=strength, num_inference_steps=args.steps, generator=gen())
        panels.append((out.images[0], f"strength {strength}"))
    strip(panels).save(args.out / "img2img_strength.png")
    print(f"img2img_strength.png: '{prompt}', {args.steps} steps, seed {args.seed}")

    # inpainting: the right-hand shape repainted, the rest kept
    scene = Scene("white", (ShapeObject("red", "circle", "large", 34, 64, 48),
                            ShapeObject("blue", "square", "large", 96, 64, 44)), "relation", "left of")
    image = render(scene)
    mask_arr = np.zeros((128, 128), np.uint8)
    mask_arr[32:100, 66:126] = 255  # around the square
    mask = Image.fromarray(mask_arr)
    inpaint = FluxInpaintPipeline.from_pipe(pipe)
    prompt = "a red circle left of a yellow triangle on a white background"
    shown = Image.composite(Image.new("RGB", image.size, (255, 0, 255)), image, mask.point(lambda v: v // 2))
    panels = [(image, "before"), (shown, "mask (tinted = repainted)")]
    for strength in (0.85, 1.0):
        out = inpaint(prompt, image=image, mask_image=mask, strength=strength, num_inference_steps=args.steps,
                      generator=gen())
        panels.append((out.images[0], f"after, strength {strength}"))
    strip(panels).save(args.out / "inpaint_before_after.png")
    print(f"inpaint_before_after.png: '{prompt}', {args.steps} steps, seed {args.seed}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
