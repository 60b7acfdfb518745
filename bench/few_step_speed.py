"""Seconds per image of a few-step student against its teacher, each at its own defaults, measured in one run with
the two alternating (so a busy machine slows both alike): a batch of eval prompts (as `fluxion eval` generates
them) and one image alone, end to end (text encoders, sampling, decoding) with the models loaded. #21's target is
a ratio of at least 10.

    .venv/bin/python bench/few_step_speed.py [--teacher models/fluxion-mini] [--student models/fluxion-mini-schnell]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from fluxion import FluxPipeline
from fluxion.eval.prompts import eval_set


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="models/fluxion-mini")
    ap.add_argument("--student", default="models/fluxion-mini-schnell")
    ap.add_argument("--batch", type=int, default=25, help="prompts per call (fluxion eval's batch)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels-first", action="store_true",
                    help="decode channels-first, as before the decoder ran channels-last on CPUs (bench/decoder_layout.py)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipes = {name: FluxPipeline.from_pretrained(path) for name, path in (("teacher", args.teacher),
                                                                         ("student", args.student))}
    prompts = [it.prompt for it in eval_set()[: args.batch]]
    cases = {"batch": prompts, "alone": prompts[:1]}
    times = {(name, case): [] for name in pipes for case in cases}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        pipe.vae.decoder.channels_last = False if args.channels_first else None
        pipe(prompts[:2], generator=torch.Generator().manual_seed(0))  # warm-up
    for r in range(args.repeats):
        for case, batch in cases.items():
            for name, pipe in pipes.items():  # alternate: teacher, student, teacher, ...
                gens = [torch.Generator().manual_seed(r * 1000 + i) for i in range(len(batch))]
                t0 = time.perf_counter()
                pipe(batch, generator=gens)
                times[name, case].append((time.perf_counter() - t0) / len(batch))
    print(f"{args.teacher} against {args.student}; {args.threads} threads; {platform.processor() or platform.machine()}, "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}; median of {args.repeats}; decoder "
          f"{'channels-first' if args.channels_first else 'channels-last'}\n")
    print("| case | teacher s/image | student s/image | teacher / student |\n|---|---:|---:|---:|")
    for case, batch in cases.items():
        t, s = (statistics.median(times[name, case]) for name in ("teacher", "student"))
        print(f"| {'batch of ' + str(len(batch)) if case == 'batch' else 'one image alone'} | {t:.4f} | {s:.4f} | "
              f"{t / s:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
