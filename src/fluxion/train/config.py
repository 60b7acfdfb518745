"""Training configs: one dataclass, read from YAML, with `--set key=value` overrides."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..data.shapes import KIND_PROBS, check_kind_probs
from ..files import read_text
from ..flow import SIGMA_DENSITIES


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
    init_from: str | None = None  # a trained model folder to start the transformer and text encoders from
    text_role_weight: float = 0.0  # weight of the text encoder's word-role loss (fluxion.data.shapes.word_roles)
    kind_probs: tuple = KIND_PROBS  # shapes-world training mix: single, count, relation shares
    shape_only_captions: float = 0.0  # chance a single/count caption leaves out the colour (fluxion.data.shapes.caption)
    off_palette_shapes: float = 0.0  # chance such a scene is drawn in an off-palette colour (shapes.make_batch)

    def __post_init__(self):
        if type(self) is TrainConfig and self.kind not in ("autoencoder", "flux"):  # subclasses check their own
            raise ValueError(f"config kind must be 'autoencoder' or 'flux', got {self.kind!r}")
        if self.decoder_only and not self.vae_init:
            raise ValueError("decoder_only needs vae_init: the trained autoencoder whose decoder to go on training")
        if self.kind != "autoencoder" and not self.vae_path:
            raise ValueError(f"a {self.kind} config needs vae_path: the trained autoencoder to encode images with")
        if not (self.bf16 in (True, False) or isinstance(self.bf16, str) and self.bf16.lower() == "auto"):
            raise ValueError(f"bf16 must be auto, true or false, got {self.bf16!r}")
        self.betas = tuple(self.betas)
        self.kind_probs = check_kind_probs(self.kind_probs)
        for name, example in (("shape_only_captions", 0.25), ("off_palette_shapes", 0.5)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a chance in [0, 1] (e.g. {example}), got {value!r}")
            setattr(self, name, float(value))
        if self.off_palette_shapes > 0 and self.shape_only_captions == 0:
            raise ValueError("off_palette_shapes recolours scenes whose caption names no colour, so it needs "
                             "shape_only_captions > 0 (e.g. 0.25); with none it would do nothing")
        self.lr = float(self.lr)
        self.kl_weight = float(self.kl_weight)
        check_numbers(self, positive=("lr", "grad_clip", "logit_std"),
                      non_negative=("weight_decay", "warmup_steps", "decay_steps", "sample_every", "data_workers",
                                    "kl_weight", "ema_decay", "text_role_weight"),
                      at_least_one=("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "max_sequence_length",
                                    "sample_steps"),
                      finite=("logit_mean", "sample_cfg"))
        densities = SIGMA_DENSITIES + (("student_schedule",) if self.kind == "distill" else ())
        if self.timestep_sampling not in densities:
            raise ValueError(f"timestep_sampling must be one of {', '.join(densities)}, got {self.timestep_sampling!r}")
        if self.init_from is not None and not (Path(self.init_from) / "transformer").is_dir():
            raise ValueError(f"init_from must be a trained model folder (diffusers layout, with transformer/), got "
                             f"{self.init_from!r}")
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
    cls = {"controlnet": ControlNetTrainConfig, "distill": DistillConfig}.get(raw.get("kind"), TrainConfig)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; known: {sorted(known)}")
    return cls(**raw)


# ------------------------------------------------------------------ kinds with their own settings


@dataclass
class ControlNetTrainConfig(TrainConfig):
    """TrainConfig with `kind: controlnet`, plus the base model, the net's size and the edge thresholds. The
    trainer's own settings (lr, steps, EMA, device, ...) mean what they mean for every other kind."""

    base_model: str = "models/fluxion-mini"  # the frozen FLUX folder the net is made for
    controlnet: dict = field(default_factory=dict)  # depth (double blocks, default 2), depth_single_blocks (0)
    canny_low: float = 50
    canny_high: float = 200
    guidance: float = 3.5  # fed to a dev-style base model's guidance embedder (fluxion-mini has none)

    def __post_init__(self):
        if self.kind != "controlnet":
            raise ValueError(f"a ControlNet config has kind 'controlnet', got {self.kind!r}")
        unknown = sorted(set(self.controlnet) - {"depth", "depth_single_blocks"})
        if unknown:
            raise ValueError(f"controlnet: unknown keys {unknown}; known: ['depth', 'depth_single_blocks']")
        if self.vae_path is None:  # the base model's own VAE
            self.vae_path = str(Path(self.base_model) / "vae")
        super().__post_init__()
        self.canny_low, self.canny_high = float(self.canny_low), float(self.canny_high)
        check_numbers(self, non_negative=("canny_low", "canny_high"), finite=("guidance",))
        if self.canny_low > self.canny_high:
            raise ValueError(f"canny_low ({self.canny_low}) must not exceed canny_high ({self.canny_high})")
        depth, single = self.net_depths
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"controlnet.depth must be a whole number >= 1, got {depth!r}")
        if isinstance(single, bool) or not isinstance(single, int) or single < 0:
            raise ValueError(f"controlnet.depth_single_blocks must be a whole number >= 0, got {single!r}")

    @property
    def net_depths(self) -> tuple[int, int]:
        return self.controlnet.get("depth", 2), self.controlnet.get("depth_single_blocks", 0)


def load_controlnet_config(path: str, overrides: list[str] | None = None) -> ControlNetTrainConfig:
    """A `kind: controlnet` YAML config, with `--set key=value` overrides (`fluxion.train.config.load_config`)."""
    cfg = load_config(path, overrides)
    if not isinstance(cfg, ControlNetTrainConfig):
        raise ValueError(f"{path}: a ControlNet config has kind 'controlnet', got {cfg.kind!r}")
    return cfg


METHODS = ("guidance", "reflow", "adversarial")  # fluxion.train.distill, .reflow, .adversarial
PAIR_METHODS = ("reflow", "adversarial")  # the methods that train a few-step student on cached teacher pairs


@dataclass
class DistillConfig(TrainConfig):
    """TrainConfig with `kind: distill`, plus the teacher and the method's settings; the trainer's own settings
    (lr, steps, EMA, ...) mean what they mean for every other kind."""

    method: str = "guidance"
    teacher: str = "models/fluxion-mini"  # the FLUX folder distilled
    guidance_range: tuple[float, float] = (1.0, 6.0)  # w drawn uniformly per row
    sample_guidance: float | None = None  # w of the sample grids; None: the teacher's true_cfg_scale
    # reflow (fluxion.train.reflow)
    pairs: str | None = None  # the teacher-pair cache folder; None: <output>/pairs
    num_pairs: int = 50_000
    pair_batch: int = 64  # pairs per teacher call while generating
    huber_c: float = 0.03  # pseudo-Huber loss: sqrt(mse + c^2) - c per row (Rectified Flow++)
    student_steps: int = 4  # the exported student's default steps (schnell-style: no CFG)
    student_shift: float = 1.0  # the exported scheduler's shift: where those few steps fall (>1: more at high noise)
    student_guidance: float | None = None  # a dev-style student's guidance input (None: the teacher's true_cfg_scale)
    student_single_blocks: int | None = None  # reflow: a deeper student (None: the teacher's count); the added
    # single-stream blocks start with zero gates, so the student starts as its start point
    # adversarial (fluxion.train.adversarial: LADD on the teacher's features)
    adv_weight: float = 0.1  # the student's adversarial term, -D(fake)
    reg_weight: float = 1.0  # the student's reflow regression on the pair (0: pure LADD)
    adv_noise_mean: float = 1.0  # logit-normal of the level both samples are noised to again before the teacher
    adv_noise_std: float = 1.0  # reads them (mean > 0: mostly high noise, where the layout is judged)
    adv_min_level: float = 0.0  # the adversarial terms only on rows whose student level is at least this (1: the
    # first step of the student's sampler alone, where regression averages the layouts noise leaves open)
    backward_simulation: bool = False  # the student's inputs from its own sampler steps, not the pairs' lines
    disc_lr_scale: float = 10.0  # the discriminator heads' learning rate, as a multiple of lr
    disc_width: int = 64  # channels of each discriminator head

    def __post_init__(self):
        if self.kind != "distill":
            raise ValueError(f"a distillation config has kind 'distill', got {self.kind!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.vae_path is None:
            self.vae_path = str(Path(self.teacher) / "vae")
        super().__post_init__()
        low, high = (float(v) for v in self.guidance_range)
        if not (0 <= low <= high) or high != high:
            raise ValueError(f"guidance_range must be [low, high] with 0 <= low <= high, got {self.guidance_range!r}")
        self.guidance_range = (low, high)
        if self.sample_guidance is not None:
            check_numbers(self, finite=("sample_guidance",))
        if self.student_guidance is not None:
            check_numbers(self, non_negative=("student_guidance",))
        check_numbers(self, positive=("huber_c", "student_shift", "adv_noise_std", "disc_lr_scale"),
                      non_negative=("adv_weight", "reg_weight", "adv_min_level"), finite=("adv_noise_mean",),
                      at_least_one=("num_pairs", "pair_batch", "student_steps", "disc_width"))
        if not isinstance(self.backward_simulation, bool):
            raise ValueError(f"backward_simulation must be true or false, got {self.backward_simulation!r}")
        if self.backward_simulation and (self.method != "adversarial" or self.timestep_sampling != "student_schedule"):
            raise ValueError("backward_simulation (inputs from the student's own sampler steps) is for method "
                             "adversarial with timestep_sampling student_schedule (the levels those steps reach), got "
                             f"method {self.method!r} with {self.timestep_sampling!r}")
        if self.disc_width % 8:
            raise ValueError(f"disc_width must be a multiple of 8 (the heads' group norm), got {self.disc_width}")
        if self.student_single_blocks is not None:
            check_numbers(self, at_least_one=("student_single_blocks",))
            if self.method not in PAIR_METHODS:
                raise ValueError(f"student_single_blocks (a deeper student) is for methods {' and '.join(PAIR_METHODS)}, "
                                 f"got {self.method!r}")
        if self.timestep_sampling == "student_schedule" and self.method not in PAIR_METHODS:
            raise ValueError("timestep_sampling student_schedule (the exported student's noise levels) is for methods "
                             f"{' and '.join(PAIR_METHODS)}, got method {self.method!r}")

    @property
    def pairs_dir(self) -> Path:
        return Path(self.pairs) if self.pairs else self.run_dir / "pairs"
