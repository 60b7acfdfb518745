"""Training configs: one dataclass, read from YAML, with `--set key=value` overrides."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..files import read_text


def check_numbers(cfg, positive=(), non_negative=(), at_least_one=(), finite=()) -> None:
    """One ValueError naming the first setting that is not a finite number in its range (0 is a value, not
    "unset": a batch of 0 would train NaN, a checkpoint every 0 steps divide by zero)."""
    rules = [(n, "> 0", lambda v: v > 0) for n in positive] + [(n, ">= 0", lambda v: v >= 0) for n in non_negative]
    rules += [(n, ">= 1 (a whole number)", lambda v: v >= 1 and float(v).is_integer()) for n in at_least_one]
    rules += [(n, "finite", lambda v: True) for n in finite]
    for name, want, ok in rules:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise ValueError(f"{name} must be a number {want}, got {v!r}")


@dataclass
class TrainConfig:
    kind: str  # "autoencoder" | "flux" | "controlnet" (ControlNetTrainConfig) | "distill" (DistillConfig)
    output: str  # run folder: checkpoint, logs, samples, export
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32  # rows per optimizer step, over all processes together
    grad_accum: int = 1  # split each process's share into this many forwards (memory), one optimizer step
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    decay_steps: int = 0  # linear decay to 0 over the last N steps (warmup-stable-decay); 0 keeps lr constant
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables EMA
    bf16: bool | str = "auto"  # bf16 autocast: "auto" where bf16 is fast (CUDA, CPUs with bf16 units), or true / false
    checkpoint_every: int = 200
    sample_every: int = 500
    log_every: int = 10
    threads: int | None = None
    device: str = "cpu"  # "cuda" trains on a GPU (bf16 autocast there too)
    data_workers: int = 0  # processes rendering batches ahead; a GPU needs several to be kept busy
    # autoencoder
    autoencoder: dict = field(default_factory=dict)
    kl_weight: float = 1e-6
    vae_init: str | None = None  # start from this trained autoencoder (diffusers vae/ folder or ae.safetensors)
    decoder_only: bool = False  # train the decoder alone: the encoder, hence the latent space, stays as it was
    # flux
    transformer: dict = field(default_factory=dict)
    t5: dict = field(default_factory=dict)
    clip: dict = field(default_factory=dict)
    vae_path: str | None = None  # a trained autoencoder (diffusers vae/ folder or ae.safetensors)
    max_sequence_length: int = 32
    caption_dropout: float = 0.1
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss_weighting: str = "none"
    sample_prompts: list = field(default_factory=list)
    sample_steps: int = 20
    sample_cfg: float = 1.0
    defaults: dict = field(default_factory=dict)  # `_fluxion_defaults` written into the exported model_index.json
    export: str | None = None  # where to write the diffusers-layout model at the end

    def __post_init__(self):
        if self.kind not in ("autoencoder", "flux"):
            raise ValueError(f"config kind must be 'autoencoder' or 'flux', got {self.kind!r}")
        if self.decoder_only and not self.vae_init:
            raise ValueError("decoder_only needs vae_init: the trained autoencoder whose decoder to go on training")
        if self.kind == "flux" and not self.vae_path:
            raise ValueError("a flux config needs vae_path: the trained autoencoder to encode images with")
        if not (self.bf16 in (True, False) or isinstance(self.bf16, str) and self.bf16.lower() == "auto"):
            raise ValueError(f"bf16 must be auto, true or false, got {self.bf16!r}")
        self.betas = tuple(self.betas)
        self.lr = float(self.lr)
        self.kl_weight = float(self.kl_weight)
        check_numbers(self, positive=("lr", "grad_clip", "logit_std"),
                      non_negative=("weight_decay", "warmup_steps", "decay_steps", "sample_every", "data_workers",
                                    "kl_weight", "ema_decay"),
                      at_least_one=("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "max_sequence_length",
                                    "sample_steps"),
                      finite=("logit_mean", "sample_cfg"))
        if self.threads is not None:
            check_numbers(self, at_least_one=("threads",))
        if not 0 <= self.caption_dropout < 1 or not self.ema_decay < 1:
            raise ValueError(f"caption_dropout and ema_decay must be in [0, 1), got {self.caption_dropout} and "
                             f"{self.ema_decay}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output)


def _parse_value(text: str):
    return yaml.safe_load(text)


def load_config(path: str, overrides: list[str] | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(read_text(path, "config")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]} {getattr(e, 'problem_mark', '') or ''})"
                         .rstrip()) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config is a YAML mapping of keys to values, got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        raw[key.strip()] = _parse_value(value)
    cls = TrainConfig
    if raw.get("kind") == "controlnet":  # its own fields (base model, net size, edge thresholds)
        from .controlnet import ControlNetTrainConfig as cls
    elif raw.get("kind") == "distill":  # its own fields (teacher, method, guidance range)
        from .distill import DistillConfig as cls
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; known: {sorted(known)}")
    return cls(**raw)
