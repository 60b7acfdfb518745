"""Seconds per LoRA training step on fluxion-mini, float32 against bf16 mixed precision, in one run.

    .venv/bin/python bench/lora_step_speed.py --threads 2

The step `fluxion train-lora` takes (forward, loss, backward, AdamW on the adapter) on random latents and text
embeddings, rank 16 on the recipe's layers; the two precisions alternate, and each figure is the median of
`--repeats` rounds of `--steps` steps.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fluxion import FluxPipeline
from fluxion.lora import add_trainable_adapter
from fluxion.flow import image_ids, latent_grid, text_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = FluxPipeline.from_pretrained()
    model = pipe.transformer.requires_grad_(False)
    params = add_trainable_adapter(model, "bench", rank=16, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    size = pipe.defaults.sample_size * pipe.vae_scale_factor
    img_ids = image_ids(*latent_grid(size, size, pipe.vae_scale_factor))
    seq = pipe.defaults.max_sequence_length
    txt_ids = text_ids(seq)
    x = torch.randn(args.batch, len(img_ids), model.config.in_channels, generator=g)
    txt = torch.randn(args.batch, seq, model.config.context_in_dim, generator=g)
    vec = torch.randn(args.batch, model.config.vec_in_dim, generator=g)
    target = torch.randn(x.shape, generator=g)
    sigma = torch.rand(args.batch, generator=g)

    def steps(bf16: bool) -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pred = model(x, img_ids, txt, txt_ids, sigma, vec, None)
            (pred.float() - target).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / args.steps

    steps(False), steps(True)  # warm-up
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for bf16 in (False, True):
            times[bf16].append(steps(bf16))
    f32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"fluxion-mini LoRA step, batch {args.batch}, rank 16, {args.threads} threads: "
          f"float32 {f32:.3f} s, bf16 {bf16:.3f} s, {f32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
