"""Is a reflow student short of pairs or short of capacity? Its loss on the pairs it was trained on against its
loss on new pairs of the same teacher (indices past the training set, drawn exactly as the training pairs), at
each noise level its few-step sampler visits and over the whole U-shaped density. Train loss well below new-pair
loss means more pairs would help; the two level means the student fits what it can and more pairs will not.

    .venv/bin/python bench/reflow_fit.py --student models/fluxion-mini-schnell [--pairs runs/mini-distill-reflow/pairs]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fluxion import FluxPipeline
from fluxion.data.pairs import load_pairs, teacher_samples
from fluxion.flow import get_schedule, image_ids, noised, sample_sigmas, velocity_target
from fluxion.train.reflow import pseudo_huber_per_row


def losses(student, pipe, noise, sample, prompts, sigmas: torch.Tensor, huber_c: float) -> float:
    ids = image_ids(pipe.defaults.sample_size, pipe.defaults.sample_size, "cpu")
    out = []
    with torch.inference_mode():
        for k in range(0, len(prompts), 64):
            sl = slice(k, k + 64)
            txt, pooled, txt_ids = pipe.encode_prompt(prompts[sl], max_sequence_length=pipe.defaults.max_sequence_length)
            z, x, s = noise[sl], sample[sl], sigmas[sl]
            pred = student(noised(x, z, s), ids, txt, txt_ids, s, pooled)
            out.append(pseudo_huber_per_row(pred, velocity_target(x, z), huber_c))
    return torch.cat(out).mean().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="models/fluxion-mini-schnell")
    ap.add_argument("--pairs", default="runs/mini-distill-reflow/pairs")
    ap.add_argument("--count", type=int, default=512, help="pairs of each kind scored")
    ap.add_argument("--huber-c", type=float, default=0.03)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.pairs)
    manifest = json.loads((folder / "manifest.json").read_text())
    trained = len(load_pairs(folder)[2])
    teacher = FluxPipeline.from_pretrained(manifest["teacher"])
    teacher.set_progress_bar_config(disable=True)
    student_pipe = FluxPipeline.from_pretrained(args.student)
    student = student_pipe.transformer.eval()
    seen = [t[: args.count] for t in load_pairs(folder, args.count)]
    new = teacher_samples(teacher, range(trained, trained + args.count), manifest["seed"], **manifest["call"])
    tokens = (student_pipe.defaults.sample_size // 2) ** 2  # the image sequence a dynamic shift would read
    levels = get_schedule(student_pipe.defaults.num_inference_steps, tokens, student_pipe.schedule)[:-1]
    print(f"{args.student}; {args.count} trained pairs (of {trained}) against {args.count} new pairs of "
          f"{manifest['teacher']}; pseudo-Huber loss (c {args.huber_c})\n")
    print("| noise level | trained pairs | new pairs | new / trained |\n|---|---:|---:|---:|")
    u = sample_sigmas(args.count, "u_shaped", torch.Generator().manual_seed(0))
    for name, s in [(f"{v:.2f}", torch.full((args.count,), float(v))) for v in levels] + [("U-shaped", u)]:
        a = losses(student, student_pipe, *seen, s, args.huber_c)
        b = losses(student, student_pipe, *new, s, args.huber_c)
        print(f"| {name} | {a:.4f} | {b:.4f} | {b / a:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
