"""Where one real-width transformer step goes: its time against the floor, and torch's profiler table.

    .venv/bin/python bench/step_profile.py /tmp/fluxion-realsize/flux1-schnell-synthetic-d2-s4-Q4_0.gguf --threads 2

Takes any transformer file `load_transformer` reads (the GGUF files bench/realsize.py and bench/vs_sdcpp.py
write are the intended ones), runs one 512x512 step (1024 image + 256 text tokens) in bf16 once to warm up,
times the next, and prints the profile of a third, sorted by self time.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

from fluxion import load_transformer
from fluxion.eval.speed import floor_matmul_rate, flux_step_flops
from fluxion.flow import image_ids, text_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("transformer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=18)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_transformer(args.transformer, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 1024, model.config.in_channels, generator=g).bfloat16()
    txt = torch.randn(1, 256, model.config.context_in_dim, generator=g).bfloat16()
    y = torch.randn(1, model.config.vec_in_dim, generator=g).bfloat16()
    guidance = torch.tensor([3.5]) if model.config.guidance_embed else None
    call = lambda: model(img, image_ids(64, 64), txt, text_ids(256), torch.tensor([0.75]), y, guidance)  # noqa: E731
    with torch.no_grad():
        call()
        t0 = time.perf_counter()
        call()
        step = time.perf_counter() - t0
        floor = flux_step_flops(model.config, 1024, 256) / floor_matmul_rate()
        print(f"step {step:.2f} s, floor {floor:.2f} s, step / floor {step / floor:.2f} ({args.threads} threads)")
        with profile() as prof:
            call()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
