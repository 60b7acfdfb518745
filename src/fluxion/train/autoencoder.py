"""Training the FLUX autoencoder on the shapes world: reconstruction + a light KL term."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..checkpoints import load_autoencoder
from ..checkpoints.diffusers import autoencoder_diffusers_config, autoencoder_to_diffusers, save_diffusers_part
from ..data.loader import BatchSource
from ..data.shapes import CANVAS, make_batch
from ..model.autoencoder import AutoEncoder, AutoEncoderConfig
from ..images import grid, images_to_tensor, tensor_to_images
from .config import TrainConfig


class AutoencoderTask(torch.nn.Module):
    """Reconstruction (L1 + MSE) and a light KL term; a task of the one trainer (`fluxion.train.trainer`)."""

    def __init__(self, cfg: TrainConfig, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg = cfg
        if cfg.vae_init:  # go on from a trained one; its own architecture, in training form
            init = load_autoencoder(cfg.vae_init)
            self.init_scale_shift = init.config.scale_factor, init.config.shift_factor
            self.model = AutoEncoder(AutoEncoderConfig(**{**init.config.to_dict(), "scale_factor": 1.0,
                                                          "shift_factor": 0.0}))
            self.model.load_state_dict(init.state_dict())
        else:  # scale/shift are measured on the data at export; identity while training
            self.model = AutoEncoder(AutoEncoderConfig(**{"scale_factor": 1.0, "shift_factor": 0.0, **cfg.autoencoder}))
        if cfg.decoder_only:
            self.model.encoder.requires_grad_(False)
        self.device = torch.device(device)
        self.model.to(self.device)
        f = self.model.downsample_factor
        self.latent = self.model.config.z_channels, CANVAS // f, CANVAS // f
        self.batches = BatchSource.for_run(cfg, paraphrase=False)

    def ema_module(self) -> torch.nn.Module:
        return self.model

    def batch(self, step: int, generator: torch.Generator) -> dict:
        images, _ = self.batches(step)
        return {"images": images, "noise": torch.randn((len(images), *self.latent), generator=generator)}

    def forward(self, rows: dict) -> tuple[torch.Tensor, dict]:
        x = images_to_tensor(rows["images"], self.device)
        with torch.set_grad_enabled(not self.cfg.decoder_only):
            mean, logvar = self.model.encode_moments(x)
        z = mean + torch.exp(0.5 * logvar) * rows["noise"].to(self.device)
        recon = self.model.decoder(z)
        l1 = (recon.float() - x).abs().flatten(1).mean(1)
        mse = (recon.float() - x).pow(2).flatten(1).mean(1)
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).flatten(1).mean(1)
        logs = {"l1": l1.mean().item(), "mse": mse.mean().item(), "kl": kl.mean().item()}  # this process's rows
        return l1 + mse + self.cfg.kl_weight * kl, logs

    @torch.no_grad()
    def sample_grid(self, model: torch.nn.Module, step: int) -> Image.Image:
        images, _ = make_batch(self.cfg.seed + 1, 0, 8, paraphrase=False)
        x = images_to_tensor(images, self.device)
        recon = model.decoder(model.encode_moments(x)[0])
        return grid(tensor_to_images(x) + tensor_to_images(recon), columns=8)

    @torch.no_grad()
    def latent_stats(self, model: AutoEncoder, batches: int = 8) -> tuple[float, float]:
        """Mean and std of the posterior means over fresh data: FLUX-style shift and 1/scale."""
        zs = []
        for i in range(batches):
            images, _ = make_batch(self.cfg.seed + 2, i, 32, paraphrase=False)
            zs.append(model.encode_moments(images_to_tensor(images, self.device))[0].float())
        z = torch.cat(zs)
        return z.mean().item(), z.std().item()

    def export(self, model: AutoEncoder, folder: Path) -> None:
        if self.cfg.decoder_only:  # the latent space is the initial one's, scale and shift included
            scale, shift = self.init_scale_shift
        else:
            shift, std = self.latent_stats(model)
            scale, shift = round(1 / std, 4), round(shift, 4)
        config = AutoEncoderConfig(**{**model.config.to_dict(), "scale_factor": scale, "shift_factor": shift})
        save_diffusers_part(autoencoder_to_diffusers(model.state_dict(), config), autoencoder_diffusers_config(config),
                            Path(folder))
