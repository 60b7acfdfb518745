"""The few collectives sequence parallelism needs, over one process group, with a probed fallback.

`all_to_all_single` is what Ulysses wants; some backends (older gloo builds) lack it. `Collectives` probes it
once on a tiny tensor and, where it raises, does the same exchange with `all_gather` and a local selection
(P times the traffic: a fallback, not a plan). Inference only: plain `torch.distributed`, no autograd.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class Collectives:
    """all-to-all / all-gather / all-reduce over `group` (None: the default group)."""

    def __init__(self, group=None, probe: bool = True):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.all_to_all_works = self._probe() if probe else False
        self.bytes_received = 0  # by all_to_all and all_gather since creation (the communication_bytes count)

    def _probe(self) -> bool:
        """Whether this backend runs `all_to_all_single` (every rank gets the same answer: the same backend)."""
        if self.size == 1:
            return True
        x = torch.arange(self.size, dtype=torch.float32, device=_device(self.group)) + self.rank * self.size
        out = torch.empty_like(x)
        try:
            dist.all_to_all_single(out, x, group=self.group)
        except (RuntimeError, NotImplementedError, ValueError):
            return False
        expect = torch.arange(self.size, dtype=torch.float32, device=x.device) * self.size + self.rank
        return bool(torch.equal(out, expect))

    def all_to_all(self, x: Tensor) -> Tensor:
        """x [P, ...]: row j goes to rank j; returns [P, ...] whose row j came from rank j."""
        if self.size == 1:
            return x
        x = x.contiguous()
        if self.all_to_all_works:
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x, group=self.group)
            self.bytes_received += _nbytes(x) * (self.size - 1) // self.size
            return out
        parts = self.all_gather(x)  # fallback: everyone's whole tensor, keep the row meant for this rank
        return torch.stack([p[self.rank] for p in parts])

    def all_gather(self, x: Tensor) -> list[Tensor]:
        """Every rank's `x` (same shape everywhere), in rank order."""
        if self.size == 1:
            return [x]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        self.bytes_received += _nbytes(x) * (self.size - 1)
        return parts

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        if self.size == 1:
            return x
        x = x.clone().contiguous()
        dist.all_reduce(x, group=self.group)
        return x


def _device(group) -> torch.device:
    """The device a backend's tensors live on: CUDA for NCCL, the CPU otherwise."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()
