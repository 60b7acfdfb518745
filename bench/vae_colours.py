"""How far an autoencoder moves each palette colour on each background (`fluxion.eval.autoencoder`).

    .venv/bin/python bench/vae_colours.py                      # the shipped fluxion-mini's
    .venv/bin/python bench/vae_colours.py runs/mini-vae/vae    # the first autoencoder (after configs/mini-vae.yaml)
"""
from __future__ import annotations

import argparse

from fluxion.checkpoints import load_autoencoder
from fluxion.data.shapes import BACKGROUNDS
from fluxion.eval.autoencoder import colour_round_trip
from fluxion.pipelines import default_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vae", nargs="?", default=None, help="diffusers vae/ folder or ae.safetensors")
    args = ap.parse_args()
    errors = colour_round_trip(load_autoencoder(args.vae or default_model_dir() / "vae"))
    print("| colour | " + " | ".join(BACKGROUNDS) + " |\n|---|" + "---:|" * len(BACKGROUNDS))
    for colour in dict.fromkeys(c for c, _ in errors):
        print(f"| {colour} | " + " | ".join(f"{errors[colour, b]:.1f}" for b in BACKGROUNDS) + " |")
    worst = max(errors, key=errors.get)
    print(f"worst: {worst[0]} on {worst[1]}, {errors[worst]:.1f} levels")


if __name__ == "__main__":
    main()
