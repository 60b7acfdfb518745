"""Where one image's seconds go, and how much faster a few-step model can be than its teacher (#21).

Times, with the model loaded, batch 1, the median of repeats: the text encoders on one prompt, one transformer
step at batch 1 (one forward) and at batch 2 (true CFG stacks [cond; uncond]), the decoder, and whole images at
the teacher's defaults and at N steps without CFG. Text encoding and decoding are paid once per image whatever
the step count, so they bound the speed-up: with a free transformer a few-step model would still be at most
teacher / (encode + decode) times faster.

    .venv/bin/python bench/image_costs.py [--model DIR] [--steps 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from fluxion import FluxPipeline
from fluxion.eval.speed import median_seconds
from fluxion.flow import image_ids
from fluxion.pipelines import default_model_dir

PROMPT = "a red circle on a white background"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--steps", type=int, default=4, help="the few-step model's step count")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = FluxPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    d = pipe.defaults
    side = d.sample_size * pipe.vae_scale_factor
    txt, pooled, txt_ids = pipe.encode_prompt(PROMPT)
    tf = pipe.transformer
    tokens = (d.sample_size // 2) ** 2
    ids = image_ids(d.sample_size, d.sample_size, pipe.device)
    x = torch.randn(1, tokens, tf.config.in_channels, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def step(batch: int):
        tf(x.expand(batch, -1, -1), ids, txt.expand(batch, -1, -1), txt_ids, torch.full((batch,), 0.5),
           pooled.expand(batch, -1))

    def image(**call):
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call)

    r = args.repeats
    encode = median_seconds(lambda: pipe.encode_prompt(PROMPT), r)
    decode = median_seconds(lambda: pipe.decode(x, side, side), r)
    teacher = median_seconds(lambda: image(), max(3, r // 4))
    few = median_seconds(lambda: image(num_inference_steps=args.steps, true_cfg_scale=1.0), r)
    parts = {
        "text encoders (one prompt)": encode,
        "transformer step, batch 1": median_seconds(lambda: step(1), r),
        "transformer step, batch 2 (true CFG)": median_seconds(lambda: step(2), r),
        "decoder": decode,
        f"image at the model's defaults ({d.num_inference_steps} steps, true CFG {d.true_cfg_scale:g})": teacher,
        f"image at {args.steps} steps, no CFG": few,
    }
    print(f"{args.model}; {side}x{side}; {args.threads} threads; {platform.processor() or platform.machine()}, "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("| part | ms |\n|---|---:|")
    for name, s in parts.items():
        print(f"| {name} | {1000 * s:.1f} |")
    print(f"\nteacher / {args.steps}-step image: {teacher / few:.1f}x; "
          f"bound with a free transformer, teacher / (encode + decode): {teacher / (encode + decode):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
