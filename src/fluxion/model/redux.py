"""FLUX.1 Redux's image embedder: SigLIP patch features -> extra T5-space text tokens.

`redux_up` Linear(redux_dim -> 3 * txt_in_features), SiLU, `redux_down` Linear(-> txt_in_features), as BFL's
`flux1-redux-dev.safetensors` and diffusers' `ReduxImageEncoder` (redux_dim 1152, txt_in_features 4096). Both
layouts use the same four tensor names, so one loader reads the original file and the diffusers folder
(`image_embedder/`); the configuration is read from the tensors' shapes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.safetensors_file import CheckpointError, SafetensorsFile

KEYS = ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias")


@dataclass(frozen=True)
class ReduxConfig:
    redux_dim: int = 1152
    txt_in_features: int = 4096


class ReduxImageEncoder(nn.Module):
    def __init__(self, redux_dim: int = 1152, txt_in_features: int = 4096):
        super().__init__()
        self.config = ReduxConfig(redux_dim, txt_in_features)
        self.redux_up = nn.Linear(redux_dim, txt_in_features * 3)
        self.redux_down = nn.Linear(txt_in_features * 3, txt_in_features)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, redux_dim] SigLIP features -> [B, N, txt_in_features] tokens."""
        return self.redux_down(nn.functional.silu(self.redux_up(x)))

    @property
    def dtype(self) -> torch.dtype:
        return self.redux_up.weight.dtype

    # ------------------------------------------------------------ loading

    @staticmethod
    def config_from_shapes(shapes: dict[str, tuple[int, ...]], where: str = "state dict") -> ReduxConfig:
        """The configuration a set of tensor shapes describes; one clear error naming the first wrong tensor."""
        for name in shapes:
            if name not in KEYS:
                raise CheckpointError(f"{where}: {name!r} is not a Redux image-embedder tensor (expected {list(KEYS)})")
        for name in KEYS:
            if name not in shapes:
                raise CheckpointError(f"{where}: missing {name!r} (a Redux image embedder has {list(KEYS)})")
        up, down = tuple(shapes["redux_up.weight"]), tuple(shapes["redux_down.weight"])
        if len(up) != 2 or len(down) != 2:
            raise CheckpointError(f"{where}: 'redux_up.weight' {list(up)} / 'redux_down.weight' {list(down)} "
                                  "must be 2-D")
        txt, redux = down[0], up[1]
        expected = {"redux_up.weight": (3 * txt, redux), "redux_up.bias": (3 * txt,),
                    "redux_down.weight": (txt, 3 * txt), "redux_down.bias": (txt,)}
        for name in KEYS:
            if tuple(shapes[name]) != expected[name]:
                raise CheckpointError(f"{where}: {name!r} has shape {list(shapes[name])}, expected "
                                      f"{list(expected[name])} (redux_dim {redux}, txt_in_features {txt})")
        return ReduxConfig(redux, txt)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], dtype: torch.dtype | None = None,
                        where: str = "state dict") -> "ReduxImageEncoder":
        cfg = cls.config_from_shapes({k: tuple(v.shape) for k, v in state_dict.items()}, where)
        with torch.device("meta"):
            model = cls(cfg.redux_dim, cfg.txt_in_features)
        model.load_state_dict({k: v.to(dtype) if dtype else v.clone() for k, v in state_dict.items()}, assign=True)
        return model.eval()

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> "ReduxImageEncoder":
        """BFL's `flux1-redux-dev.safetensors` (or the diffusers `image_embedder/` weights file)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such Redux image-embedder file")
        f = SafetensorsFile(path)
        cls.config_from_shapes({k: f.shape(k) for k in f.keys()}, str(path))  # before reading any tensor
        return cls.from_state_dict({k: f.get(k, torch_dtype) for k in f.keys()}, torch_dtype, str(path))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> "ReduxImageEncoder":
        """A diffusers `ReduxImageEncoder` folder (config.json + diffusion_pytorch_model.safetensors), or a file."""
        folder = Path(folder)
        if folder.is_file():
            return cls.from_single_file(folder, torch_dtype)
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if len(files) != 1:
            raise CheckpointError(f"{folder}: expected one .safetensors file of Redux image-embedder weights, "
                                  f"found {len(files)}")
        model = cls.from_single_file(files[0], torch_dtype)
        config = folder / "config.json"
        if config.is_file():
            try:
                declared = json.loads(config.read_text())
            except ValueError as e:
                raise CheckpointError(f"{config}: not valid JSON ({e})") from None
            for key in ("redux_dim", "txt_in_features"):
                if key in declared and declared[key] != getattr(model.config, key):
                    raise CheckpointError(f"{config}: {key} {declared[key]} but the weights have "
                                          f"{getattr(model.config, key)}")
        return model
