"""The one training loop, for every kind of model, on one process or many (accelerate: DDP, FSDP).

A task (`flux.FluxTask`, `autoencoder.AutoencoderTask`, `lora.LoraTask`, `controlnet.ControlNetTask`) is an
`nn.Module` with:

- `settings`: a `LoopSettings` (steps, global batch, micro-batch, optimizer, schedule, checkpoints, samples);
- `batch(step, generator) -> dict`: the step's whole batch over all processes, every random draw included
  (noise, noise levels, caption dropout), a pure function of (seed, step): every process draws the same batch and
  takes its own rows, so a run on N processes sees exactly the data of a run on one, and a resumed run the data of
  an uninterrupted one;
- `forward(rows) -> (per-row losses [n], logs)`: the objective is the mean of the per-row losses over the
  global batch (a task folds any weighting, e.g. DreamBooth's prior-preservation weight, into its rows);
- `ema_module()`, `sample_grid(module, step)` (an image or None), `export(module, folder)`;
- optionally `lr_scale(name)`: a parameter's learning rate as a multiple of the schedule's (a discriminator's).

Launch: `fluxion train CONFIG` on one process; `torchrun --nproc-per-node N -m fluxion.cli train CONFIG` (or
`accelerate launch --multi_gpu --num_processes N ...`) on N. On CPUs the processes talk over gloo.

Checkpoints (`state.py`) hold full tensors keyed by parameter name, so a run resumes on any number of processes
from a checkpoint written by any number. Only the main process writes anything.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..compute import resolve_bf16_autocast
from ..files import atomic_path
from .state import EMA, check_resume, load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class LoopSettings:
    output: str  # the run folder: checkpoint, config, loss curve, samples
    steps: int
    batch_size: int  # rows per optimizer step, over all processes together
    micro_batch: int  # rows per forward on one process; gradient accumulation covers the rest of its share
    lr: float
    warmup_steps: int = 0
    decay_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    checkpoint_every: int = 200
    sample_every: int = 0
    log_every: int = 10
    seed: int = 0
    bf16: bool = False  # bf16 autocast (resolved: see fluxion.compute.resolve_bf16_autocast)
    export: str | None = None  # folder the finished model goes to
    export_at_checkpoints: bool = False  # refresh the export at every checkpoint too (LoRA adapters: small)
    samples_name: str = "samples"
    title: str = "train"
    unused_parameters: bool = False  # some trainable weights never get a gradient (a ControlNet's last text-stream
    # layers feed nothing): DDP must look for them each step, and they have no optimizer state


def learning_rate(cfg, step: int) -> float:
    """Warmup, then constant, then (with decay_steps) a linear fall to zero over the last decay_steps steps.

    Warmup-stable-decay: a run can be extended by raising `steps`, resuming from any checkpoint taken before the
    decay began, and it follows the same schedule as a run started with the longer `steps`.
    """
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.decay_steps:
        lr *= min(1.0, (cfg.steps - step) / cfg.decay_steps)
    return lr


def param_groups(task) -> list[dict]:
    """The trainable weights, one optimizer group per learning-rate multiple (`task.lr_scale(name)`, 1 if the task
    has none: a GAN's discriminator may learn faster than its generator)."""
    scale = getattr(task, "lr_scale", lambda name: 1.0)
    groups: dict[float, list] = {}
    for name, p in task.named_parameters():
        if p.requires_grad:
            groups.setdefault(float(scale(name)), []).append(p)
    return [{"params": ps, "lr_scale": k} for k, ps in groups.items()]


def step_generator(seed: int, step: int) -> torch.Generator:
    """Noise for step s depends only on (seed, s): a resumed run draws what an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def rows_of(batch: dict, start: int, stop: int) -> dict:
    """Rows start..stop of every per-row entry (tensors, arrays, lists); other entries as they are."""
    return {k: v[start:stop] if hasattr(v, "__getitem__") and not isinstance(v, (str, dict)) else v
            for k, v in batch.items()}


def accelerator_for(device: str = "cpu", unused_parameters: bool = False):
    """accelerate's Accelerator: reads torchrun's / accelerate launch's environment (one process without it).

    bf16 autocast is ours (`fit`), not accelerate's `mixed_precision`: accelerate's state is process-wide and
    refuses a second run with another setting in the same process (a notebook, the tests)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(cpu=torch.device(device).type == "cpu",
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused_parameters)])


def fit(build_task, settings: LoopSettings, config: dict, resume_keys: tuple[str, ...], resume: bool = True,
        max_minutes: float | None = None, export_only: bool = False, threads: int | None = None,
        device: str = "cpu", until: int | None = None) -> dict:
    """Run (or resume) `build_task(device)`'s training to settings.steps; returns a summary. Stops early,
    checkpointed, after max_minutes or at step `until` (a recipe in phases: change a setting from that step on);
    `export_only` writes the export from the last checkpoint without training."""
    from accelerate.utils import DistributedType
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if threads:
        torch.set_num_threads(threads)
    s = settings
    run = Path(s.output)
    acc = accelerator_for(device, s.unused_parameters)
    autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=s.bf16)
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    sharded = acc.distributed_type == DistributedType.FSDP
    if until is not None and until < 1:
        raise ValueError(f"until={until}: the step to stop at must be a positive step number")
    if s.batch_size % world:
        raise ValueError(f"batch_size {s.batch_size} does not split over {world} processes: use a multiple of "
                         f"{world} (every process takes an equal share of the global batch)")
    if sharded and s.ema_decay > 0:
        raise ValueError("EMA is not supported with FSDP (each process holds a shard): set ema_decay: 0")
    state = load_checkpoint(run / CHECKPOINT) if resume else None
    if state is not None:  # before anything in the folder changes
        check_resume(state["info"].get("config", {}), config, resume_keys, run / CHECKPOINT)
    if export_only and (state is None or not s.export):
        raise ValueError(f"{run / CHECKPOINT}: no checkpoint to export" if state is None else
                         "the config names no export folder")
    if main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(s.seed)
    task = build_task(acc.device)
    names = [n for n, p in task.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(task), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    ema = EMA(task.ema_module(), s.ema_decay) if s.ema_decay > 0 and main else None
    step, history = 0, []

    # ---- distributed: wrap (DDP / FSDP per the launch config), load full state, gather full state to save
    model, optimizer = acc.prepare(task, optimizer)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if state is not None:
        saved = state.get("model", {})
        bad = sorted(n for n in names if n not in saved or saved[n].shape != dict(task.named_parameters())[n].shape)
        if bad:
            raise ValueError(f"{run / CHECKPOINT}: cannot resume: its tensors do not fit this run's model "
                             f"({len(bad)} differ or are missing, e.g. {bad[0]}); start over (--fresh)")
        set_model_state_dict(model, {n: saved[n] for n in names}, options=StateDictOptions(full_state_dict=True,
                                                                                           strict=False))
        if not export_only:
            set_optimizer_state_dict(model, optimizer.optimizer, optimizer_from_tensors(
                state.get("optimizer", {}), state["info"]["param_groups"]),
                options=StateDictOptions(full_state_dict=True, strict=False))  # weights with no gradient: no state
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        step, history = state["info"]["step"], [tuple(h) for h in state["info"]["history"]]
        if main:
            print(f"resumed {run / CHECKPOINT} at step {step} ({world} process{'es' if world > 1 else ''})")
    unwrapped = acc.unwrap_model(model)

    def trained():  # what samples and exports are made of
        return ema.model if ema is not None else unwrapped.ema_module()

    def write_export():
        if Path(s.export).resolve() == run.resolve():  # a file the task writes (atomically) into the run folder
            unwrapped.export(trained(), run)
        else:
            export(unwrapped, trained(), s.export)

    def checkpoint():
        msd, osd = get_state_dict(model, optimizer.optimizer, options=full)  # collective under FSDP: every rank
        if main:
            opt_tensors, groups = optimizer_to_tensors(osd)
            tensors = {"model": {n: msd[n] for n in names}, "optimizer": opt_tensors}
            if ema is not None:
                tensors["ema"] = ema.state_dict()
            save_checkpoint(run / CHECKPOINT, tensors, {"step": step, "history": history, "config": config,
                                                        "param_groups": groups, "processes": world})
            plot_loss(history, run / "loss.png", f"{s.title} training loss ({run.name})")
            if s.export_at_checkpoints and s.export:
                write_export()
        acc.wait_for_everyone()

    def samples():
        if main and not sharded:  # a sharded model samples through its full weights: --export-only, then generate
            image = unwrapped.sample_grid(trained(), step)
            if image is not None:
                save_image_atomic(image, run / f"{s.samples_name}-{step:06d}.png")

    if export_only:
        if main:
            write_export()
        return {"step": step, "finished": step >= s.steps, "loss": history[-1][1] if history else None,
                "processes": world, "main": main}

    share = s.batch_size // world
    mine = range(rank * share, (rank + 1) * share)  # this process's rows of every global batch
    chunks = [(a, min(a + s.micro_batch, mine.stop)) for a in range(mine.start, mine.stop, s.micro_batch)]
    start = time.time()
    bar = tqdm(total=s.steps, initial=step, desc=s.title, unit="step", dynamic_ncols=True, disable=not main)
    running = []
    model.train()
    end = s.steps if until is None else min(until, s.steps)
    while step < end:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(s, step) * group.get("lr_scale", 1.0)  # older checkpoints: none
        t0 = time.time()
        batch = unwrapped.batch(step, step_generator(s.seed, step))  # the global batch, the same on every process
        total = torch.zeros((), device=acc.device)
        for k, (a, b) in enumerate(chunks):  # gradient accumulation: DDP synchronises on the last chunk only
            with acc.no_sync(model) if k < len(chunks) - 1 else contextlib.nullcontext():
                with autocast:
                    losses, logs = model(rows_of(batch, a, b))
                loss = losses.float().sum() / share  # summed over chunks: this process's mean; DDP averages those
                acc.backward(loss)
            total += loss.detach()
        grad_norm = acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(unwrapped.ema_module(), step)
        step += 1
        mean = acc.reduce(total, "mean").item() if world > 1 else total.item()  # the global batch's loss
        running.append(mean)
        if step % s.log_every == 0 or step == s.steps:
            history.append((step, sum(running) / len(running)))
            running = []
        bar.update(1)
        bar.set_postfix(loss=f"{mean:.4f}", gnorm=f"{float(grad_norm):.2f}",
                        samples_per_s=f"{s.batch_size / (time.time() - t0):.1f}",
                        **{k: f"{v:.4f}" for k, v in logs.items()})
        if step % s.checkpoint_every == 0:
            checkpoint()
        if s.sample_every and step % s.sample_every == 0:
            samples()
        if max_minutes is not None and step < s.steps:
            late = torch.tensor(float(time.time() - start > 60 * max_minutes), device=acc.device)
            if (acc.reduce(late, "max") if world > 1 else late).item():  # every process stops at the same step
                break
    bar.close()
    checkpoint()
    finished = step >= s.steps  # not stopped by max_minutes or `until`
    if finished:
        if main and s.export and not sharded:  # before the last samples: the weights matter if anything fails after
            write_export()
        if sharded and main and s.export:
            print("FSDP run: write the export with `fluxion train CONFIG --export-only` (one process)")
        samples()
    acc.wait_for_everyone()
    return {"step": step, "finished": finished, "loss": history[-1][1] if history else None,
            "processes": world, "main": main}


def export(task, module, folder: str | os.PathLike) -> Path:
    """`task.export(module, tmp)`, then tmp replaces `folder` whole (a kill leaves the old export or the new one)."""
    target = Path(folder)
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    task.export(module, tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)
    print(f"exported {target}")
    return target


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


def save_image_atomic(image, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp)


# ------------------------------------------------------------------------------------------ config-file runs


def make_task(cfg, device: torch.device | str = "cpu"):
    """The task a `fluxion train` config names (kind: flux, autoencoder, controlnet or distill)."""
    if cfg.kind == "autoencoder":
        from .autoencoder import AutoencoderTask

        return AutoencoderTask(cfg, device)
    if cfg.kind == "controlnet":
        from .controlnet import ControlNetTask

        return ControlNetTask(cfg, device)
    if cfg.kind == "distill" and cfg.method == "adversarial":
        from .adversarial import AdversarialTask

        return AdversarialTask(cfg, device)
    if cfg.kind == "distill" and cfg.method == "reflow":
        from .reflow import ReflowTask

        return ReflowTask(cfg, device)
    if cfg.kind == "distill":
        from .distill import GuidanceDistillTask

        return GuidanceDistillTask(cfg, device)
    from .flux import FluxTask

    return FluxTask(cfg, device)


# settings a resumed run must share with the saved one: the models' shapes and the data each step draws
RESUME_KEYS = ("kind", "seed", "batch_size", "autoencoder", "transformer", "t5", "clip", "max_sequence_length",
               "vae_path", "vae_init", "decoder_only", "base_model", "controlnet", "canny_low", "canny_high",
               "teacher", "method", "num_pairs", "pairs")


def train(cfg, resume: bool = True, max_minutes: float | None = None, export_only: bool = False,
          until: int | None = None) -> dict:
    """`fluxion train CONFIG`: the task the config names, through `fit`."""
    from dataclasses import asdict

    bf16 = bool(resolve_bf16_autocast(cfg.bf16, cfg.device))
    settings = LoopSettings(
        output=cfg.output, steps=cfg.steps, batch_size=cfg.batch_size,
        micro_batch=math.ceil(cfg.batch_size / cfg.grad_accum), lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_steps, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        ema_decay=cfg.ema_decay, checkpoint_every=cfg.checkpoint_every, sample_every=cfg.sample_every,
        log_every=cfg.log_every, seed=cfg.seed, bf16=bf16, export=cfg.export, title=f"train {cfg.kind}",
        unused_parameters=cfg.kind == "controlnet")
    return fit(lambda device: make_task(cfg, device), settings, asdict(cfg), RESUME_KEYS, resume=resume,
               max_minutes=max_minutes, export_only=export_only, threads=cfg.threads, device=cfg.device, until=until)
