"""Peak memory and time of decoding large images with the real-size FLUX VAE, tiled vs untiled.

    OMP_NUM_THREADS=1 .venv/bin/python bench/vae_tiling_memory.py [--cases 1024:untiled,2048:tiled] [--ch 128]

The VAE has FLUX.1's shape (ch 128, ch_mult 1,2,4,4, 2 res blocks, z 16, sample_size 1024 as in FLUX.1's
vae/config.json), random weights, bfloat16, on the CPU. Each case runs in a FRESH subprocess, which builds the VAE,
reads its current RSS, decodes one random latent under inference_mode and reads
VmHWM (peak RSS; unlike ru_maxrss it does not inherit the parent's peak); "decode growth" is peak minus the RSS before decoding.
A case is SIZE:MODE with MODE one of `untiled`, `tiled` (the default tiles: 1024 px / 128 latent, overlap 0.25,
so a 1024 px image is one tile and takes the untiled path) or `tiled-N` (N px tiles). 2048 untiled is not run by
default (its decode needs several times the memory of 1024 untiled). Prints a markdown table.

Cost: a 256 px decode takes ~1.7 s on one core here, and the work grows with the pixels decoded (tiles overlap:
2048 px in 1024 px tiles decodes ~6.3x the pixels of 1024 px, in 512 px tiles ~6.9x), so the default cases take
several minutes single-threaded. `--ch 32` runs the same geometry with 16x less compute (a smoke test).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fluxion.eval.speed import peak_rss_bytes, rss_bytes

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
DEFAULT_CASES = "1024:untiled,1024:tiled-512,2048:tiled,2048:tiled-512"


rss_now, peak_rss = rss_bytes, peak_rss_bytes  # VmRSS and VmHWM, in bytes


def child(size: int, mode: str, ch: int, seed: int) -> dict:
    import torch

    from fluxion.model.autoencoder import AutoEncoder, AutoEncoderConfig

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no float32 copy raises the high-water mark first
    try:
        vae = AutoEncoder(AutoEncoderConfig(resolution=1024, ch=ch)).eval()
    finally:
        torch.set_default_dtype(previous)
    f = vae.downsample_factor
    z = torch.randn(1, vae.config.z_channels, size // f, size // f, dtype=torch.bfloat16)
    if mode.startswith("tiled"):
        vae.enable_tiling(tile_sample_min_size=int(mode.split("-")[1]) if "-" in mode else None)
    elif mode != "untiled":
        raise ValueError(f"mode must be untiled, tiled or tiled-N, got {mode!r}")
    calls = []
    vae.decoder.register_forward_pre_hook(lambda _, args: calls.append(tuple(args[0].shape[-2:])))
    before = rss_now()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = vae.decode(z)
    seconds = time.perf_counter() - t0
    assert out.shape == (1, 3, size, size) and torch.isfinite(out).all(), out.shape
    return dict(size=size, mode=mode, tile=vae.tile_sample_min_size if vae.use_tiling else None, tiles=len(calls),
                before=before, peak=peak_rss(), seconds=seconds)


def run_case(case: str, ch: int, seed: int) -> dict:
    size, mode = case.split(":")
    cmd = [sys.executable, __file__, "--child", size, mode, "--ch", str(ch), "--seed", str(seed)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(f"{case} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated SIZE:MODE (default {DEFAULT_CASES})")
    ap.add_argument("--ch", type=int, default=128, help="base channels (128 = FLUX; 32 for a quick smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.ch, args.seed)))
        return

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"FLUX VAE decoder (ch {args.ch}, ch_mult 1,2,4,4, z 16), random weights, bfloat16, CPU, "
          f"OMP_NUM_THREADS={threads}; each case in a fresh process\n")
    print("| image | mode | tile (px) | decoder calls | RSS before (MiB) | peak RSS (MiB) | decode growth (MiB) "
          "| time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        print(f"running {case} ...", file=sys.stderr, flush=True)
        r = run_case(case, args.ch, args.seed)
        growth = (r["peak"] - r["before"]) / MIB
        print(f"| {r['size']}x{r['size']} | {r['mode']} | {r['tile'] or '-'} | {r['tiles']} | {r['before'] / MIB:.0f} "
              f"| {r['peak'] / MIB:.0f} | {growth:.0f} | {r['seconds']:.1f} |", flush=True)
    if "2048:untiled" not in args.cases.split(","):
        print("| 2048x2048 | untiled | - | 1 | not run | not run | not run | not run |")


if __name__ == "__main__":
    main()
