"""DreamBooth-style LoRA training (`fluxion train-lora`): only the adapter learns, encoders stay frozen.

Defaults follow diffusers' train_dreambooth_lora_flux.py recipe: rank 4, lr 1e-4, constant schedule, batch 1,
gradient accumulation 4, 500 steps; the resolution defaults to the model's own default size. Latents and text
embeddings are computed once, since nothing that makes them is trained.

Prior preservation (DreamBooth's guard against the adapter overwriting what the model already draws): a second
folder of class images, the model's own generations, trained alongside at `prior_loss_weight`. As in diffusers,
`class_prompt` with `num_class_images` fills the folder with base-model images when it holds fewer; a folder
with its own captions (kohya's regularisation images) works as it is. `caption_dropout` trains that share of
samples on the empty prompt, so the unconditional branch that true CFG subtracts stays the base model's.

`prior_target="base_model"` regresses the class half onto the frozen base model's own velocity at the same noisy
latent, noise level and caption (the adapter switched off for that forward), instead of onto the images' true
velocity. The class images then only place the noisy inputs; the loss is the adapter's deviation from the base
model alone, without the irreducible noise of a flow-matching target, at the cost of one gradient-free forward
of the class half per step.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..compute import resolve_bf16_autocast
from ..files import inside, read_text
from ..images import load_image
from ..lora import DEFAULT_TARGETS, add_trainable_adapter, enable_lora, save_lora_adapter
from ..flow import flow_loss_per_row, image_ids, latent_grid, noised, pack, sample_sigmas, text_ids, velocity_target
from ..images import grid
from .config import check_numbers
from .trainer import save_image_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ADAPTER = "dreambooth"


@dataclass
class LoraTrainConfig:
    data: str
    output: str
    model: str | None = None  # None: fluxion-mini
    instance_prompt: str | None = None
    rank: int = 4
    alpha: float | None = None
    lr: float = 1e-4
    steps: int = 500
    batch_size: int = 1
    grad_accum: int = 4
    resolution: int | None = None
    guidance_scale: float = 1.0  # fed to dev-style models' guidance embedder while training
    validation_prompt: str | None = None
    validation_every: int = 100
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False
    seed: int = 0
    class_data: str | None = None  # prior preservation: folder of class images (+ captions)
    class_prompt: str | None = None  # caption of class images without one; generates missing ones
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    timestep_sampling: str = "logit_normal"  # noise-level density: logit_normal, uniform (diffusers: none) or mode
    logit_mean: float = 0.0  # > 0 trains more at high noise, where layout (size, shape, place) is decided
    logit_std: float = 1.0
    class_batch_size: int | None = None  # class images per micro-batch; None: batch_size, as in diffusers
    prior_target: str = "images"  # "images": DreamBooth's velocity to the class images; "base_model": see above
    caption_dropout: float = 0.0  # share of samples trained on the empty prompt
    random_flip: bool = False  # mirror images left-right at random (diffusers' --random_flip)
    mixed_precision: str = "no"  # "bf16": the transformer's matmuls in bfloat16, adapter weights kept float32;
    # "auto": bf16 where the CPU has bf16 units (or on CUDA), float32 elsewhere (fluxion.compute)
    targets: tuple[str, ...] | None = None  # layer-name patterns (diffusers' --lora_layers); None: the recipe's


# settings a resumed adapter run must share with the saved one (the adapter's layers and shapes, the data order)
LORA_RESUME_KEYS = ("model", "rank", "alpha", "targets", "resolution", "seed", "batch_size", "grad_accum",
                    "class_batch_size")


def read_dataset(folder: str | Path, instance_prompt: str | None, flag: str = "--data") -> list[tuple[Path, str]]:
    """(image, caption) pairs from a folder: `metadata.jsonl` (file_name, text), else `NAME.txt` beside each
    image, else the instance prompt. An empty caption file is kept: that image trains the empty prompt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{flag} {folder}: no such folder")
    pairs = []
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(read_text(meta, "--data metadata").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{meta}:{n}: not a JSON object ({e})") from None
                if "file_name" not in row:
                    raise ValueError(f"{meta}:{n}: each line needs a file_name (and text)")
                image = inside(folder, row["file_name"], f"{meta}:{n}")
                pairs.append((image, row["text"] if row.get("text") is not None else instance_prompt))
    else:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption_file = path.with_suffix(".txt")
            caption = read_text(caption_file, "caption").strip() if caption_file.is_file() else instance_prompt
            pairs.append((path, caption))
    if not pairs:
        raise ValueError(f"{flag} {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) or metadata.jsonl found")
    missing = [str(p) for p, c in pairs if c is None]
    if missing:
        raise ValueError(f"{missing[0]} has no caption: add a .txt beside it or pass --instance-prompt")
    absent = [str(p) for p, _ in pairs if not p.is_file()]
    if absent:
        raise ValueError(f"metadata.jsonl names {absent[0]}, which does not exist")
    for path, _ in pairs:  # a corrupt image is named now, before any model loads
        load_image(path, f"{flag} image")
    return pairs


def generate_class_images(pipe, folder: Path, prompt: str, count: int, resolution: int, seed: int) -> None:
    """Fill `folder` up to `count` images of `prompt` drawn by the base model (diffusers' prior-preservation step)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = len([p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES])
    for i in tqdm(range(have, count), desc="class images", unit="image"):
        image = pipe(prompt, generator=torch.Generator().manual_seed(seed + i), height=resolution,
                     width=resolution).images[0]
        save_image_atomic(image, folder / f"class-{i:04d}.png")


def load_images(pairs, resolution: int) -> torch.Tensor:
    """Images resized (centre crop to square) to resolution, in [-1, 1], [N, 3, R, R]."""
    out = []
    for path, _ in pairs:
        im = load_image(path)
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def check_lora_config(cfg: LoraTrainConfig) -> tuple[list, list, int]:
    """Everything about a LoRA run that can be checked before a model loads: (pairs, class pairs, class batch)."""
    pairs = read_dataset(cfg.data, cfg.instance_prompt)  # bad input fails before any model loads
    class_batch = cfg.batch_size if cfg.class_batch_size is None else cfg.class_batch_size
    if min(cfg.rank, cfg.steps, cfg.batch_size, class_batch, cfg.grad_accum) < 1:
        raise ValueError("rank, steps, batch_size, class_batch_size and grad_accum must be >= 1")
    if cfg.mixed_precision not in ("no", "bf16", "auto"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'auto', got {cfg.mixed_precision!r}")
    sample_sigmas(1, cfg.timestep_sampling)  # an unknown name fails here, before any model loads
    if cfg.prior_target not in ("images", "base_model"):
        raise ValueError(f"prior_target must be 'images' or 'base_model', got {cfg.prior_target!r}")
    if not 0 <= cfg.caption_dropout < 1:
        raise ValueError(f"caption_dropout must be in [0, 1), got {cfg.caption_dropout}")
    check_numbers(cfg, positive=("lr", "logit_std"), non_negative=("prior_loss_weight", "validation_every"),
                  at_least_one=("checkpoint_every", "num_class_images"), finite=("guidance_scale", "logit_mean"))
    if cfg.alpha is not None:
        check_numbers(cfg, positive=("alpha",))
    if cfg.class_data is None and cfg.class_prompt is not None:
        raise ValueError("--class-prompt needs --class-data, the folder its images go to")
    class_pairs = []  # a folder with its own captions is read (and fails) now; one to fill, after generating
    if cfg.class_data is not None and cfg.class_prompt is None:
        class_pairs = read_dataset(cfg.class_data, None, "--class-data")
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file: name a folder for the adapter, checkpoints and samples")
    return pairs, class_pairs, class_batch


class LoraTask(nn.Module):
    """The adapter learns; the base transformer, VAE and text encoders are frozen, and the latents and text
    embeddings they make are computed once. A task of the one trainer (`fluxion.train.trainer`).

    A step's global batch is `grad_accum` micro-batches of `batch_size` instance rows (then `class_batch` class
    rows, with prior preservation), as diffusers lays them out. Row weights make the mean over the global batch
    equal to the recipe's objective, the mean over micro-batches of (instance mean + prior_loss_weight x class
    mean), however the rows are spread over processes.
    """

    def __init__(self, cfg: LoraTrainConfig, pipe, pairs: list, class_pairs: list, class_batch: int,
                 resolution: int):
        super().__init__()
        self.cfg, self.pipe, self.resolution = cfg, pipe, resolution
        self.n_instance, self.class_batch = len(pairs), class_batch if class_pairs else 0
        self.n_class = len(class_pairs)
        self.transformer = pipe.transformer.requires_grad_(False)
        for m in (pipe.vae, pipe.clip.model, pipe.t5.model):
            m.requires_grad_(False)
        with torch.no_grad():  # the cache: nothing below is trained
            everything = pairs + class_pairs
            pixels = load_images(everything, resolution)
            self.latents = pack(pipe.vae.encode(pixels))
            self.mirrored = pack(pipe.vae.encode(pixels.flip(-1))) if cfg.random_flip else None
            embeds, pooled, _ = pipe.encode_prompt([c for _, c in everything] + [""])
            self.empty_embeds, self.empty_pooled = embeds[-1:], pooled[-1:]
            self.embeds, self.pooled = embeds[:-1], pooled[:-1]
        lat = latent_grid(resolution, resolution, pipe.vae_scale_factor)
        self.img_ids, self.txt_ids = image_ids(*lat), text_ids(self.embeds.shape[1])
        # the adapter's layers find their weights through the transformer's adapter registry (outside the module
        # tree, for hot swapping); registered here too, so the trainer (and DDP) see what learns
        self.adapter = nn.ParameterList(add_trainable_adapter(
            self.transformer, ADAPTER, rank=cfg.rank, alpha=cfg.alpha,
            targets=tuple(cfg.targets) if cfg.targets else DEFAULT_TARGETS,
            generator=torch.Generator().manual_seed(cfg.seed)))
        self.transformer.gradient_checkpointing = cfg.gradient_checkpointing

    @property
    def micro_rows(self) -> int:
        return self.cfg.batch_size + self.class_batch

    def ema_module(self) -> nn.Module:
        return self.transformer

    def batch(self, step: int, gen: torch.Generator) -> dict:
        cfg, b, c = self.cfg, self.cfg.batch_size, self.class_batch
        parts = []
        for _ in range(cfg.grad_accum):
            idx = torch.randint(self.n_instance, (b,), generator=gen)
            if c:  # diffusers' layout: instance rows, then class rows
                idx = torch.cat([idx, self.n_instance + torch.randint(self.n_class, (c,), generator=gen)])
            n = len(idx)
            flip = torch.rand(n, generator=gen) < 0.5 if self.mirrored is not None else torch.zeros(n, dtype=bool)
            drop = torch.rand(n, generator=gen) < cfg.caption_dropout if cfg.caption_dropout else \
                torch.zeros(n, dtype=bool)
            noise = torch.randn((n, *self.latents.shape[1:]), generator=gen)
            sigma = sample_sigmas(n, cfg.timestep_sampling, gen, cfg.logit_mean, cfg.logit_std)
            prior = torch.arange(n) >= b
            weight = torch.where(prior, cfg.prior_loss_weight * n / max(c, 1), torch.tensor(n / b))
            parts.append({"idx": idx, "flip": flip, "drop": drop, "noise": noise, "sigma": sigma, "prior": prior,
                          "weight": weight})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def forward(self, rows: dict) -> tuple[torch.Tensor, dict]:
        cfg, tf = self.cfg, self.transformer
        idx, sigma = rows["idx"], rows["sigma"]
        x0, txt, vec = self.latents[idx], self.embeds[idx], self.pooled[idx]
        if self.mirrored is not None:
            x0 = torch.where(rows["flip"][:, None, None], self.mirrored[idx], x0)
        drop = rows["drop"]
        txt = torch.where(drop[:, None, None], self.empty_embeds, txt)
        vec = torch.where(drop[:, None], self.empty_pooled, vec)
        g = torch.full((len(idx),), cfg.guidance_scale) if tf.config.guidance_embed else None
        x_t = noised(x0, rows["noise"], sigma)
        pred = tf(x_t, self.img_ids, txt, self.txt_ids, sigma, vec, g)
        target = velocity_target(x0, rows["noise"])
        prior = rows["prior"]
        if cfg.prior_target == "base_model" and bool(prior.any()):  # the frozen base model's own velocity
            enable_lora(tf, False)
            try:
                with torch.no_grad():
                    gp = g[prior] if g is not None else None
                    target[prior] = tf(x_t[prior], self.img_ids, txt[prior], self.txt_ids, sigma[prior], vec[prior],
                                       gp).float()
            finally:
                enable_lora(tf, True)
        return rows["weight"] * flow_loss_per_row(pred, target, sigma), {}

    @torch.no_grad()
    def sample_grid(self, module, step: int):
        if not self.cfg.validation_prompt:
            return None
        self.transformer.eval()
        images = self.pipe([self.cfg.validation_prompt] * 4, generator=[torch.Generator().manual_seed(i)
                                                                         for i in range(4)],
                           height=self.resolution, width=self.resolution).images
        self.transformer.train()
        return grid(images, columns=4)

    def export(self, module, folder: Path) -> None:
        save_lora_adapter(self.transformer, ADAPTER, folder, base_model=str(self.pipe.model_path))


def train_lora(cfg: LoraTrainConfig, resume: bool = True, max_minutes: float | None = None) -> Path:
    """`fluxion train-lora`: the LoRA task through the one trainer; writes `pytorch_lora_weights.safetensors` in
    the output folder (at every checkpoint too), beside the resumable checkpoint."""
    from ..pipelines import FluxPipeline
    from .trainer import LoopSettings, fit

    pairs, class_pairs, class_batch = check_lora_config(cfg)
    out = Path(cfg.output)

    def build(device):
        pipe = FluxPipeline.from_pretrained(cfg.model)
        pipe.set_progress_bar_config(disable=True)
        resolution = cfg.resolution or pipe.defaults.sample_size * pipe.vae_scale_factor
        if resolution % (2 * pipe.vae_scale_factor):
            raise ValueError(f"resolution must be a multiple of {2 * pipe.vae_scale_factor}, got {resolution}")
        found = class_pairs
        if cfg.class_prompt is not None:
            generate_class_images(pipe, Path(cfg.class_data), cfg.class_prompt, cfg.num_class_images, resolution,
                                  cfg.seed)
            found = read_dataset(cfg.class_data, cfg.class_prompt, "--class-data")
        return LoraTask(cfg, pipe.to(device), pairs, found, class_batch, resolution)

    class_rows = class_batch if (class_pairs or cfg.class_prompt is not None) else 0
    micro = cfg.batch_size + class_rows
    # bf16 autocast: on CPUs with bf16 units a training step runs 2.1x faster (fluxion-mini, batch 32:
    # bench/lora_step_speed.py); the adapter's weights, its gradients and the optimizer stay float32, as with
    # accelerate's bf16.
    device = "cpu"
    bf16 = cfg.mixed_precision != "no" and bool(resolve_bf16_autocast(
        "auto" if cfg.mixed_precision == "auto" else True, device))
    settings = LoopSettings(
        output=str(out), steps=cfg.steps, batch_size=micro * cfg.grad_accum, micro_batch=micro, lr=cfg.lr,
        weight_decay=1e-4, checkpoint_every=cfg.checkpoint_every, sample_every=cfg.validation_every, log_every=1,
        seed=cfg.seed, bf16=bf16, export=str(out), export_at_checkpoints=True, samples_name="validation",
        title="train-lora")
    start = time.time()
    summary = fit(build, settings, asdict(cfg), LORA_RESUME_KEYS, resume=resume, max_minutes=max_minutes,
                  device=device)
    if summary["main"]:
        print(f"wrote {out / 'pytorch_lora_weights.safetensors'} (step {summary['step']}, {time.time() - start:.0f} s)")
    return out / "pytorch_lora_weights.safetensors"
