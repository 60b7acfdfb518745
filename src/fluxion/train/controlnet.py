"""Training an edge-map ControlNet for fluxion-mini on the shapes world (`fluxion train-controlnet CONFIG`).

The one trainer (`fluxion.train.trainer`) runs it; this module supplies the task:

- frozen: the base model's transformer, VAE and text encoders (a FLUX folder, fluxion-mini by default);
- trained: an InstantX-style `FluxControlNetModel` built as diffusers' `FluxControlNetModel.from_transformer`
  does: the transformer's embedders and first `depth` double (and `depth_single_blocks` single) blocks copied, the
  per-block output projections and `controlnet_x_embedder` zero-initialised, so step 0 adds exactly nothing;
- condition: the Canny edge map (`fluxion.control.canny`, thresholds `canny_low` / `canny_high`) of the rendered
  scene, VAE-encoded (a posterior sample, as `FluxControlNetPipeline` draws one) and packed like the latents;
- loss: rectified flow (`fluxion.flow`) of the frozen transformer with the net's residuals added;
- export: a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors) that
  `FluxControlNetModel.from_pretrained` loads.

Captions are the training mix's (paraphrased, colours included); the net has to take the layout from the edges and
leave the colours to the prompt, which is what `bench/controlnet_mini.py` checks: edges of held-out scenes with
prompts naming other colours.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..control import canny
from ..data.loader import BatchSource
from ..data.shapes import CANVAS, COLORS, TRAIN_PAIRS, Scene, caption, render, sample_scene
from ..flow import flow_loss_per_row, image_ids, noised, pack, sample_sigmas, velocity_target
from ..model.controlnet import FluxControlNetConfig, FluxControlNetModel
from ..images import grid, images_to_tensor
from .config import ControlNetTrainConfig

BENCH_STREAM = 7_777_777  # held-out scenes: rng([seed, BENCH_STREAM, i]); training draws rng([seed, step, i])


# ------------------------------------------------------------------------------------------------ the net


def controlnet_from_transformer(transformer, depth: int = 2, depth_single_blocks: int = 0) -> FluxControlNetModel:
    """diffusers' `FluxControlNetModel.from_transformer`: the transformer's embedders and first blocks copied,
    the output projections and `controlnet_x_embedder` zero, so the fresh net's residuals are exactly zero."""
    t = transformer.config
    if depth > t.depth or depth_single_blocks > t.depth_single_blocks:
        raise ValueError(f"a ControlNet of {depth} double / {depth_single_blocks} single blocks cannot start from a "
                         f"transformer of {t.depth} / {t.depth_single_blocks}")
    config = FluxControlNetConfig(
        in_channels=t.in_channels, vec_in_dim=t.vec_in_dim, context_in_dim=t.context_in_dim,
        hidden_size=t.hidden_size, mlp_ratio=t.mlp_ratio, num_heads=t.num_heads, depth=depth,
        depth_single_blocks=depth_single_blocks, axes_dim=tuple(t.axes_dim), theta=t.theta, qkv_bias=t.qkv_bias,
        guidance_embed=t.guidance_embed)
    net = FluxControlNetModel(config)
    ours = net.state_dict()
    copied = {k: v for k, v in transformer.state_dict().items() if k in ours and v.shape == ours[k].shape}
    net.load_state_dict(copied, strict=False)
    return net.zero_init_().float()


def controlnet_diffusers_config(config: FluxControlNetConfig) -> dict:
    return {
        "_class_name": "FluxControlNetModel",
        "_diffusers_version": "0.42.1",
        "patch_size": 1,
        "in_channels": config.in_channels,
        "num_layers": config.depth,
        "num_single_layers": config.depth_single_blocks,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_in_dim,
        "pooled_projection_dim": config.vec_in_dim,
        "guidance_embeds": config.guidance_embed,
        "axes_dims_rope": list(config.axes_dim),
        "num_mode": config.num_mode,
        "conditioning_embedding_channels": config.conditioning_embedding_channels,
    }


def save_controlnet(net: FluxControlNetModel, folder: Path) -> None:
    """A diffusers ControlNet folder (InstantX layout: no hint block), float32."""
    from ..checkpoints.diffusers import save_diffusers_part, transformer_to_diffusers

    if net.config.has_hint_block or net.config.num_mode is not None:
        raise ValueError("save_controlnet writes InstantX-style nets (no hint block, no Union modes)")
    sd = {k: v.detach().float().cpu() for k, v in net.state_dict().items()}
    tensors = transformer_to_diffusers({k: v for k, v in sd.items() if not k.startswith("controlnet_")}, net.config)
    tensors.update({k: v.contiguous() for k, v in sd.items() if k.startswith("controlnet_")})
    save_diffusers_part(tensors, controlnet_diffusers_config(net.config), Path(folder))


# ------------------------------------------------------------------------------------------------ scenes


def recolour(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same layout (shapes, sizes, places, background) with every object colour replaced by another one; distinct
    colours stay distinct, and each new (colour, shape) pair is one the base model was trained on."""
    old = sorted({o.color for o in scene.objects})
    shapes_of = {c: {o.shape for o in scene.objects if o.color == c} for c in old}
    for _ in range(1000):
        mapping, used = {}, set()
        for c in old:
            options = [n for n in COLORS if n != c and n not in used
                       and all((n, s) in TRAIN_PAIRS for s in shapes_of[c])]
            if not options:
                break
            mapping[c] = options[int(rng.integers(len(options)))]
            used.add(mapping[c])
        if len(mapping) == len(old):
            objects = tuple(dataclasses.replace(o, color=mapping[o.color]) for o in scene.objects)
            return dataclasses.replace(scene, objects=objects)
    raise ValueError(f"no recolouring of {scene} keeps to training pairs")  # not reached for the shapes world


def heldout_examples(n: int, seed: int = 0) -> list[tuple[Scene, Scene, str]]:
    """n (scene, recoloured scene, canonical caption of the recoloured scene) from a stream training never draws."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, BENCH_STREAM, i])
        scene = sample_scene(rng, "exclude")
        new = recolour(scene, rng)
        out.append((scene, new, caption(new)))
    return out


def edge_maps(scenes: list[Scene], side: int = CANVAS, low: float = 50, high: float = 200) -> list[Image.Image]:
    return [canny(render(s, side), low, high) for s in scenes]


@torch.no_grad()
def edges_to_images(pipe, edges: list[Image.Image], prompts: list[str], seed: int = 0, batch: int = 16,
                    **kwargs) -> list[Image.Image]:
    """`pipe` (a FluxControlNetPipeline) on each edge map with its prompt, in batches; image i's noise is seeded
    with seed + i, so a result does not depend on the batch size."""
    images = []
    for start in range(0, len(prompts), batch):
        stop = min(len(prompts), start + batch)
        cond = torch.stack([torch.from_numpy(np.array(e)).permute(2, 0, 1).float() / 127.5 - 1
                            for e in edges[start:stop]])
        gens = [torch.Generator().manual_seed(seed + i) for i in range(start, stop)]
        images += pipe(prompts[start:stop], control_image=cond, generator=gens, height=cond.shape[-2],
                       width=cond.shape[-1], **kwargs).images
    return images


# ------------------------------------------------------------------------------------------------ the task


class ControlNetTask(nn.Module):
    def __init__(self, cfg: ControlNetTrainConfig, device: torch.device | str = "cpu"):
        from .distill import frozen_pipeline

        super().__init__()
        self.cfg = cfg
        self.device = torch.device(device)
        self.pipe = pipe = frozen_pipeline(cfg.base_model, self.device)
        self.transformer, self.vae = pipe.transformer, pipe.vae  # frozen: the trainer saves only what learns
        self.side = pipe.defaults.sample_size * pipe.vae_scale_factor
        self.net = controlnet_from_transformer(self.transformer, *cfg.net_depths).to(self.device)
        lat = self.side // pipe.vae_scale_factor
        self.img_ids = image_ids(lat, lat, self.device)
        self.latent = self.vae.config.z_channels, lat, lat
        self.tokens = (lat // 2) ** 2, 4 * self.vae.config.z_channels
        self.batches = BatchSource.for_run(cfg)

    def ema_module(self) -> nn.Module:
        return self.net

    def _pixels(self, images: np.ndarray) -> np.ndarray:
        if images.shape[1] == self.side:
            return images
        return np.stack([np.asarray(Image.fromarray(im).resize((self.side, self.side), Image.BICUBIC))
                         for im in images])

    def batch(self, step: int, generator: torch.Generator) -> dict:
        """Step `step`'s whole batch: images, their edge maps, captions (some dropped), the edge latents' posterior
        noise, the noise and the noise levels."""
        cfg = self.cfg
        images, captions = self.batches(step)
        images = self._pixels(images)
        edges = np.stack([np.asarray(canny(im, cfg.canny_low, cfg.canny_high)) for im in images])
        drop = torch.rand(len(captions), generator=generator) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        n = len(captions)
        posterior = torch.randn((n, *self.latent), generator=generator)
        noise = torch.randn((n, *self.tokens), generator=generator)  # drawn on the CPU: same on any device
        sigma = sample_sigmas(n, cfg.timestep_sampling, generator, cfg.logit_mean, cfg.logit_std)
        return {"images": images, "edges": edges, "captions": captions, "posterior": posterior, "noise": noise,
                "sigma": sigma}

    def forward(self, rows: dict) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        with torch.no_grad():
            x0 = pack(self.vae.encode(images_to_tensor(rows["images"], self.device))).float()
            cond = pack(self.vae.encode(images_to_tensor(rows["edges"], self.device), noise=rows["posterior"])).float()
            txt, pooled, txt_ids = self.pipe.encode_prompt(rows["captions"],
                                                           max_sequence_length=cfg.max_sequence_length)
        noise, sigma = rows["noise"].to(self.device), rows["sigma"].to(self.device)
        x_t = noised(x0, noise, sigma)
        g = torch.full((len(sigma),), cfg.guidance, device=self.device) if \
            self.transformer.config.guidance_embed else None
        residuals = self.net(x_t, self.img_ids, txt, txt_ids, sigma, pooled, g, cond=cond)
        pred = self.transformer(x_t, self.img_ids, txt, txt_ids, sigma, pooled, g, residuals=residuals)
        return flow_loss_per_row(pred, velocity_target(x0, noise), sigma, cfg.loss_weighting), {}

    def pipeline(self, net: FluxControlNetModel):
        from ..pipelines.controlnet import FluxControlNetPipeline

        pipe = FluxControlNetPipeline.from_pipe(self.pipe, controlnet=net)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample_grid(self, net: FluxControlNetModel, step: int) -> Image.Image:
        """Edges of 6 held-out scenes (top row) and the images drawn from them with prompts naming other colours."""
        examples = heldout_examples(6, seed=self.cfg.seed + 1)
        edges = edge_maps([s for s, _, _ in examples], self.side, self.cfg.canny_low, self.cfg.canny_high)
        net.eval()
        images = edges_to_images(self.pipeline(net), edges, [p for *_, p in examples],
                                 num_inference_steps=self.cfg.sample_steps)
        net.train()
        return grid(edges + images, columns=len(examples))

    def export(self, net: FluxControlNetModel, folder: Path) -> None:
        save_controlnet(net, Path(folder))
        (Path(folder) / "fluxion_controlnet.json").write_text(json.dumps(
            {"base_model": self.cfg.base_model, "condition": "canny", "canny_low": self.cfg.canny_low,
             "canny_high": self.cfg.canny_high, "size": self.side}, indent=2) + "\n")


__all__ = ["ControlNetTask", "controlnet_from_transformer", "save_controlnet", "recolour", "heldout_examples", "edge_maps",
           "edges_to_images"]
