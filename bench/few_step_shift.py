"""Where should a few-step model's steps fall? Eval accuracy at N steps for several schedule shifts (#21).

The schedule is diffusers' for a static shift s (`fluxion.flow.get_schedule`): sigmas linspace(1, 1/N, N) mapped
to s*t / (1 + (s-1)*t), so a shift above 1 spends more of the N steps at high noise, where the layout is decided.
Each row replaces the folder's own schedule with a static shift, so the sweep applies to any model; the chosen
shift goes into the distillation config (`student_shift`), which writes it into the exported scheduler config.

    .venv/bin/python bench/few_step_shift.py --model runs/mini-distill-reflow/export [--steps 4] [--shifts 1,2,3,6]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from fluxion import FluxPipeline
from fluxion.eval.prompts import eval_set
from fluxion.eval.report import accuracy_table
from fluxion.eval.run import generate_items
from fluxion.eval.scorer import score
from fluxion.flow import get_schedule


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--shifts", default="0.6,1,1.5,2,3,4,6,10")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = FluxPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    tokens = (pipe.defaults.sample_size // 2) ** 2
    items = eval_set()
    rows = []
    for shift in (float(s) for s in args.shifts.split(",")):
        pipe.schedule = dataclasses.replace(pipe.schedule, use_dynamic_shifting=False, shift=shift)
        sigmas = get_schedule(args.steps, tokens, pipe.schedule)[:-1].tolist()  # what the pipeline will run
        images = generate_items(pipe, items, num_inference_steps=args.steps)
        rows.append((shift, sigmas, accuracy_table([(it, score(im, it.prompt)) for it, im in zip(items, images)])))
    kinds = list(rows[0][2])
    print(f"{args.model}: {args.steps} steps, no CFG unless the folder says so, {len(items)} prompts\n")
    print("| shift | sigmas | " + " | ".join(kinds) + " |\n|---:|---|" + "---:|" * len(kinds))
    for shift, sigmas, acc in rows:
        print(f"| {shift:g} | {', '.join(f'{s:.2f}' for s in sigmas)} | "
              + " | ".join(f"{100 * acc[k]:.1f}%" for k in kinds) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
