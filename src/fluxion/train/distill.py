"""Guidance distillation (`fluxion distill CONFIG`, method: guidance): a dev-style student learns, in one forward,
its teacher's classifier-free-guided velocity (Meng et al., CVPR '23, stage 1; FLUX.1-dev is such a student).

- teacher: a FLUX folder sampled with true CFG (fluxion-mini: 28 steps, true_cfg_scale 3, two forwards a step);
- student: the teacher's transformer with a guidance embedder added (`guidance_embed=True`, FLUX.1-dev's
  `guidance_in`), its output layer zero-initialised as the gates are, so at step 0 the student is exactly the
  teacher's conditional prediction; the student learns, the text encoders and VAE stay the teacher's (frozen);
- data: the shapes world's training mix, noised at sigma (uniform by default: sampling visits every level);
- target: v_u + w (v_c - v_u), the teacher's CFG combination at a scale w drawn per row from `guidance_range`
  (v_c: the caption, v_u: the empty prompt, as the pipeline's default negative prompt); the student gets w as
  its `guidance` input, as diffusers passes `guidance_scale` to FLUX.1-dev;
- export: the teacher's folder with the student transformer and dev-style defaults (guidance_scale = the
  teacher's true_cfg_scale, no true CFG): `FluxPipeline.from_pretrained` (and diffusers) load it as a dev model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.loader import BatchSource
from ..flow import flow_loss_per_row, image_ids, noised, pack, sample_sigmas
from ..model.transformer import FluxConfig, FluxTransformer
from ..images import grid, images_to_tensor
from .config import DistillConfig

def student_from_teacher(teacher: FluxTransformer) -> FluxTransformer:
    """The teacher's transformer with FLUX.1-dev's guidance embedder added, its output layer zero: the student
    starts as the teacher's conditional prediction, whatever guidance it is given."""
    if teacher.config.guidance_embed:
        raise ValueError("the teacher already has a guidance embedder (it is guidance-distilled)")
    student = FluxTransformer(FluxConfig(**{**teacher.config.to_dict(), "guidance_embed": True}))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("guidance_in.") for k in missing), (missing, unexpected)
    nn.init.zeros_(student.guidance_in.out_layer.weight)
    nn.init.zeros_(student.guidance_in.out_layer.bias)
    return student.float()


def frozen_pipeline(path: str | Path, device: torch.device | str):
    """A FLUX folder's pipeline with every part frozen (eval mode, no gradients): a teacher, or a base model."""
    from ..pipelines import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.transformer, pipe.vae, pipe.clip.model, pipe.t5.model):
        m.requires_grad_(False).eval()
    return pipe.to(device)


def export_student(teacher: str | Path, student: FluxTransformer, folder: Path, defaults: dict, about: dict,
                   scheduler: dict | None = None) -> None:
    """The teacher's folder with the student transformer (diffusers layout), `defaults` merged into its
    `_fluxion_defaults`, `about` recorded as `_fluxion_distilled` and `scheduler` into its scheduler config."""
    from ..checkpoints.diffusers import save_diffusers_part, transformer_diffusers_config, transformer_to_diffusers

    folder = Path(folder)
    for part in Path(teacher).iterdir():
        if part.name != "transformer":
            (shutil.copytree if part.is_dir() else shutil.copy2)(part, folder / part.name)
    save_diffusers_part(transformer_to_diffusers(student.state_dict(), student.config),
                        transformer_diffusers_config(student.config), folder / "transformer")
    index = json.loads((folder / "model_index.json").read_text())
    index["_fluxion_defaults"] = {**index.get("_fluxion_defaults", {}), **defaults}
    index["_fluxion_distilled"] = {**about, "teacher": str(teacher)}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if scheduler:
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler}, indent=2) + "\n")


class GuidanceDistillTask(nn.Module):
    def __init__(self, cfg: DistillConfig, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg = cfg
        self.device = torch.device(device)
        self.pipe = pipe = frozen_pipeline(cfg.teacher, self.device)
        self.teacher, self.vae = pipe.transformer, pipe.vae  # frozen: the trainer saves only what learns
        self.student = student_from_teacher(self.teacher).to(self.device)
        self.side = pipe.defaults.sample_size * pipe.vae_scale_factor
        lat = self.side // pipe.vae_scale_factor
        self.img_ids = image_ids(lat, lat, self.device)
        self.tokens = (lat // 2) ** 2, self.teacher.config.in_channels
        self.batches = BatchSource.for_run(cfg)

    def ema_module(self) -> nn.Module:
        return self.student

    def batch(self, step: int, generator: torch.Generator) -> dict:
        cfg = self.cfg
        images, captions = self.batches(step)
        if images.shape[1] != self.side:  # the shapes world renders at 128 px; the teacher's default size rules
            images = np.stack([np.asarray(Image.fromarray(im).resize((self.side, self.side), Image.BICUBIC))
                               for im in images])
        n = len(captions)
        noise = torch.randn((n, *self.tokens), generator=generator)  # drawn on the CPU: same on any device
        sigma = sample_sigmas(n, cfg.timestep_sampling, generator, cfg.logit_mean, cfg.logit_std)
        low, high = cfg.guidance_range
        w = low + (high - low) * torch.rand(n, generator=generator)
        return {"images": images, "captions": captions, "noise": noise, "sigma": sigma, "w": w}

    @torch.no_grad()
    def target(self, x_t: torch.Tensor, rows: dict, txt, pooled, txt_ids) -> torch.Tensor:
        """The teacher's guided velocity v_u + w (v_c - v_u), its two predictions in one batched forward."""
        n = x_t.shape[0]
        empty, empty_pooled, _ = self.pipe.encode_prompt([""], max_sequence_length=self.cfg.max_sequence_length)
        sigma = rows["sigma"].to(self.device)
        both = self.teacher(torch.cat([x_t, x_t]), self.img_ids, torch.cat([txt, empty.expand(n, -1, -1)]), txt_ids,
                            torch.cat([sigma, sigma]), torch.cat([pooled, empty_pooled.expand(n, -1)])).float()
        v_c, v_u = both[:n], both[n:]
        return v_u + rows["w"].to(self.device)[:, None, None] * (v_c - v_u)

    def forward(self, rows: dict) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            x0 = pack(self.vae.encode(images_to_tensor(rows["images"], self.device))).float()
            txt, pooled, txt_ids = self.pipe.encode_prompt(rows["captions"],
                                                           max_sequence_length=self.cfg.max_sequence_length)
        noise, sigma, w = (rows[k].to(self.device) for k in ("noise", "sigma", "w"))
        x_t = noised(x0, noise, sigma)
        target = self.target(x_t, rows, txt, pooled, txt_ids)
        pred = self.student(x_t, self.img_ids, txt, txt_ids, sigma, pooled, w)
        return flow_loss_per_row(pred, target, sigma), {}

    def student_pipeline(self, student: FluxTransformer):
        from ..pipelines import FluxPipeline

        pipe = FluxPipeline.from_pipe(self.pipe, transformer=student)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def dev_defaults(self) -> dict:
        d = self.pipe.defaults
        return {"guidance_scale": float(d.true_cfg_scale), "true_cfg_scale": 1.0}

    @torch.no_grad()
    def sample_grid(self, student: FluxTransformer, step: int):
        """Top row: the teacher with true CFG (two forwards a step); bottom: the student, one forward a step."""
        prompts = self.cfg.sample_prompts or ["a red circle", "two blue squares",
                                              "a green triangle left of a yellow circle", "three purple circles"]
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(len(prompts))]  # noqa: E731
        steps = self.cfg.sample_steps
        teacher = self.pipe(prompts, generator=gens(), num_inference_steps=steps).images
        was = student.training
        student.eval()
        w = self.cfg.sample_guidance if self.cfg.sample_guidance is not None else self.dev_defaults()["guidance_scale"]
        images = self.student_pipeline(student)(prompts, generator=gens(), num_inference_steps=steps,
                                                guidance_scale=w, true_cfg_scale=1.0).images
        student.train(was)
        return grid(teacher + images, columns=len(prompts))

    def export(self, student: FluxTransformer, folder: Path) -> None:
        """The teacher's folder with the student transformer and dev-style defaults."""
        export_student(self.cfg.teacher, student, folder, self.dev_defaults(),
                       {"method": "guidance", "guidance_range": list(self.cfg.guidance_range)})
