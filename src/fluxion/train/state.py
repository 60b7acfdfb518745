"""Training state on disk: one atomic safetensors checkpoint (tensors) with a JSON header (everything else), and
the EMA weights.

No pickle anywhere: a checkpoint is a safetensors file whose metadata holds one JSON document (step, loss history,
config, optimizer hyper-parameters), so a file from elsewhere cannot run code when a run resumes. Tensors are
full (unsharded) and optimizer state is keyed by parameter name, so a checkpoint written by any number of
processes resumes on any other number (`fluxion.train.trainer`).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import atomic_path

FORMAT = "fluxion-train-checkpoint/1"


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, dict[str, torch.Tensor]], info: dict) -> None:
    """Write groups of named tensors ({"model": {...}, "optimizer": {...}, ...}) and a JSON-able `info` to `path`,
    atomically (temp file, fsync, rename): a kill never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{group}/{name}": t.detach().cpu().contiguous() for group, named in tensors.items()
            for name, t in named.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"format": FORMAT, "info": json.dumps(info)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def load_checkpoint(path: str | os.PathLike) -> dict | None:
    """{"info": dict, "<group>": {name: tensor}} of a checkpoint, or None where there is none. Anything that is not
    a fluxion checkpoint (an old pickle, a planted file) is refused by name; nothing in it is executed."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"its format is {meta.get('format')!r}")
        flat = load_file(str(path))
        out: dict = {"info": json.loads(meta["info"])}
    except (SafetensorError, ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path}: not a fluxion checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         f"delete it, or resume from a checkpoint fluxion wrote (fluxion never unpickles "
                         f"checkpoints)") from None
    for key, t in flat.items():
        group, _, name = key.partition("/")
        out.setdefault(group, {})[name] = t
    return out


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint's full form: {"state": {name: {key: value}},
    "param_groups": [{..., "params": [names]}]}) -> (tensors "name:key", JSON-able param groups)."""
    tensors = {f"{name}:{key}": torch.as_tensor(v) for name, s in state["state"].items() for key, v in s.items()}
    groups = json.loads(json.dumps(state["param_groups"], default=list))
    return tensors, groups


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition(":")
        state.setdefault(name, {})[field] = t
    for g in groups:  # JSON turned tuples into lists
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


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
        """Each tensor once: tied weights (T5's shared embedding is also its encoder's embed_tokens) under their
        first name, as safetensors requires."""
        out, seen = {}, set()
        for name, tensor in self.model.state_dict().items():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                out[name] = tensor
        return out

    def load_state_dict(self, sd: dict) -> None:
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        ours = self.state_dict()
        if unexpected or any(name in ours for name in missing):  # only tied aliases may be absent
            raise ValueError(f"EMA state does not fit the model: missing {[m for m in missing if m in ours][:3]}, "
                             f"unexpected {unexpected[:3]}")
