"""Teacher pairs for reflow: (noise, the teacher's sample from that noise, prompt), cached on disk in shards.

Pair i is a pure function of (seed, i): its prompt is a training-mix caption drawn from rng([seed, PAIR_STREAM,
i]) and its noise is what the pipeline draws from `torch.Generator().manual_seed(pair_seed(seed, i))`, so any pair
can be regenerated alone (tests do) and the cache can be rebuilt anywhere. Shards are written atomically, one
after another; a killed generation resumes at the first missing shard, and a manifest refuses to mix pairs made
with another teacher or sampler.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..checkpoints.safetensors_file import save_safetensors
from ..files import atomic_path
from ..flow import pack
from .shapes import caption, sample_scene

PAIR_STREAM = 4_242_424  # training draws rng([seed, step, i]); the ControlNet bench 7_777_777


def pair_seed(seed: int, i: int) -> int:
    return seed * 1_000_003 + i


def pair_prompt(seed: int, i: int) -> str:
    rng = np.random.default_rng([seed, PAIR_STREAM, i])
    return caption(sample_scene(rng, "exclude"), rng, paraphrase=True)


@torch.no_grad()
def teacher_samples(pipe, indices: range, seed: int, **call) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(noise, sample, prompts) of pairs `indices`, packed [n, L, C] float32, in one batched pipeline call."""
    prompts = [pair_prompt(seed, i) for i in indices]
    side = pipe.defaults.sample_size  # latent side: the pipeline draws its noise unpacked, as diffusers does
    noise = pack(torch.cat([torch.randn((1, pipe.transformer.config.in_channels // 4, side, side),
                                        generator=torch.Generator().manual_seed(pair_seed(seed, i)))
                            for i in indices]))
    sample = pipe(prompts, latents=noise, output_type="latent", **call).images
    if sample.ndim == 4:
        sample = pack(sample)
    return noise, sample.float(), prompts


def generate_pairs(pipe, folder: str | Path, count: int, seed: int = 0, shard_size: int = 256, batch: int = 64,
                   **call) -> Path:
    """Fill `folder` with pairs 0..count-1 (shards of `shard_size`), resuming at the first missing or short shard;
    `call` is the teacher's sampler settings (steps, guidance), recorded in the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"teacher": str(pipe.model_path), "seed": seed, "shard_size": shard_size,
                "call": {k: v for k, v in call.items() if v is not None}}
    path = folder / "manifest.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in manifest} != manifest:
            raise ValueError(f"{path}: these pairs were made with {saved}, not {manifest}: use another folder, or "
                             f"delete this one")
    else:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2))
    for k in tqdm(range(math.ceil(count / shard_size)), desc="teacher pairs", unit="shard"):
        start, stop = k * shard_size, min(count, (k + 1) * shard_size)
        if shard_length(folder / shard_name(k)) == stop - start:
            continue
        parts = [teacher_samples(pipe, range(a, min(a + batch, stop)), seed, **call) for a in range(start, stop, batch)]
        noise, sample = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        save_safetensors({"noise": noise, "sample": sample}, folder / shard_name(k),
                         metadata={"prompts": json.dumps([q for p in parts for q in p[2]]), "first": str(start)})
    return folder


def shard_length(path: Path) -> int:
    """Pairs in a shard file (0 when there is none)."""
    if not path.is_file():
        return 0
    with safe_open(str(path), "pt") as h:
        return len(json.loads(h.metadata()["prompts"]))


def shard_name(k: int) -> str:
    return f"pairs-{k:05d}.safetensors"


def load_pairs(folder: str | Path, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(noise, sample, prompts) of the first `count` cached pairs (all when None), in pair order."""
    folder = Path(folder)
    files = sorted(folder.glob("pairs-*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no teacher pairs (generate them first)")
    noise, sample, prompts = [], [], []
    for i, f in enumerate(files):
        if f.name != shard_name(i):
            raise ValueError(f"{folder}: shard {shard_name(i)} is missing (a generation was stopped): resume it")
        with safe_open(str(f), "pt") as h:
            noise.append(h.get_tensor("noise"))
            sample.append(h.get_tensor("sample"))
            prompts += json.loads(h.metadata()["prompts"])
        if count is not None and len(prompts) >= count:
            break
    noise, sample = torch.cat(noise), torch.cat(sample)
    n = len(prompts) if count is None else count
    if n > len(prompts):
        raise ValueError(f"{folder}: {len(prompts)} pairs cached, {n} asked for (a generation was stopped, or asked "
                         f"for fewer): generate the rest, which resumes")
    return noise[:n], sample[:n], prompts[:n]
