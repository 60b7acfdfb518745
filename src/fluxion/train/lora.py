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
from tqdm.auto import tqdm

from ..compute import resolve_bf16_autocast
from ..files import inside, read_text
from ..images import load_image
from ..lora import DEFAULT_TARGETS, add_trainable_adapter, enable_lora, save_lora_adapter
from ..flow import flow_loss, image_ids, latent_grid, noised, pack, sample_sigmas, text_ids, velocity_target
from .autoencoder import grid
from .config import check_numbers
from .run import save_image_atomic, step_generator
from .state import check_resume, load_checkpoint, save_atomic

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


def train_lora(cfg: LoraTrainConfig, resume: bool = True, max_minutes: float | None = None) -> Path:
    from ..pipelines import FluxPipeline

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
    if resume and (out / "lora_checkpoint.pt").is_file() and (out / "train_config.json").is_file():
        check_resume(json.loads((out / "train_config.json").read_text()), asdict(cfg), LORA_RESUME_KEYS,
                     out / "lora_checkpoint.pt")  # before train_config.json is overwritten
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    pipe = FluxPipeline.from_pretrained(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer.requires_grad_(False)
    for m in (pipe.vae, pipe.clip.model, pipe.t5.model):
        m.requires_grad_(False)
    resolution = cfg.resolution or pipe.defaults.sample_size * pipe.vae_scale_factor
    if resolution % (2 * pipe.vae_scale_factor):
        raise ValueError(f"resolution must be a multiple of {2 * pipe.vae_scale_factor}, got {resolution}")

    if cfg.class_prompt is not None:
        generate_class_images(pipe, Path(cfg.class_data), cfg.class_prompt, cfg.num_class_images, resolution, cfg.seed)
        class_pairs = read_dataset(cfg.class_data, cfg.class_prompt, "--class-data")

    with torch.no_grad():  # the cache: nothing below is trained
        everything = pairs + class_pairs
        pixels = load_images(everything, resolution)
        latents = pack(pipe.vae.encode(pixels))
        mirrored = pack(pipe.vae.encode(pixels.flip(-1))) if cfg.random_flip else None  # cached too
        embeds, pooled, _ = pipe.encode_prompt([c for _, c in everything] + [""])
        empty_embeds, empty_pooled = embeds[-1:], pooled[-1:]
        embeds, pooled = embeds[:-1], pooled[:-1]
    lat = latent_grid(resolution, resolution, pipe.vae_scale_factor)
    img_ids, txt_ids = image_ids(*lat), text_ids(embeds.shape[1])

    params = add_trainable_adapter(transformer, ADAPTER, rank=cfg.rank, alpha=cfg.alpha,
                                   targets=tuple(cfg.targets) if cfg.targets else DEFAULT_TARGETS,
                                   generator=torch.Generator().manual_seed(cfg.seed))
    # bf16 autocast: on CPUs with bf16 units a training step runs 2.1x faster (fluxion-mini, batch 32:
    # bench/lora_step_speed.py); the adapter's weights, its gradients and the optimizer stay float32, as with
    # accelerate's bf16.
    device_type = next(transformer.parameters()).device.type
    bf16 = cfg.mixed_precision != "no" and resolve_bf16_autocast(
        "auto" if cfg.mixed_precision == "auto" else True, device_type)
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    step = 0
    state = load_checkpoint(out / "lora_checkpoint.pt") if resume else None
    if state is not None:
        shapes = [tuple(p.shape) for p in params], [tuple(t.shape) for t in state["params"]]
        if shapes[0] != shapes[1]:
            raise ValueError(f"{out / 'lora_checkpoint.pt'}: cannot resume: its adapter tensors have shapes "
                             f"{shapes[1][:4]}..., this run's {shapes[0][:4]}...; start over (--fresh)")
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed {out / 'lora_checkpoint.pt'} at step {step}")
    transformer.gradient_checkpointing = cfg.gradient_checkpointing

    def checkpoint():
        save_atomic({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict(),
                     "step": step}, out / "lora_checkpoint.pt")
        save_lora_adapter(transformer, ADAPTER, out, base_model=str(pipe.model_path))

    def validate():
        if not cfg.validation_prompt:
            return
        transformer.eval()
        images = pipe([cfg.validation_prompt] * 4, generator=[torch.Generator().manual_seed(i) for i in range(4)],
                      height=resolution, width=resolution).images
        transformer.train()
        save_image_atomic(grid(images, columns=4), out / f"validation-{step:05d}.png")

    start = time.time()
    transformer.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train-lora", unit="step")
    while step < cfg.steps:
        gen = step_generator(cfg.seed, step)
        t0 = time.time()
        total = 0.0
        for micro in range(cfg.grad_accum):
            idx = torch.randint(len(pairs), (cfg.batch_size,), generator=gen)
            if class_pairs:  # diffusers' layout: instance half, then class half, one forward
                idx = torch.cat([idx, len(pairs) + torch.randint(len(class_pairs), (class_batch,), generator=gen)])
            n = len(idx)
            x0, txt, vec = latents[idx], embeds[idx], pooled[idx]
            if mirrored is not None:
                x0 = torch.where((torch.rand(n, generator=gen) < 0.5)[:, None, None], mirrored[idx], x0)
            if cfg.caption_dropout:
                drop = torch.rand(n, generator=gen) < cfg.caption_dropout
                txt = torch.where(drop[:, None, None], empty_embeds, txt)
                vec = torch.where(drop[:, None], empty_pooled, vec)
            noise = torch.randn(x0.shape, generator=gen)
            sigma = sample_sigmas(n, cfg.timestep_sampling, gen, cfg.logit_mean, cfg.logit_std)
            g = torch.full((n,), cfg.guidance_scale) if transformer.config.guidance_embed else None
            x_t = noised(x0, noise, sigma)
            with autocast:
                pred = transformer(x_t, img_ids, txt, txt_ids, sigma, vec, g)
            target = velocity_target(x0, noise)
            b = cfg.batch_size
            if class_pairs and cfg.prior_target == "base_model":
                gb = g[b:] if g is not None else None
                enable_lora(transformer, False)
                try:
                    with torch.no_grad(), autocast:
                        target[b:] = transformer(x_t[b:], img_ids, txt[b:], txt_ids, sigma[b:], vec[b:], gb).float()
                finally:
                    enable_lora(transformer, True)
            loss = flow_loss(pred[:b], target[:b], sigma[:b])
            if class_pairs:
                loss = loss + cfg.prior_loss_weight * flow_loss(pred[b:], target[b:], sigma[b:])
            loss = loss / cfg.grad_accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", samples_per_s=f"{cfg.batch_size * cfg.grad_accum / (time.time() - t0):.1f}")
        if step % cfg.checkpoint_every == 0:
            checkpoint()
        if cfg.validation_every and step % cfg.validation_every == 0:
            validate()
        if max_minutes is not None and time.time() - start > 60 * max_minutes:
            break
    bar.close()
    transformer.eval()
    checkpoint()
    print(f"wrote {out / 'pytorch_lora_weights.safetensors'} (step {step}, {time.time() - start:.0f} s)")
    return out / "pytorch_lora_weights.safetensors"

