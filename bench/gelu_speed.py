"""Speed of the tanh-approximate GELU: torch's kernel against `fluxion.model.layers.tanh_gelu`'s in-place chain.

FLUX's MLPs use GELU with the tanh approximation. On CPU torch's kernel for it runs several times slower than its
erf GELU; a chain of in-place elementwise ops computes the same function (to float32 rounding) about twice as
fast on small activations, and loses on large ones (the chain passes over memory six times), so tanh_gelu takes
the chain up to a million elements. This script times torch's kernel and the chain (called directly, whatever
the size) at fluxion-mini's activation shapes and at a full-size FLUX block's, on the threads given.
    .venv/bin/python bench/gelu_speed.py                 # 1 thread
    .venv/bin/python bench/gelu_speed.py --threads 2
    .venv/bin/python bench/gelu_speed.py --threads 2 --end-to-end   # also one fluxion-mini image, both ways
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fluxion.compute import cpu_info
from fluxion.model.layers import tanh_gelu_chain as chain

SHAPES = {"fluxion-mini double block (CFG batch 2, 64 image tokens, hidden 512)": (2, 64, 512),
          "fluxion-mini single block (84 joint tokens, a strided view)": (2, 84, 512),
          "FLUX.1 single block at 512x512 (1 x 1536 tokens x 12288)": (1, 1536, 12288)}


def per_call(fn, x: torch.Tensor, budget_s: float = 1.0) -> float:
    for _ in range(3):
        fn(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s:
        fn(x)
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--end-to-end", action="store_true", help="also time one fluxion-mini image (28 steps, CFG)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = cpu_info()
    print(f"{info.model} (torch capability {info.torch_capability}), {args.threads} thread(s)\n")
    print("| activation | torch gelu(tanh) | erf gelu (another function) | the chain | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for name, shape in SHAPES.items():
        x = torch.randn(*shape[:-1], shape[-1] * (4 if "strided" in name else 1), generator=g) * 3
        if "strided" in name:  # the single block splits its fused projection: the MLP half is not contiguous
            x = x[..., -shape[-1]:]
        with torch.no_grad():
            ref = per_call(lambda t: F.gelu(t, approximate="tanh"), x)
            erf = per_call(F.gelu, x)
            ours = per_call(chain, x)
            diff = (chain(x) - F.gelu(x, approximate="tanh")).abs().max().item()
        print(f"| {name} | {ref * 1e6:.0f} µs | {erf * 1e6:.0f} µs | {ours * 1e6:.0f} µs | {ref / ours:.2f}× | "
              f"{diff:.1e} |")
    if args.end_to_end:
        end_to_end(args.repeats)


def end_to_end(repeats: int) -> None:
    """One 128×128 fluxion-mini image at its defaults, with torch's kernel and with tanh_gelu, alternating."""
    import statistics

    from fluxion import FluxPipeline
    from fluxion.model import layers
    from fluxion.pipelines.base import default_model_dir

    pipe = FluxPipeline.from_pretrained(default_model_dir())
    pipe.set_progress_bar_config(disable=True)
    ours = layers.TanhGELU.forward
    ways = {"torch's kernel": lambda self, x: F.gelu(x, approximate="tanh"), "tanh_gelu": ours}
    times: dict[str, list[float]] = {k: [] for k in ways}
    try:
        for i in range(repeats + 1):
            for name, forward in ways.items():
                layers.TanhGELU.forward = forward
                start = time.perf_counter()
                pipe("two red squares on a white background", generator=torch.Generator().manual_seed(i))
                if i:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    finally:
        layers.TanhGELU.forward = ours
    a, b = (statistics.median(t) for t in times.values())
    print(f"\none fluxion-mini image (median of {repeats}): torch's kernel {a:.4f} s, tanh_gelu {b:.4f} s, "
          f"{a / b:.3f}×")


if __name__ == "__main__":
    main()
