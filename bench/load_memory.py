"""Peak memory of loading a multi-GB FLUX transformer checkpoint.

    .venv/bin/python bench/load_memory.py [--out bench/out] [--keep] [--depth 2] [--single 4]

Writes a synthetic transformer checkpoint (real FLUX.1 width 3072, few blocks; >= 2 GB of bf16) in the
ORIGINAL single-file layout, streaming it tensor by tensor (the safetensors format written by hand:
8-byte little-endian header length, JSON header, raw bytes), so the model never exists in memory here.
Then, each in a FRESH subprocess, it loads the file with `fluxion.load_transformer` and reads
VmHWM (peak RSS; unlike ru_maxrss it does not inherit the parent's peak) minus the RSS just before loading:

* bf16 -> bf16 (`dtype=torch.bfloat16`, the stored dtype): target peak growth / file size <= 1.3;
* bf16 -> float32 (`dtype=torch.float32`): peak growth / weights size in float32.

Each mode is measured twice: right after `load_transformer` returns, and after a forward pass (every
weight is then resident: a zero-copy load that merely maps the file would otherwise look free).
The file is deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

from fluxion.eval.speed import peak_rss_bytes, rss_bytes

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
MIB = 2**20


rss_now, peak_rss = rss_bytes, peak_rss_bytes  # VmRSS and VmHWM, in bytes


# ---------------------------------------------------------------- writing


def bench_config(depth: int, single: int):
    from fluxion.model.transformer import FluxConfig

    return FluxConfig(hidden_size=3072, num_heads=24, depth=depth, depth_single_blocks=single, guidance_embed=True)


def write_checkpoint(path: Path, depth: int, single: int, seed: int = 0) -> int:
    """Stream a random bf16 original-layout checkpoint to `path`; returns its size in bytes."""
    import torch

    from fluxion.model.transformer import FluxTransformer

    config = bench_config(depth, single)
    with torch.device("meta"):
        model = FluxTransformer(config)
    entries = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]

    header: dict = {"__metadata__": {"format": "pt"}}  # as BFL ship it: no fluxion metadata
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section, as the safetensors writer does

    gen = torch.Generator().manual_seed(seed)
    chunk = 8 * MIB  # elements generated at a time: never more than ~50 MB of temporaries
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in entries:
            n = math.prod(shape)
            # norms near 1, everything else small: a forward pass stays finite
            scale, base = (0.05, 1.0) if name.endswith(".scale") else (0.02, 0.0)
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                t = torch.randn(m, generator=gen).mul_(scale).add_(base).to(torch.bfloat16)
                f.write(t.view(torch.int16).numpy().tobytes())
    os.replace(tmp, path)
    size = path.stat().st_size
    assert size == 8 + len(raw) + offset, "written size disagrees with the header"
    return size


# ---------------------------------------------------------------- measuring (runs in a fresh subprocess)


def measure(path: str, dtype_name: str) -> dict:
    import torch

    import fluxion

    torch.set_num_threads(2)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    before = rss_now()
    t0 = time.perf_counter()
    model = fluxion.load_transformer(path, dtype=dtype)
    load_s = time.perf_counter() - t0
    after_load_peak = peak_rss()
    after_load_rss = rss_now()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())

    # a small forward pass touches every weight
    c = model.config
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 16, 8
    img_ids = torch.zeros(n_img, 3)
    img_ids[:, 1] = torch.arange(n_img) // 4
    img_ids[:, 2] = torch.arange(n_img) % 4
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(
            torch.randn(1, n_img, c.in_channels, generator=g),
            img_ids,
            torch.randn(1, n_txt, c.context_in_dim, generator=g),
            torch.zeros(n_txt, 3),
            torch.tensor([0.5]),
            torch.randn(1, c.vec_in_dim, generator=g),
            torch.tensor([3.5]),
        )
    forward_s = time.perf_counter() - t0
    assert torch.isfinite(out.float()).all()
    return dict(
        dtype=dtype_name,
        rss_before=before,
        peak_after_load=after_load_peak,
        rss_after_load=after_load_rss,
        peak_after_forward=peak_rss(),
        weights_bytes=weights,
        parameters=sum(p.numel() for p in model.parameters()),
        load_s=load_s,
        forward_s=forward_s,
    )


def run_measurement(path: Path, dtype_name: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", str(path), "--dtype", dtype_name],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"measurement subprocess ({dtype_name}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--depth", type=int, default=2, help="double blocks (default 2)")
    ap.add_argument("--single", type=int, default=4, help="single blocks (default 4)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.measure:  # subprocess mode: one JSON line on stdout
        print(json.dumps(measure(args.measure, args.dtype)))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"synthetic-flux-d{args.depth}-s{args.single}-bf16.safetensors"
    try:
        t0 = time.perf_counter()
        size = write_checkpoint(path, args.depth, args.single)
        print(f"wrote {path} ({size / GIB:.2f} GiB) in {time.perf_counter() - t0:.1f}s", flush=True)
        if size < 2 * 10**9:
            raise SystemExit(f"the synthetic checkpoint is only {size / 1e9:.2f} GB: raise --depth/--single")

        rows = []
        for dtype_name in ("bf16", "fp32"):
            r = run_measurement(path, dtype_name)
            denom = size if dtype_name == "bf16" else r["weights_bytes"]
            rows.append((r, denom))

        print()
        print(f"checkpoint: {size / GIB:.2f} GiB bf16, {rows[0][0]['parameters'] / 1e9:.3f} B parameters "
              f"(hidden 3072, {args.depth} double + {args.single} single blocks)")
        print()
        print("| load | compared with | RSS before | peak after load | growth / compared | "
              "peak after forward | growth / compared | load s |")
        print("|---|---|---|---|---|---|---|---|")
        for r, denom in rows:
            label = "file size" if r["dtype"] == "bf16" else "fp32 weights"
            grow_load = r["peak_after_load"] - r["rss_before"]
            grow_fwd = r["peak_after_forward"] - r["rss_before"]
            print(
                f"| bf16 -> {r['dtype']} | {label} {denom / GIB:.2f} GiB | {r['rss_before'] / GIB:.2f} GiB "
                f"| {r['peak_after_load'] / GIB:.2f} GiB | {grow_load / denom:.3f} "
                f"| {r['peak_after_forward'] / GIB:.2f} GiB | {grow_fwd / denom:.3f} | {r['load_s']:.2f} |"
            )
        print()
        print("growth = peak RSS (VmHWM) - VmRSS right before load_transformer; target for bf16 -> bf16: <= 1.3 x file size")
    finally:
        if not args.keep:
            for p in (path, path.with_name(path.name + ".part")):
                if p.exists():
                    p.unlink()
        else:
            print(f"kept {path}")


if __name__ == "__main__":
    main()
