"""Training state on disk: atomic checkpoints, EMA weights."""
from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_path


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a kill never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: str | os.PathLike) -> dict | None:
    """A training checkpoint, or None where there is none. Loaded with `weights_only=True`: tensors and plain
    values only, so a planted file cannot run code when a run resumes (a full unpickle would)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not a fluxion checkpoint: it holds objects other than tensors and plain values, "
                         f"which fluxion never unpickles (delete it, or resume from a checkpoint fluxion wrote): "
                         f"{str(e).splitlines()[0]}") from None


def check_resume(saved: dict, new: dict, keys: tuple[str, ...], where: str | os.PathLike) -> None:
    """Refuse, by name and before anything is written, to resume a run whose settings that shape the saved
    state (architecture, adapter layers and rank, data order) differ from the new ones."""
    def plain(v):  # tuples and lists, as JSON gives them back
        return json.loads(json.dumps(v))

    for key in keys:
        if key in saved and plain(saved[key]) != plain(new.get(key)):
            raise ValueError(f"{where}: cannot resume: {key} was {saved[key]!r} in the saved run, now "
                             f"{new.get(key)!r}; use the saved value, or start over (--fresh)")


class EMA:
    """Exponential moving average of a module's parameters (kept in float32)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages follow the weights closely
        ours = list(self.model.parameters())
        theirs = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ours, theirs, 1 - d)  # one fused call: a GPU would otherwise launch one per tensor

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd)
