"""Latent adversarial distillation (`fluxion distill CONFIG`, method: adversarial): LADD (Sauer et al. 2024,
FLUX.1-schnell's method) on the reflow task's teacher pairs, toward a few-step, CFG-free student.

Why: regression on (noise, teacher sample) pairs levels off (README, "Few-step generation"): from pure noise the
student cannot tell which of the layouts the teacher would settle on, so it learns their average, merged blobs.
An adversarial loss asks for a sample that looks like *some* teacher sample for the prompt, not their mean.

- student: as reflow's (the teacher's transformer, or `init_from`'s, optionally deepened); at one of the noise
  levels it samples at (`student_steps` at `student_shift`) it sees the pair's point on the straight line and
  predicts its clean latent x̂ = x_s - s v̂ in one step;
- discriminator: the frozen teacher's own features, as in LADD. x̂ and the teacher's sample x are both noised
  again to a level s' (logit-normal, `adv_noise_mean`/`adv_noise_std`; higher levels judge the layout, lower the
  detail) with the same noise, and the teacher runs on both; a small head per teacher block reads its image
  tokens as a feature map, conditioned on the teacher's modulation vector (s' and the pooled prompt), and scores
  every position (hinge loss). Only the heads learn on the discriminator's side;
- inputs (`backward_simulation`): the pair's point on its straight line, or the student's own steps from the
  pair's noise (DMD2's backward simulation: what the 4-step sampler really feeds it at each level, so the game is
  played on its own trajectory); the regression target is, either way, the velocity that takes the input to the
  teacher's sample in one step, (x_s - x) / s (z - x on the line);
- objective, per row: the heads' hinge loss on (real, fake), plus `adv_weight` times the student's loss
  -D(fake), plus `reg_weight` times reflow's pseudo-Huber regression on the pair (the anchor that keeps the
  student on its teacher's pairs; 0 is pure LADD); the adversarial terms only on rows whose student level is at
  least `adv_min_level` (1: the first step alone). The three are summed into one loss and one optimizer step:
  each part reaches only its own player's weights (the heads see x̂ detached; the student's term reads the
  heads through detached weights), and the heads learn `disc_lr_scale` times faster than the student.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..flow import noised, sample_sigmas
from ..model.transformer import FluxTransformer, Prepared
from .reflow import ReflowTask, pseudo_huber_per_row


def teacher_tokens(teacher: FluxTransformer, img, img_ids, txt, txt_ids, sigma, pooled) -> tuple[list, torch.Tensor]:
    """The teacher's image tokens after each of its blocks ([B, N, hidden] each, double blocks then single) and
    its modulation vector [B, hidden] (noise level + pooled prompt): the discriminator's inputs."""
    batch = img.shape[0]
    vec = teacher.conditioning(sigma, pooled, None)
    p = Prepared(vec, None, *teacher.text_and_positions(txt, txt_ids, img_ids, batch))
    img, txt_h, feats = teacher.img_in(img.to(teacher.compute_dtype)), p.txt, []
    for i in range(len(teacher.double_blocks)):
        img, txt_h = teacher.double_stream(img, p, start=i, stop=i + 1, txt=txt_h)
        feats.append(img)
    n_txt, depth = txt_h.shape[1], len(teacher.double_blocks)
    joint = torch.cat([txt_h, img], dim=1)
    for i, block in enumerate(teacher.single_blocks):
        joint = block(joint, p.vec, p.pe, p.mod(depth + i), None)
        feats.append(joint[:, n_txt:])
    return feats, vec


class DiscriminatorHead(nn.Module):
    """Scores one teacher block's image tokens, per position: a 3x3 convolution over the token grid, modulated by
    the teacher's conditioning vector, then a per-position logit plus a projection term (the pooled features
    against the conditioning: does this layout fit this prompt at this noise level)."""

    def __init__(self, dim: int, cond_dim: int, width: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(dim, width, 3, padding=1)
        self.norm = nn.GroupNorm(8, width)
        self.film = nn.Linear(cond_dim, 2 * width)
        self.mix = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, 1, 1)
        self.project = nn.Linear(cond_dim, width)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        side = math.isqrt(n)
        h = F.silu(self.norm(self.conv(tokens.float().transpose(1, 2).reshape(b, c, side, side))))
        scale, shift = self.film(cond.float()).chunk(2, dim=-1)
        h = F.silu(self.mix(h * (1 + scale[..., None, None]) + shift[..., None, None]))
        fit = (h.mean((2, 3)) * self.project(cond.float())).sum(-1, keepdim=True) / math.sqrt(h.shape[1])
        return self.out(h).flatten(1) + fit  # [B, positions]


def hinge_per_row(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """The discriminator's hinge loss per row, averaged over heads and positions."""
    terms = [F.relu(1 - r).mean(1) + F.relu(1 + f).mean(1) for r, f in zip(real, fake)]
    return torch.stack(terms).mean(0)


class AdversarialTask(ReflowTask):
    def __init__(self, cfg, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        self.teacher = self.pipe.transformer  # frozen (frozen_pipeline); not a submodule: never saved or trained
        c = self.teacher.config
        heads = len(self.teacher.double_blocks) + len(self.teacher.single_blocks)
        self.heads = nn.ModuleList(DiscriminatorHead(c.hidden_size, c.hidden_size, cfg.disc_width)
                                   for _ in range(heads)).to(self.device)

    def lr_scale(self, name: str) -> float:
        """The heads start from nothing and must keep up with the student: they learn `disc_lr_scale` x faster."""
        return self.cfg.disc_lr_scale if name.startswith("heads.") else 1.0

    def batch(self, step: int, generator: torch.Generator) -> dict:
        cfg = self.cfg
        rows = super().batch(step, generator)
        n = len(rows["idx"])
        rows["adv_sigma"] = sample_sigmas(n, "logit_normal", generator, cfg.adv_noise_mean, cfg.adv_noise_std)
        rows["adv_noise"] = torch.randn((n, *self.noise.shape[1:]), generator=generator)
        return rows

    @torch.no_grad()
    def simulate(self, z: torch.Tensor, sigma: torch.Tensor, prompt) -> torch.Tensor:
        """Each row's input as the exported sampler would give it: the student's own Euler steps from the pair's
        noise z down to the row's level (backward simulation, DMD2), not the point on the pair's straight line."""
        x, levels = z.clone(), self.levels.tolist()
        for here, there in zip(levels, levels[1:]):
            go = sigma < here - 1e-6  # rows whose level is further down the schedule
            if not go.any():
                break
            level = torch.full((int(go.sum()),), here, device=z.device)
            v = self.student(x[go], self.img_ids, prompt[0][go], prompt[2], level, prompt[1][go],
                             self.guidance(int(go.sum())))
            x[go] = x[go] + (there - here) * v.to(x.dtype)
        return x

    def features(self, latents, sigma, noise, prompt) -> tuple[list, torch.Tensor]:
        """The teacher's block tokens for `latents` noised to `sigma` with `noise`, and its (detached) conditioning."""
        txt, pooled, txt_ids = prompt
        feats, vec = teacher_tokens(self.teacher, noised(latents, noise, sigma), self.img_ids, txt, txt_ids, sigma,
                                    pooled)
        return feats, vec.detach()

    def judge(self, feats: list, vec: torch.Tensor, frozen: bool = False) -> list[torch.Tensor]:
        """Every head's per-position logits; `frozen`: through detached copies of the heads' weights (the student's
        term, which must not train the heads)."""
        if not frozen:
            return [head(f, vec) for head, f in zip(self.heads, feats)]
        return [functional_call(head, {k: v.detach() for k, v in head.named_parameters()}, (f, vec))
                for head, f in zip(self.heads, feats)]

    def parts(self, rows: dict, play: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The objective's three per-row parts: `disc` (the heads' hinge loss; gradient to the heads only), `gen`
        (the student's adversarial loss -D(fake); to the student only) and `reg` (reflow's regression), with the
        logits `real` and `fake` ([heads, playing rows]) for logging. The game (teacher and heads) runs only on the
        rows in the boolean mask `play` (default: all); the others get 0 for `disc` and `gen`. With none playing
        the heads still run on an empty batch, so every weight has a (zero) gradient, as DDP wants of each step."""
        cfg = self.cfg
        idx, sigma = rows["idx"], rows["sigma"].to(self.device)
        adv_sigma, adv_noise = rows["adv_sigma"].to(self.device), rows["adv_noise"].to(self.device)
        z, x = self.noise[idx].to(self.device), self.sample[idx].to(self.device)
        prompt = self.prompt_embeddings(idx)
        x_s = self.simulate(z, sigma, prompt) if cfg.backward_simulation else noised(x, z, sigma)
        pred = self.student(x_s, self.img_ids, prompt[0], prompt[2], sigma, prompt[1], self.guidance(len(idx)))
        x_hat = x_s.float() - sigma[:, None, None] * pred.float()  # the student's clean latent in one step
        on = torch.arange(len(idx), device=self.device)
        if play is not None:
            on = on[play.to(self.device)]
        game = (prompt[0][on], prompt[1][on], prompt[2])
        with torch.no_grad():
            real_feats, real_vec = self.features(x[on], adv_sigma[on], adv_noise[on], game)
        fake_feats, fake_vec = self.features(x_hat[on], adv_sigma[on], adv_noise[on], game)  # differentiable in x_hat
        real = self.judge(real_feats, real_vec)
        fake_heads = self.judge([f.detach() for f in fake_feats], fake_vec)  # gradient to the heads only
        fake_student = self.judge(fake_feats, fake_vec, frozen=True)  # gradient to the student only
        def every_row(values):  # the playing rows' values in place, 0 elsewhere (differentiable)
            return sigma.new_zeros(len(idx)).index_put((on,), values.float())

        return {"disc": every_row(hinge_per_row(real, fake_heads)),
                "gen": every_row(-torch.stack([f.mean(1) for f in fake_student]).mean(0)),
                "reg": pseudo_huber_per_row(pred, (x_s.float() - x) / sigma[:, None, None], cfg.huber_c),
                "real": torch.stack([r.mean(1) for r in real]).detach(),
                "fake": torch.stack([f.mean(1) for f in fake_heads]).detach()}

    def forward(self, rows: dict) -> tuple[torch.Tensor, dict]:
        # the adversarial game only on rows whose student level is at least adv_min_level: below it the pair's
        # line already fixes the layout, the one-step sample is near the teacher's, and a "fake" label is noise
        on = rows["sigma"].to(self.device) >= self.cfg.adv_min_level
        p = self.parts(rows, play=on)
        logs = {"reg": p["reg"].mean().item()}
        if on.any():  # the game's figures over the rows that play it
            logs.update(d=p["disc"][on].mean().item(), g=p["gen"][on].mean().item(),
                        d_acc=((p["real"] > 0).float().mean() + (p["fake"] < 0).float().mean()).item() / 2)
        return p["disc"] + self.cfg.adv_weight * p["gen"] + self.cfg.reg_weight * p["reg"], logs

    def about(self) -> dict:
        c = self.cfg
        return {**super().about(), "adv_weight": c.adv_weight, "reg_weight": c.reg_weight,
                "adv_min_level": c.adv_min_level, "backward_simulation": c.backward_simulation}
