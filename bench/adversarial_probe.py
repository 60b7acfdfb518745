"""Two probes of the adversarial distillation (`fluxion.train.adversarial`) on fluxion-mini's teacher pairs.

--heads: can the discriminator heads tell the teacher's sample from the student's one-step sample at all? The
student is frozen; fresh heads train alone for --steps steps with its inputs from one student level and both
samples noised again to one level; prints the heads' accuracy (real > 0, fake < 0) over the last 50 steps.

--balance: how strong is the student's adversarial gradient against its regression's? With the heads of a run's
checkpoint, the gradient norm of each term on the student's weights, per student level (weight 1 each).

    .venv/bin/python bench/adversarial_probe.py --heads --student-level 1 --renoise 0.3
    .venv/bin/python bench/adversarial_probe.py --balance --checkpoint runs/mini-distill-adversarial/checkpoint.safetensors
"""
from __future__ import annotations

import argparse

import torch

from fluxion.train.adversarial import AdversarialTask
from fluxion.train.config import load_config
from fluxion.train.state import load_checkpoint
from fluxion.train.trainer import step_generator


def heads_accuracy(task, student_level: float, renoise: float, steps: int, lr: float) -> list[float]:
    task.student.requires_grad_(False)
    opt = torch.optim.AdamW(task.heads.parameters(), lr=lr, betas=(0.5, 0.99))
    accs = []
    for step in range(steps):
        rows = task.batch(step, step_generator(1, step))
        rows["sigma"] = torch.full_like(rows["sigma"], student_level)
        rows["adv_sigma"] = torch.full_like(rows["adv_sigma"], renoise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p = task.parts(rows)
        opt.zero_grad()
        p["disc"].mean().backward()
        opt.step()
        accs.append(((p["real"] > 0).float().mean() + (p["fake"] < 0).float().mean()).item() / 2)
    return accs


def gradient_balance(task, batches: int = 3) -> dict[float, tuple[float, float]]:
    out = {}
    for level in task.levels.tolist():
        norms = {}
        for part in ("reg", "gen"):
            total = 0.0
            for k in range(batches):
                rows = task.batch(k, step_generator(5, k))
                rows["sigma"] = torch.full_like(rows["sigma"], level)
                task.zero_grad(set_to_none=True)
                task.parts(rows)[part].mean().backward()
                total += sum(float(p.grad.pow(2).sum()) for p in task.student.parameters() if p.grad is not None) ** 0.5
            norms[part] = total / batches
        out[level] = (norms["reg"], norms["gen"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/mini-distill-adversarial.yaml")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--heads", action="store_true")
    mode.add_argument("--balance", action="store_true")
    ap.add_argument("--student-level", type=float, default=1.0)
    ap.add_argument("--renoise", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--checkpoint", default=None, help="--balance: the run whose heads to use")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = AdversarialTask(load_config(args.config, []))
    if args.heads:
        accs = heads_accuracy(task, args.student_level, args.renoise, args.steps, args.lr)
        print(f"student level {args.student_level}, re-noised to {args.renoise}: heads' accuracy over the last 50 of "
              f"{args.steps} steps {sum(accs[-50:]) / len(accs[-50:]):.3f}")
        return
    if args.checkpoint is None:
        ap.error("--balance needs --checkpoint (a run's heads)")
    task.load_state_dict(load_checkpoint(args.checkpoint)["model"], strict=False)
    print("| student level | regression gradient | adversarial gradient | ratio |\n|---:|---:|---:|---:|")
    for level, (reg, gen) in gradient_balance(task).items():
        print(f"| {level:.2f} | {reg:.3f} | {gen:.3f} | {gen / reg:.1f} |")


if __name__ == "__main__":
    main()
