"""The training loop shared by every model kind: AdamW, warm-up, bf16 autocast, clipping, EMA,
atomic resumable checkpoints, a progress bar, a loss curve and sample grids."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..compute import resolve_bf16_autocast
from ..files import atomic_path
from .config import TrainConfig
from .state import EMA, check_resume, load_checkpoint, save_atomic

CHECKPOINT = "checkpoint.pt"


def make_task(cfg: TrainConfig):
    if cfg.kind == "autoencoder":
        from .autoencoder import AutoencoderTask

        return AutoencoderTask(cfg)
    if cfg.kind == "controlnet":
        from .controlnet import ControlNetTask

        return ControlNetTask(cfg)
    from .flux import FluxTask

    return FluxTask(cfg)


def plot_loss(history: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps, losses = zip(*history)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    k = max(1, len(losses) // 50)
    if len(losses) > k:
        smooth = [sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f"moving mean ({k})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)


# settings a resumed run must share with the saved one: the models' shapes and the data each step draws
RESUME_KEYS = ("kind", "seed", "batch_size", "autoencoder", "transformer", "t5", "clip", "max_sequence_length",
               "vae_path", "vae_init", "decoder_only")


def save_image_atomic(image, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp)


def step_generator(seed: int, step: int) -> torch.Generator:
    """Noise for step s depends only on (seed, s): a resumed run draws what an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Warmup, then constant, then (with decay_steps) a linear fall to zero over the last decay_steps steps.

    Warmup-stable-decay: a run can be extended by raising `steps`, resuming from any checkpoint taken before the
    decay began, and it follows the same schedule as a run started with the longer `steps`.
    """
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.decay_steps:
        lr *= min(1.0, (cfg.steps - step) / cfg.decay_steps)
    return lr


def train(cfg: TrainConfig, resume: bool = True, max_minutes: float | None = None, export_only: bool = False) -> dict:
    """Run (or resume) training to cfg.steps; returns a summary. Stops early, checkpointed, after max_minutes.

    `export_only` writes the export from the last checkpoint without training (e.g. of a run stopped early).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = cfg.run_dir
    state = load_checkpoint(run / CHECKPOINT) if resume else None
    if state is not None:  # before anything in the folder changes
        check_resume(state.get("config", {}), asdict(cfg), RESUME_KEYS, run / CHECKPOINT)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    task = make_task(cfg)
    modules = task.modules()
    optimizer = torch.optim.AdamW(task.trainable(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMA(task.ema_module(), cfg.ema_decay) if cfg.ema_decay > 0 else None
    step, history = 0, []
    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step, history = state["step"], state["history"]
        print(f"resumed {run / CHECKPOINT} at step {step}")

    def checkpoint():
        save_atomic({"modules": {n: m.state_dict() for n, m in modules.items()}, "optimizer": optimizer.state_dict(),
                     "ema": ema.state_dict() if ema else None, "step": step, "history": history,
                     "config": asdict(cfg)}, run / CHECKPOINT)
        plot_loss(history, run / "loss.png", f"{cfg.kind} training loss ({run.name})")

    def samples():
        target = ema.model if ema else task.ema_module()
        save_image_atomic(task.sample_grid(target, step), run / f"samples-{step:06d}.png")

    if export_only:
        if state is None:
            raise ValueError(f"{run / CHECKPOINT}: no checkpoint to export")
        if not cfg.export:
            raise ValueError("the config names no export folder")
        export(task, ema, cfg)
        return {"step": step, "finished": step >= cfg.steps, "loss": history[-1][1] if history else None}

    device_type = torch.device(cfg.device).type
    bf16 = resolve_bf16_autocast(cfg.bf16, cfg.device)
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.kind}", unit="step", dynamic_ncols=True)
    running = []
    for module in modules.values():
        module.train()
    stopped_early = False
    while step < cfg.steps:
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        with autocast():
            loss, logs = task.loss(step, step_generator(cfg.seed, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(task.trainable(), cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(task.ema_module(), step)
        step += 1
        running.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            history.append((step, sum(running) / len(running)))
            running = []
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", gnorm=f"{float(grad_norm):.2f}",
                        samples_per_s=f"{cfg.batch_size / (time.time() - t0):.1f}", **{k: f"{v:.4f}" for k, v in logs.items()})
        if step % cfg.checkpoint_every == 0:
            checkpoint()
        if cfg.sample_every and step % cfg.sample_every == 0:
            samples()
        if max_minutes is not None and time.time() - start > 60 * max_minutes and step < cfg.steps:
            stopped_early = True
            break
    bar.close()
    checkpoint()
    if not stopped_early:
        if cfg.export:  # before the last samples: the weights are what matters if anything fails after
            export(task, ema, cfg)
        samples()
    return {"step": step, "finished": not stopped_early, "loss": history[-1][1] if history else None}


def export(task, ema, cfg: TrainConfig) -> Path:
    """Write the model (EMA weights when kept) to cfg.export, replacing any previous export whole."""
    target = Path(cfg.export)
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    task.export(ema.model if ema else task.ema_module(), tmp)  # state dicts: safetensors copies off a GPU itself
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)
    print(f"exported {target}")
    return target
