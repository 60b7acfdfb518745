"""FluxControlNetPipeline: FLUX with third-party ControlNets (XLabs, InstantX, Union), called as diffusers'
FluxControlNetPipeline (0.42): `FluxControlNetPipeline.from_pretrained(folder, controlnet=net)`.

Order of operations as diffusers': prompts; each control image (one per net, in order) resized to the output size,
in [-1, 1], repeated to the batch, then for a net without a hint block (InstantX, Union) VAE-encoded and *sampled*
with the call's generator, packed; a net with a hint block (XLabs) takes the pixels (no draw); then the noise. At
each step every net runs once on the positive prompt (the guidance value only for a net with a guidance
embedder) with `controlnet_conditioning_scale * keep_i`, where `keep_i = 1 - float(i/N < start or (i+1)/N > end)`
over the N steps run; the summed residuals (`fluxion.model.controlnet.combine`) go into every transformer pass
of that step (true CFG's negative pass too).

Beyond diffusers: a FluxMultiControlNetModel may mix InstantX and XLabs nets (each gets its own encoding; their
residuals are spread per block before summing instead of truncating); a scalar scale, start, end or mode applies
to every control image (diffusers makes scalar start/end lists of len(nets), so one Union net given two images
silently drops the second; its img2img variant fails on a scalar mode with several nets).

Step cache (`cache="fbcache"`): the ControlNets still run at every step (their residual for the first block
enters the cache's decision). A step the cache skips reuses the later blocks' cached residual, which holds the
ControlNet residuals of the last fully computed step, not this step's; with the window (`control_guidance_*`)
the change at its edges usually exceeds the threshold and forces a full step, but that is not guaranteed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..flow import image_ids, pack
from ..model.controlnet import FluxControlNetModel, FluxMultiControlNetModel
from . import guidance as G
from .base import FluxBasePipeline
from .guidance import GuidanceValue
from .image_inputs import preprocess_image


class FluxControlNetPipeline(FluxBasePipeline):
    CALL_DEFAULTS = {"num_inference_steps": 28, "guidance_scale": 7.0}

    def __init__(self, *args, controlnet=None, **kwargs):
        self.controlnet = None
        super().__init__(*args, **kwargs)
        if controlnet is not None:
            self.set_controlnet(controlnet)

    def set_controlnet(self, controlnet) -> None:
        """A FluxControlNetModel, a FluxMultiControlNetModel, or a list of nets (wrapped in the latter)."""
        if isinstance(controlnet, (list, tuple)):
            controlnet = FluxMultiControlNetModel(list(controlnet))
        if not isinstance(controlnet, (FluxControlNetModel, FluxMultiControlNetModel)):
            raise ValueError(f"controlnet must be a FluxControlNetModel, a FluxMultiControlNetModel or a list of "
                             f"them, got {type(controlnet).__name__}")
        for net in self._nets(controlnet):
            self._check_fits(net)
        self.controlnet = controlnet
        self.set_compute_dtype(self._compute_override)

    def _check_fits(self, net: FluxControlNetModel) -> None:
        c, t = net.config, self.transformer.config
        for name, ours, theirs in (("hidden_size (width)", c.hidden_size, t.hidden_size),
                                   ("in_channels", c.in_channels, t.in_channels),
                                   ("context_in_dim", c.context_in_dim, t.context_in_dim),
                                   ("vec_in_dim", c.vec_in_dim, t.vec_in_dim)):
            if ours != theirs:
                raise ValueError(f"this ControlNet's {name} is {ours} but the transformer's is {theirs}: it was made "
                                 "for another model")

    @staticmethod
    def _nets(controlnet) -> list[FluxControlNetModel]:
        return list(controlnet.nets) if isinstance(controlnet, FluxMultiControlNetModel) else [controlnet]

    def _modules(self) -> dict[str, torch.nn.Module]:
        mods = super()._modules()
        if getattr(self, "controlnet", None) is not None:
            mods["controlnet"] = self.controlnet
        return mods

    @property
    def components(self) -> dict:
        return {**super().components, "controlnet": self.controlnet}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, controlnet=None, **kwargs):
        """diffusers' `from_pretrained(folder, controlnet=net)`; the net may also be set later (`set_controlnet`)."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if controlnet is not None:
            pipe.set_controlnet(controlnet)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: FluxBasePipeline, controlnet=None, **kwargs):
        pipe = super().from_pipe(pipeline, **kwargs)
        controlnet = controlnet if controlnet is not None else getattr(pipeline, "controlnet", None)
        if controlnet is not None:
            pipe.set_controlnet(controlnet)
        return pipe

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: GuidanceValue | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: GuidanceValue | None = None,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        control_image=None,
        control_mode: int | list[int] | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        cache: str | None = None,
        cache_threshold: float | None = None,
    ):
        """diffusers' FluxControlNetPipeline arguments (defaults 28 steps, guidance 7.0). `control_image`: for one
        net, an image (or one per prompt); for a FluxMultiControlNetModel, a list with one entry per net (a
        single Union net in it takes any number, one per `control_mode`). PIL images and arrays are resized to
        height x width and scaled to [-1, 1]; a [B, 3, H, W] tensor is taken as given (in [-1, 1]).
        `controlnet_conditioning_scale`, `control_guidance_start` / `_end` and `control_mode`: one value, or one
        per control image. Plus `cache` / `cache_threshold` (see the module docstring)."""
        if self.controlnet is None:
            raise ValueError("FluxControlNetPipeline has no ControlNet: pass controlnet= to from_pretrained (or call "
                             "set_controlnet)")
        a = self._args_from(locals())
        self._check_latents(a)
        plan = self._control_plan(a, control_image, control_mode, controlnet_conditioning_scale,
                                  control_guidance_start, control_guidance_end)
        text, negative = self._encode_prompts(a)
        conds = self._control_inputs(a, plan)
        x = a.latents if a.latents is not None else pack(self._noise(a))
        schedule, _ = self._schedule(a)
        x, stats = self._denoise(a, text, negative, x, schedule,
                                 residuals=self._residuals(a, text, schedule, 0, plan, conds))
        return self._finish(a, x, len(schedule) - 1, stats, negative is not None, self._describe(plan))

    def _control_inputs(self, a, plan) -> list[Tensor]:
        """Each net's input, in order (InstantX / Union: one VAE sample each, drawn with the call's generator)."""
        return [self._control_input(a, net, pixels) for net, pixels, *_ in plan]

    @staticmethod
    def _describe(plan) -> dict:
        return {"controlnet_conditioning_scale": [p[3] for p in plan], "control_mode": [p[2] for p in plan],
                "control_guidance": [[p[4], p[5]] for p in plan]}

    def _residuals(self, a, text, schedule: Tensor, t_start: int, plan, conds) -> Callable:
        """The core's `residuals(i, x, t)`: every net on the positive prompt, scaled by its scale times its keep
        value at step i of the N steps run (`schedule[t_start:]`)."""
        n = len(schedule) - 1 - t_start
        g = G.per_step(a.guidance_scale, schedule, t_start, "guidance_scale")
        lat_h, lat_w = self._latent_grid(a)
        ids = image_ids(lat_h, lat_w, self.device)
        multi = FluxMultiControlNetModel([p[0] for p in plan])
        depth, depth_single = len(self.transformer.double_blocks), len(self.transformer.single_blocks)
        keep = [[1.0 - float(i / n < s or (i + 1) / n > e) for *_, s, e in plan] for i in range(n)]
        modes = [p[2] for p in plan]

        def residuals(i: int, latents: Tensor, t: Tensor):
            scales = [p[3] * k for p, k in zip(plan, keep[i])]
            guidance = torch.full((latents.shape[0],), float(g[i]), dtype=torch.float32, device=latents.device)
            with self._placed(self.controlnet):
                return multi(latents, ids, text.embeds, text.ids, t, text.pooled, guidance, conds=conds, modes=modes,
                             scales=scales, depth=depth, depth_single=depth_single)

        return residuals

    # ------------------------------------------------------------ inputs, all checked before any compute

    def _control_plan(self, a, images, modes, scales, starts, ends) -> list[tuple]:
        """[(net, pixels [total, 3, H, W] in [-1, 1], mode, scale, start, end)] per control image."""
        nets = self._nets(self.controlnet)
        single = isinstance(self.controlnet, FluxControlNetModel)
        if images is None:
            raise ValueError("FluxControlNetPipeline needs control_image (one per ControlNet)")
        if single:
            images = [images]
        elif not isinstance(images, (list, tuple)):
            raise ValueError(f"with a FluxMultiControlNetModel of {len(nets)} nets, control_image must be a list with "
                             "one entry per net")
        images = list(images)
        count = len(images)
        if len(nets) > 1 and count != len(nets):
            raise ValueError(f"got {count} control images for {len(nets)} ControlNets: give one per net")
        if count == 0:
            raise ValueError("control_image is an empty list: give one per ControlNet")

        def per_image(value, name, kind):
            values = list(value) if isinstance(value, (list, tuple)) else [value] * count
            if len(values) != count:
                raise ValueError(f"{name} has {len(values)} entries but there are {count} control images (ControlNets)")
            for v in values:
                if not (v is None and name == "control_mode") and (isinstance(v, bool) or not isinstance(v, kind)):
                    raise ValueError(f"{name} must hold numbers, got {v!r}")
            return values

        scales = per_image(scales, "controlnet_conditioning_scale", (int, float))
        starts = per_image(starts, "control_guidance_start", (int, float))
        ends = per_image(ends, "control_guidance_end", (int, float))
        modes = per_image(modes, "control_mode", int)
        plan = []
        for k in range(count):
            net = nets[0] if len(nets) == 1 else nets[k]
            self._check_fits(net)
            if not 0.0 <= starts[k] < ends[k] <= 1.0:
                raise ValueError(f"control_guidance_start / _end must satisfy 0 <= start < end <= 1, got "
                                 f"{starts[k]} and {ends[k]}")
            if net.union:
                if modes[k] is None or not 0 <= modes[k] < net.config.num_mode:
                    raise ValueError(f"control_mode {modes[k]!r} is out of range for a Union ControlNet with "
                                     f"{net.config.num_mode} modes (0..{net.config.num_mode - 1})")
            plan.append((net, self._control_pixels(a, images[k]), modes[k], float(scales[k]), float(starts[k]),
                         float(ends[k])))
        return plan

    def _control_pixels(self, a, image) -> Tensor:
        if isinstance(image, Tensor) and image.ndim == 4:
            if tuple(image.shape[1:]) != (3, a.height, a.width) or not torch.isfinite(image).all():
                raise ValueError(f"control_image: a tensor must be [B, 3, {a.height}, {a.width}] in [-1, 1] (finite), "
                                 f"got {list(image.shape)}")
            x = image.detach().float()
        else:
            x = preprocess_image(image, a.height, a.width, "control_image")
        n = x.shape[0]
        if n not in (1, a.batch):
            raise ValueError(f"got {n} control images for {a.batch} prompts: give one, or one per prompt")
        return x.repeat_interleave(a.total if n == 1 else a.num_images_per_prompt, dim=0)

    def _control_input(self, a, net: FluxControlNetModel, pixels: Tensor) -> Tensor:
        """The net's input: pixels for a hint block (no draw), else packed VAE latents sampled with the generator."""
        if net.config.has_hint_block:
            return pixels.to(self.device)
        return pack(self.encode_image(pixels, a.generator)).to(self.device)
