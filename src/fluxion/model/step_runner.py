"""StepRunner: the transformer over the steps of one generation, reusing what does not change between steps.

Exact reuse: the text projection `txt_in(txt)` and the RoPE table depend only on the prompt and the token
layout, so they are computed once per generation instead of once per step. When every step's timestep (and
distilled-guidance value) is known ahead, the modulation of all steps is computed in one batched pass on the
first call: at batch 1 the modulation weights (a quarter of FLUX.1's parameters) are then read once per
image instead of once per step.

First-block cache ("fbcache", after ParaAttention's FBCache): run the first double block; if its image
residual changed, relative to the last fully computed step, by less than `threshold` (mean absolute
difference over mean absolute value, per image; a batch skips only when every image does), skip every
other block and add the residual those blocks produced at that last full step. 0 disables it; 0.2-0.25
keep fluxion-mini's eval accuracy within a point at ~1.8-1.9x (README); higher is faster and rougher.

A runner belongs to one call and one prediction stream (the negative prompt of true CFG gets its own): the
pipeline makes them per call, so concurrent calls share nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from .transformer import BlockResiduals, FluxTransformer, Prepared, per_item


@dataclass
class StepRunner:
    transformer: FluxTransformer
    threshold: float = 0.0
    timesteps: list[float] | None = None  # every step's t, known ahead: conditioning is batched over steps
    guidances: list | None = None  # every step's distilled guidance, a number or a tuple with one per image
    # (per-sample guidance; repeated over stacked true-CFG rows); None: the model has no embedder
    stats: dict = field(default_factory=lambda: {"steps": 0, "skipped": 0})
    _text_key: tuple = ()  # the (txt, txt_ids, img_ids) objects the reused values were computed from
    _text: tuple = ()
    _cond_key: tuple = ()
    _cond: tuple = ()  # (vec for all steps, modulations for all steps)
    _first: Tensor | None = None  # first block's image residual at the last full step
    _rest: Tensor | None = None  # the remaining blocks' image residual at that step

    def __call__(self, step: int, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, t: Tensor, y: Tensor,
                 guidance: Tensor | None = None, attn_mask: Tensor | None = None,
                 residuals: BlockResiduals | None = None) -> Tensor:
        """The transformer's forward at sampling step `step` (same arguments), with reuse across steps."""
        tf = self.transformer
        batch = img.shape[0]
        p = Prepared(*self._conditioning(step, t, y, guidance, batch), *self._text_and_positions(txt, txt_ids, img_ids, batch))
        if self.threshold <= 0:
            return tf(img, img_ids, txt, txt_ids, t, y, guidance, attn_mask=attn_mask, residuals=residuals, prepared=p)
        img = tf.img_in(img.to(tf.compute_dtype))
        img, p, attn_mask, residuals = tf.shard_blocks(img, p, attn_mask, residuals)  # as is in one process
        before = img
        img, txt_h = tf.double_stream(img, p, attn_mask, residuals, start=0, stop=1)
        first = img - before
        self.stats["steps"] += 1
        if self._reusable(first, attn_mask):
            self.stats["skipped"] += 1
            return tf.gather_tokens(tf.final_layer(img + self._rest, p.vec, p.mod(-1)), attn_mask)
        before = img
        img, txt_h = tf.double_stream(img, p, attn_mask, residuals, start=1, txt=txt_h)
        img = tf.single_stream(img, txt_h, p, attn_mask, residuals)
        self._first, self._rest = first, img - before
        return tf.gather_tokens(tf.final_layer(img, p.vec, p.mod(-1)), attn_mask)

    def _conditioning(self, step: int, t: Tensor, y: Tensor, guidance: Tensor | None, batch: int):
        """(vec, modulations or None) of this step, sliced from every step's when they are known ahead."""
        tf = self.transformer
        t, guidance = per_item(t, batch), per_item(guidance, batch)
        if not self.timesteps or step >= len(self.timesteps) or bool((t != t[0]).any()) \
                or not _tiles(self.guidances, batch):
            return tf.conditioning(t, y, guidance), None
        if not _same_objects((y,), self._cond_key):
            s = len(self.timesteps)
            ts = torch.as_tensor(self.timesteps, dtype=t.dtype, device=t.device)  # rounded as the sampler rounds
            g = None if self.guidances is None else torch.as_tensor(
                [v for value in self.guidances for v in _step_rows(value, batch)], dtype=torch.float32,
                device=t.device)
            vec = tf.conditioning(ts.repeat_interleave(batch), y.repeat(s, 1), g)
            self._cond, self._cond_key = (vec, tf.modulations(vec)), (y,)
        rows = slice(step * batch, step * batch + batch)
        vec, mods = self._cond
        return vec[rows], tree_map(lambda m: m[rows], mods)

    def _text_and_positions(self, txt: Tensor, txt_ids: Tensor, img_ids: Tensor, batch: int):
        key = (txt, txt_ids, img_ids)
        if not _same_objects(key, self._text_key):
            self._text, self._text_key = self.transformer.text_and_positions(txt, txt_ids, img_ids, batch), key
        return self._text

    def _reusable(self, first: Tensor, layout=None) -> bool:
        prev = self._first
        if prev is None or self._rest is None or prev.shape != first.shape:
            return False
        # Per image, then the largest: a batch skips only when every image in it (CFG halves included) is stable.
        sp = self.transformer.parallel
        if sp is not None:  # over every rank's tokens: all ranks take the same decision
            return sp.relative_change(first, prev, layout).max().item() < self.threshold
        change = (first - prev).abs().flatten(1).mean(1) / prev.abs().flatten(1).mean(1).clamp_min(1e-12)
        return change.max().item() < self.threshold


def _tiles(guidances: list | None, batch: int) -> bool:
    """Whether every step's guidance fills `batch` rows (a per-image tuple must divide it: [cond; uncond])."""
    return guidances is None or all(not isinstance(v, tuple) or batch % len(v) == 0 for v in guidances)


def _step_rows(value, batch: int) -> list[float]:
    """One step's guidance for each of `batch` rows: a number for all, or per-image values tiled over stacks."""
    if isinstance(value, tuple):
        return [float(v) for v in value] * (batch // len(value))
    return [float(value)] * batch


def _same_objects(key: tuple, previous: tuple) -> bool:
    """Whether `key` holds the very tensors `previous` held (identity: tensors are not hashed or compared)."""
    return len(key) == len(previous) and all(a is b for a, b in zip(key, previous))
