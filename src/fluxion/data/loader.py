"""Shapes-world batches rendered ahead in worker processes, for trainers whose model outruns one CPU core
(a GPU renders nothing itself: at ~1 ms per image, one core feeds about 1000 images/s)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .shapes import KIND_PROBS, make_batch


class _Batches(Dataset):
    """Item k is training step `start + k`'s batch: make_batch keys every image on (seed, step, i), so the workers
    produce exactly what the main process would and a resumed run sees the same data."""

    def __init__(self, seed: int, start: int, stop: int, batch_size: int, mix: dict):
        self.seed, self.start, self.stop, self.batch_size, self.mix = seed, start, stop, batch_size, mix

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, k: int):
        step = self.start + k
        images, captions = make_batch(self.seed, step, self.batch_size, **self.mix)
        return step, torch.from_numpy(images), captions


class BatchSource:
    """`source(step)` -> (uint8 images [B, H, W, 3] as numpy, captions). With workers > 0 the batches of the steps
    after the first one asked for are rendered ahead, in order; asking out of order falls back to rendering."""

    def __init__(self, seed: int, stop: int, batch_size: int, workers: int = 0, paraphrase: bool = True,
                 kind_probs: tuple = KIND_PROBS, shape_only: float = 0.0, off_palette: float = 0.0):
        self.seed, self.stop, self.batch_size, self.workers = seed, stop, batch_size, workers
        # make_batch's keywords, in one place for the main process and the workers alike.
        self.mix = dict(paraphrase=paraphrase, kind_probs=tuple(kind_probs), shape_only=float(shape_only),
                        off_palette=float(off_palette))
        self._ahead = None

    @classmethod
    def for_run(cls, cfg, paraphrase: bool = True) -> "BatchSource":
        """The batches of a training run's config (seed, steps, batch_size, data_workers; kind_probs,
        shape_only_captions and off_palette_shapes, the mix)."""
        return cls(cfg.seed, cfg.steps, cfg.batch_size, cfg.data_workers, paraphrase, cfg.kind_probs,
                   cfg.shape_only_captions, cfg.off_palette_shapes)

    def _start(self, step: int):
        loader = DataLoader(_Batches(self.seed, step, self.stop, self.batch_size, self.mix),
                            batch_size=None, num_workers=self.workers, prefetch_factor=4, persistent_workers=False)
        return iter(loader)

    def __call__(self, step: int) -> tuple[np.ndarray, list[str]]:
        if self.workers <= 0 or step >= self.stop:
            return make_batch(self.seed, step, self.batch_size, **self.mix)
        if self._ahead is None:
            self._ahead = self._start(step)
        got = next(self._ahead, None)
        if got is None or got[0] != step:  # out of order (or past the end): start again from here
            self._ahead = self._start(step)
            got = next(self._ahead)
        return got[1].numpy(), list(got[2])
