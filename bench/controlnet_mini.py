"""The trained mini Canny ControlNet (#19, part 5): edges of held-out scenes + prompts naming other colours.

100 scenes from a stream training never draws (`fluxion.train.controlnet.heldout_examples`: rng([seed, 7777777,
i]); training batches are rng([seed, step, i])), each recoloured (every object colour replaced by another, distinct
colours kept distinct, each new colour-shape pair one fluxion-mini was trained on), the prompt the canonical
caption of the recoloured scene (shapes, count, size, relation, background and the *new* colours). The control
image is the Canny edge map of the *original* rendering, so the net cannot copy colours from it.

A case passes (`fluxion.eval.controlnet.judge`) when the shapes-world scorer accepts the image for the prompt and
every object of the scene is found, with the prompt's colour and its shape, near its place in the edge map. The
issue's target: >= 85%. `--baseline` adds
the same prompts without the ControlNet (the places then agree by chance only).

    .venv/bin/python bench/controlnet_mini.py --controlnet models/fluxion-mini-controlnet-canny       # table, picture
    .venv/bin/python bench/controlnet_mini.py --controlnet runs/mini-controlnet/export -n 10 --no-write  # a dry run
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fluxion import FluxPipeline
from fluxion.data.shapes import render
from fluxion.eval.controlnet import judge
from fluxion.eval.report import contact_sheet
from fluxion.model.controlnet import FluxControlNetModel
from fluxion.pipelines import default_model_dir
from fluxion.pipelines.controlnet import FluxControlNetPipeline
from fluxion.images import grid
from fluxion.train.controlnet import edge_maps, edges_to_images, heldout_examples

ROOT = Path(__file__).resolve().parents[1]
PICTURE = ROOT / "docs" / "images" / "controlnet_mini.png"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--controlnet", required=True, help="the trained net (a diffusers ControlNet folder)")
    ap.add_argument("--model", default=str(default_model_dir()), help="the base model (default fluxion-mini)")
    ap.add_argument("-n", type=int, default=100, help="held-out scenes")
    ap.add_argument("--seed", type=int, default=0, help="scene stream and first noise seed")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 28)")
    ap.add_argument("--scale", type=float, default=1.0, help="controlnet_conditioning_scale")
    ap.add_argument("--batch", type=int, default=20, help="images per call")
    ap.add_argument("--baseline", action="store_true", help="also the same prompts without the ControlNet")
    ap.add_argument("--grid", type=int, default=8, help="examples in the picture")
    ap.add_argument("--no-write", action="store_true", help="print only, write no picture")
    args = ap.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = FluxPipeline.from_pretrained(args.model)
    net = FluxControlNetModel.from_pretrained(args.controlnet)
    pipe = FluxControlNetPipeline.from_pipe(base, controlnet=net)
    for p in (base, pipe):
        p.set_progress_bar_config(disable=True)
    side = base.defaults.sample_size * base.vae_scale_factor
    examples = heldout_examples(args.n, args.seed)
    edges = edge_maps([s for s, _, _ in examples], side)
    prompts = [p for *_, p in examples]
    kw = {} if args.steps is None else {"num_inference_steps": args.steps}

    t0 = time.time()
    images = edges_to_images(pipe, edges, prompts, seed=args.seed, batch=args.batch,
                             controlnet_conditioning_scale=args.scale, **kw)
    seconds = time.time() - t0
    rows = [("ControlNet", judge(images, examples))]
    if args.baseline:
        plain = []
        for start in range(0, args.n, args.batch):
            stop = min(args.n, start + args.batch)
            plain += base(prompts[start:stop], generator=[torch.Generator().manual_seed(args.seed + i)
                                                          for i in range(start, stop)], **kw).images
        rows.append(("no ControlNet", judge(plain, examples)))

    command = " ".join(["python bench/controlnet_mini.py", *map(shlex.quote, sys.argv[1:])])
    cols = ("prompt's colours", "same shapes (and count)", "same places", "scorer accepts", "**pass**")
    keys = ("colours", "shapes", "places", "scorer", "pass")
    lines = [f"`{command}` ({args.n} held-out scenes, {seconds:.0f} s for the ControlNet run)", "",
             "| run | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, results in rows:
        pct = [f"{100 * np.mean([r[k] for r in results]):.0f}%" for k in keys]
        pct[-1] = f"**{pct[-1]}**"
        lines.append(f"| {name} | " + " | ".join(pct) + " |")
    print("\n".join(lines))
    for i, r in enumerate(rows[0][1]):
        if not r["pass"]:
            print(f"  {i}: {prompts[i]!r}: places={r['places']}; {r['reason']}", file=sys.stderr)

    if not args.no_write:
        k = min(args.grid, args.n)
        originals = [examples[i][0] for i in range(k)]
        top = grid([render(s, side) for s in originals] + edges[:k], columns=k)
        PICTURE.parent.mkdir(parents=True, exist_ok=True)
        sheet = PICTURE.with_name(".controlnet_mini_sheet.png")
        contact_sheet(images[:k], prompts[:k], [r["pass"] for r in rows[0][1][:k]], sheet, columns=k)
        bottom = Image.open(sheet).convert("RGB")
        sheet.unlink()
        scale = bottom.width / top.width
        top = top.resize((bottom.width, round(top.height * scale)), Image.NEAREST)
        out = Image.new("RGB", (bottom.width, top.height + bottom.height), (255, 255, 255))
        out.paste(top, (0, 0))
        out.paste(bottom, (0, top.height))
        tmp = PICTURE.with_name(".controlnet_mini.tmp.png")
        out.save(tmp)
        tmp.replace(PICTURE)
        print(f"\nwrote {PICTURE.relative_to(ROOT)}: the scene as rendered (for reference only), its Canny edges "
              "(the control image), and the image drawn from the edges with the recoloured prompt (green frame: "
              "pass)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
