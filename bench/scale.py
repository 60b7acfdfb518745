"""Sequence-parallel scaling of one FLUX transformer step on this machine: 1 process vs 2 processes (gloo).

    .venv/bin/python bench/scale.py                      # 512x512, 1 double + 2 single blocks, float32
    .venv/bin/python bench/scale.py --size 1024          # 4096 image tokens: ~1 min per 1-thread step (estimated)
    .venv/bin/python bench/scale.py --quick              # 256x256, 1 repeat: checks that it runs
    .venv/bin/python bench/scale.py --size 512 --dtype bf16 --repeats 5

What runs, in one invocation, each a forward of one transformer step (no grad, batch 1) at the FLUX.1 layer
widths (hidden 3072, 24 heads of 128, RoPE axes (16, 56, 56), context 4096, vec 768, in_channels 64) with
`--double` + `--single` blocks of random weights (the same on every rank: one seed), `--size`² pixels
((size/16)² image tokens) plus `--text-tokens` text tokens:

  1 process x 1 thread, 1 process x 2 threads     the single-process peers (this process)
  2 processes x 1 thread: Ulysses-2, then Ring-2  torch.multiprocessing spawn on gloo, as the tests do;
                                                  `FluxTransformer.enable_parallelism(ContextParallelConfig(..))`

Per row: median wall seconds per step over `--repeats` (after one warm-up; for 2 processes a barrier starts each
step and the slower rank's time counts), the speed-up of each 2-process mode over both peers, and per step per
rank the communication computed (`fluxion.distributed.communication_bytes`) and counted by the collectives
(`Collectives.bytes_received`), and the wall time spent inside the collectives (a timer around them; on
2 processes it includes waiting for the other rank). Each 2-process row also checks its output against the
1-process output (max |difference|).

Below the table: what the same mechanism should cost on N GPUs at FLUX.1's full depth, computed from
`communication_bytes` and nominal link bandwidths: expected, not measured. Data-parallel training is checked for
equality (tests/train/test_distributed_training.py), not timed here.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

from fluxion.distributed import ContextParallelConfig, communication_bytes
from fluxion.eval.speed import markdown_table
from fluxion.model.transformer import FluxConfig, FluxTransformer

MIB = 2 ** 20
FULL_DOUBLE, FULL_SINGLE = 19, 38  # FLUX.1 depth
PUBLISHED_STEP_S = 6.71 / 28  # FLUX.1-dev, 28 steps, 1024², one H100 (xDiT's published table)
LINKS = {"NVLink (H100 SXM, ~450 GB/s per direction)": 450e9, "PCIe 4 x16 (~25 GB/s per direction)": 25e9}


# ---------------------------------------------------------------- the model and the inputs (every process)


def make_model(args) -> FluxTransformer:
    config = FluxConfig(depth=args.double, depth_single_blocks=args.single, guidance_embed=True)
    with torch.device("meta"):
        model = FluxTransformer(config)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)  # the same weights in every process
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(args.torch_dtype).eval()


def make_inputs(args) -> tuple:
    from fluxion.flow import image_ids, text_ids

    latent = args.size // 8
    n_img = (latent // 2) ** 2
    g = torch.Generator().manual_seed(1)
    dt = args.torch_dtype
    img = torch.randn(1, n_img, 64, generator=g).to(dt)
    txt = torch.randn(1, args.text_tokens, 4096, generator=g).to(dt)
    y = torch.randn(1, 768, generator=g).to(dt)
    return (img, image_ids(latent, latent), txt, text_ids(args.text_tokens), torch.tensor([0.75]), y,
            torch.tensor([3.5]))


def tokens(args) -> tuple[int, int]:
    return args.text_tokens, (args.size // 16) ** 2


# ---------------------------------------------------------------- one process


def single_process(args, threads: int, model, inputs) -> dict:
    torch.set_num_threads(threads)
    times, cpu = [], 0.0
    with torch.no_grad():
        for i in range(1 + args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(*inputs)
            if i:
                times.append(time.perf_counter() - t0)
                cpu += time.process_time() - c0
    return dict(seconds=statistics.median(times), out=out, cpu_share=cpu / (sum(times) * threads))


# ---------------------------------------------------------------- two processes


class _Timer:
    """Wraps a `Collectives` instance's methods to add up the wall time spent inside them (outermost call only:
    the all_gather fallback of all_to_all is not counted twice)."""

    def __init__(self, comm):
        self.seconds, self.depth = 0.0, 0
        for name in ("all_to_all", "all_gather", "all_reduce_sum"):
            setattr(comm, name, self._wrap(getattr(comm, name)))

    def _wrap(self, fn):
        def timed(*a, **k):
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - t0
        return timed


def _worker(rank: int, world: int, port: int, args, folder: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=1800))
    model, inputs = make_model(args), make_inputs(args)
    reference = torch.load(Path(folder) / "reference.pt")
    results = {}
    modes = {"Ulysses-2": ContextParallelConfig(ulysses_degree=world),
             "Ring-2": ContextParallelConfig(ring_degree=world)}
    with torch.no_grad():
        for name, config in modes.items():
            model.enable_parallelism(config=config)
            comms = model.parallel.comms
            timers = [_Timer(c) for c in comms if c.size > 1]  # not the degree-1 stand-in
            out = model(*inputs)  # warm-up
            err = (out.float() - reference.float()).abs().max().item()
            start_bytes = sum(c.bytes_received for c in comms)
            for t in timers:
                t.seconds = 0.0
            times, cpu, wall = [], 0.0, 0.0
            for _ in range(args.repeats):
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                model(*inputs)
                cpu += time.process_time() - c0
                wall += time.perf_counter() - t0
                t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slower rank sets the step time
                times.append(t.item())
            results[name] = dict(seconds=statistics.median(times), err=err,
                                 bytes=(sum(c.bytes_received for c in comms) - start_bytes) / args.repeats,
                                 comm_seconds=sum(t.seconds for t in timers) / args.repeats,
                                 cpu_share=cpu / max(1e-9, wall - sum(t.seconds for t in timers)),
                                 all_to_all=all(c.all_to_all_works for c in comms if c.size > 1))
    torch.save(results, Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(args, reference) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        torch.save(reference, Path(folder) / "reference.pt")
        mp.start_processes(_worker, args=(2, _free_port(), args, folder), nprocs=2, start_method="spawn",
                           join=True)
        return [torch.load(Path(folder) / f"rank{r}.pt") for r in range(2)]


# ---------------------------------------------------------------- report


def cpu_line() -> str:
    from fluxion import compute

    info = compute.cpu_info()
    return (f"CPU: {info.model}, {os.cpu_count()} logical CPUs, torch capability {info.torch_capability}, "
            f"oneDNN cap {info.onednn_max_isa or 'none'}; torch {torch.__version__}")


def expected_section(text_tokens: int) -> str:
    n_txt, n_img = text_tokens, (1024 // 16) ** 2
    depth = FULL_DOUBLE + FULL_SINGLE
    c = FluxConfig()
    rows = []
    for p in (2, 4, 8):
        for name, cfg in ((f"Ulysses-{p}", ContextParallelConfig(ulysses_degree=p)),
                          (f"Ring-{p}", ContextParallelConfig(ring_degree=p))):
            b = communication_bytes(cfg, 1, (n_txt, n_img), c.hidden_size, c.num_heads, depth, torch.bfloat16,
                                    c.out_channels)
            compute_s = PUBLISHED_STEP_S / p
            row = [name, f"{b / MIB:.0f}", f"{compute_s:.3f}"]
            for bw in LINKS.values():
                comm_s = b / bw
                row += [f"{comm_s:.4f}", f"{PUBLISHED_STEP_S / (compute_s + comm_s):.2f}×"]
            rows.append(row)
    header = ["mode", "MiB/step/rank", "compute s/rank"]
    for link in LINKS:
        short = link.split(" (")[0]
        header += [f"{short} comm s", f"{short} speed-up (no overlap)"]
    lt, li = -(-n_txt // 2), -(-n_img // 2)
    return (
        "### Expected on N GPUs, not measured: FLUX.1 full depth (19 double + 38 single = 57 attentions), "
        f"1024² ({n_img} image + {n_txt} text tokens), bf16, batch 1\n\n"
        + markdown_table(header, rows)
        + "\n\nFormulas (`communication_bytes`, bytes each rank receives per step):\n"
          "- local = B × H × (ceil(N_txt/P) + ceil(N_img/P)) × D × 2 bytes (one of q, k, v, out on a rank; "
          f"H = 24, D = 128); e.g. P = 2: 1 × 24 × ({lt} + {li}) × 128 × 2 = "
          f"{24 * (lt + li) * 128 * 2 / MIB:.1f} MiB\n"
          "- Ulysses-P per attention: 4 all-to-alls (q, k, v in, out back) of (P−1)/P × local; "
          "Ring-P per attention: an all-gather of K and V, 2 × (P−1) × local\n"
          "- per step: 57 × per-attention + (P−1) × ceil(N_img/P) × 64 × 2 (the final all-gather of the output)\n"
          f"- compute per rank = published 1-GPU step / P = {PUBLISHED_STEP_S:.3f} s / P (FLUX.1-dev, 28 steps in "
          "6.71 s on one H100, xDiT); comm s = bytes / link bandwidth per direction; "
          "speed-up = 1-GPU step / (compute + comm), with no overlap of the two and ideal 1/P compute\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512,
                    help="image side in pixels (multiple of 16; default 512: 1024 takes well over 5 min on 2 cores)")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--double", type=int, default=1, help="double blocks (default 1)")
    ap.add_argument("--single", type=int, default=2, help="single blocks (default 2)")
    ap.add_argument("--dtype", choices=["float32", "bf16"], default="float32")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per row, after 1 warm-up (default 3)")
    ap.add_argument("--quick", action="store_true", help="256x256, 64 text tokens, 1 repeat: checks that it runs")
    ap.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    args = ap.parse_args()
    if args.quick:
        args.size, args.text_tokens, args.repeats = 256, 64, 1
    if args.size % 16:
        ap.error("--size must be a multiple of 16")
    args.torch_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    command = "bench/scale.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    n_txt, n_img = tokens(args)
    t_start, load_start = time.time(), os.getloadavg()

    model, inputs = make_model(args), make_inputs(args)
    single = {threads: single_process(args, threads, model, inputs) for threads in (1, 2)}
    reference = single[1]["out"]
    del model
    pair = two_processes(args, reference)

    c = FluxConfig()
    depth = args.double + args.single
    rows = [[f"1 process × {t} thread{'s' if t > 1 else ''}", f"{single[t]['seconds']:.3f}", "", "", "", "", "",
             "", f"{100 * single[t]['cpu_share']:.0f}%"] for t in (1, 2)]
    for name in ("Ulysses-2", "Ring-2"):
        r0, r1 = pair[0][name], pair[1][name]
        s = r0["seconds"]  # the same on both ranks (all-reduced max)
        cfg = ContextParallelConfig(**({"ulysses_degree": 2} if name.startswith("U") else {"ring_degree": 2}))
        computed = communication_bytes(cfg, 1, (n_txt, n_img), c.hidden_size, c.num_heads, depth, args.torch_dtype,
                                       c.out_channels)
        measured = max(r0["bytes"], r1["bytes"])
        note = "" if r0["all_to_all"] else " (all_gather fallback)"
        rows.append([f"2 processes × 1 thread, {name}{note}", f"{s:.3f}",
                     f"**{single[1]['seconds'] / s:.2f}×**", f"**{single[2]['seconds'] / s:.2f}×**",
                     f"{computed / MIB:.1f}", f"{measured / MIB:.1f}",
                     f"{max(r0['comm_seconds'], r1['comm_seconds']):.3f}",
                     f"{max(r0['err'], r1['err']):.2g}",
                     f"{100 * min(r0['cpu_share'], r1['cpu_share']):.0f}%"])
    shares = [single[t]["cpu_share"] for t in (1, 2)] + [r[name]["cpu_share"] for r in pair
                                                            for name in ("Ulysses-2", "Ring-2")]
    header = ["run", "s/step (median)", "vs 1p×1t", "vs 1p×2t", "comm MiB/step/rank computed",
              "comm MiB/step/rank counted", "s/step in collectives (max rank)", "max |out − 1p|",
              "CPU share"]
    report = [
        f"`{command}`",
        cpu_line(),
        f"### Sequence-parallel inference, one transformer step, {args.size}² ({n_img} image + {n_txt} text tokens), "
        f"FLUX.1 widths (3072, 24 heads × 128), {args.double} double + {args.single} single blocks, random "
        f"weights, {args.dtype}, batch 1, no grad; median of {args.repeats} after 1 warm-up; 2 processes on gloo\n\n"
        + markdown_table(header, rows),
        "Collective time is wall time inside the collectives on a rank, waiting for the other rank included. "
        "CPU share: the process's CPU seconds over (wall seconds × its threads) in the timed steps (2 processes: "
        "the lower rank, wall time in collectives left out); well under 100% means other processes took CPU time. "
        f"1-minute load average before the run (lags by a minute): {load_start[0]:.2f}, {os.cpu_count()} CPUs."
        + (" **Some row got under 90% of its CPUs: other processes were busy, these figures are not clean.**"
           if min(shares) < 0.9 else ""),
        expected_section(512),
        f"({time.time() - t_start:.0f} s in all)",
    ]
    text = "\n\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
