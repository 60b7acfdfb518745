"""The autoencoder's ceiling on the eval (issue #20): each of the 300 eval prompts drawn exactly (a rendered scene
that satisfies it), passed through the autoencoder (encode, decode) and scored like a generated image. What the
decoder loses here (blurred corners that make squares into blobs, colours that drift) no transformer can win back.

    .venv/bin/python bench/vae_ceiling.py [VAE]      # default: the shipped fluxion-mini's autoencoder
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from fluxion.checkpoints import load_autoencoder
from fluxion.data.shapes import parse_caption, render, scene_from_spec
from fluxion.eval.prompts import eval_set
from fluxion.eval.report import format_table
from fluxion.eval.scorer import score
from fluxion.images import images_to_tensor, tensor_to_images
from fluxion.pipelines import default_model_dir


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vae", nargs="?", default=None, help="diffusers vae/ folder or ae.safetensors")
    args = ap.parse_args()
    vae = load_autoencoder(args.vae or default_model_dir() / "vae")
    items = eval_set()
    drawn = [render(scene_from_spec(parse_caption(it.prompt), np.random.default_rng(it.seed))) for it in items]
    decoded: list[Image.Image] = []
    for start in range(0, len(drawn), 50):
        x = images_to_tensor(np.stack([np.asarray(im) for im in drawn[start : start + 50]]))
        decoded += tensor_to_images(vae.decode(vae.encode(x)))
    print("rendered scenes, scored as drawn:")
    print(format_table([(it, score(im, it.prompt)) for it, im in zip(items, drawn)]))
    print("\nthe same scenes after the autoencoder (encode, decode):")
    print(format_table([(it, score(im, it.prompt)) for it, im in zip(items, decoded)]))


if __name__ == "__main__":
    main()
