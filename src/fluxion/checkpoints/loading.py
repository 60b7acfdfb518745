"""Build a module on the meta device, then fill it tensor by tensor from checkpoint files.

A `Recipe` says how one model tensor is made from stored tensors (renamed, concatenated, halves swapped,
reshaped), so every format is a dict of recipes. Everything is checked against the file headers first,
before any tensor is read, so a bad file fails fast with the file and tensor named.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..files import inside
from .safetensors_file import CheckpointError, SafetensorsFile, refuse_integer_weights


class TensorStore:
    """Tensors from one or more .safetensors files (a sharded checkpoint), by name."""

    def __init__(self, files: Sequence[SafetensorsFile], strip_prefix: str = ""):
        self.files = list(files)
        self.prefix = strip_prefix
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        for f in self.files:
            for key in f.keys():
                name = key[len(strip_prefix) :] if strip_prefix and key.startswith(strip_prefix) else key
                self._where[name] = (f, key)

    @classmethod
    def open(cls, path: str | Path, strip_prefix: str = "") -> "TensorStore":
        """A .safetensors file, a sharded index (.safetensors.index.json), or a folder holding either."""
        path = Path(path)
        if path.is_dir():
            indexes = sorted(path.glob("*.safetensors.index.json"))
            singles = sorted(path.glob("*.safetensors"))
            if indexes:
                path = indexes[0]
            elif len(singles) == 1:
                path = singles[0]
            elif not singles:
                raise CheckpointError(f"{path}: no .safetensors file or .safetensors.index.json in this folder")
            else:
                raise CheckpointError(f"{path}: several .safetensors files and no index: pass the file to load")
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: unreadable shard index ({e})") from None
            shards = {}
            for key, shard in weight_map.items():
                if shard not in shards:
                    try:
                        shard_path = inside(path.parent, shard, f"{path}: the index")
                    except ValueError as e:
                        raise CheckpointError(str(e)) from None
                    shards[shard] = SafetensorsFile(shard_path)
                if key not in shards[shard]:
                    raise CheckpointError(f"{path}: the index puts {key!r} in {shard}, which does not hold it")
            return cls(list(shards.values()), strip_prefix)
        return cls([SafetensorsFile(path)], strip_prefix)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name][0].path

    def describe(self) -> str:
        return str(self.files[0].path) if len(self.files) == 1 else f"{self.files[0].path.parent} ({len(self.files)} shards)"

    def shape(self, name: str) -> tuple[int, ...]:
        f, key = self._where[name]
        return f.shape(key)

    def dtype(self, name: str) -> torch.dtype:
        f, key = self._where[name]
        return f.dtype(key)

    def get(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        f, key = self._where[name]
        return f.get(key, dtype)

    def release(self, name: str) -> None:
        f, key = self._where[name]
        f.release(key)

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in self.files)

    def metadata(self) -> dict[str, str]:
        return self.files[0].metadata


# ---------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    sources: tuple[str, ...]
    combine: str = "same"  # same | cat | swap_halves | to_conv1x1

    def shape(self, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if self.combine == "cat":
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        if self.combine == "to_conv1x1":
            return (*shapes[0], 1, 1)
        return shapes[0]

    def build(self, tensors: list[Tensor]) -> Tensor:
        if self.combine == "cat":
            return torch.cat(tensors, dim=0)
        if self.combine == "swap_halves":
            a, b = tensors[0].chunk(2, dim=0)
            return torch.cat([b, a], dim=0)
        if self.combine == "to_conv1x1":
            return tensors[0][:, :, None, None]
        return tensors[0]


def identity_recipes(names: Sequence[str]) -> dict[str, Recipe]:
    return {n: Recipe((n,)) for n in names}


def check_recipes(model: nn.Module, recipes: dict[str, Recipe], store: TensorStore) -> None:
    """Missing, unexpected and wrong-shaped tensors, from headers only; raises one clear error."""
    where = store.describe()
    expected = dict(model.state_dict())
    for name in expected:
        if name not in recipes:
            raise CheckpointError(f"{where}: no source for model tensor {name!r}")
        for src in recipes[name].sources:
            if src not in store:
                raise CheckpointError(
                    f"{where}: missing tensor {store.prefix + src!r} (needed for {name!r}): the checkpoint is "
                    "incomplete or of another architecture"
                )
    used = {src for name in expected for src in recipes[name].sources}
    unexpected = [k for k in store.keys() if k not in used]
    if unexpected:
        raise CheckpointError(
            f"{store.file_of(unexpected[0])}: unexpected tensor {store.prefix + unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + ": it belongs to no part of this model"
        )
    for name, meta in expected.items():
        recipe = recipes[name]
        shapes = [store.shape(s) for s in recipe.sources]
        if recipe.combine == "cat" and any(s[1:] != shapes[0][1:] for s in shapes):
            raise CheckpointError(f"{store.file_of(recipe.sources[0])}: tensors {recipe.sources} do not concatenate")
        got = recipe.shape(shapes)
        if tuple(got) != tuple(meta.shape):
            src = recipe.sources[0]
            raise CheckpointError(
                f"{store.file_of(src)}: tensor {store.prefix + src!r} has shape {list(shapes[0])}, "
                f"but the model needs {list(meta.shape)} for {name!r}"
            )


def release_sources(recipe: Recipe, store: TensorStore) -> None:
    """Give back the file pages of the stored tensors a model tensor is made from."""
    for s in recipe.sources:
        store.release(s)


def read_tensor(recipe: Recipe, store: TensorStore, dtype: torch.dtype | None) -> Tensor:
    """One model tensor from its stored sources, in `dtype` (None: the first source's stored dtype)."""
    for s in recipe.sources:  # also the sources combined raw (fused qkv), which never ask get() for a float
        refuse_integer_weights(getattr(store, "path", None), s, store.dtype(s))
    target = dtype or store.dtype(recipe.sources[0])
    tensors = [store.get(s, target if recipe.combine == "same" else None) for s in recipe.sources]
    value = recipe.build(tensors).to(target)
    if recipe.combine != "same":  # the sources' pages were copied into `value`
        release_sources(recipe, store)
    return value


class RecipeSource:
    """A model's tensors under the model's own names, read through recipes one at a time (for streaming writers)."""

    def __init__(self, model: nn.Module, recipes: dict[str, Recipe] | None, store: TensorStore):
        self.shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        self.recipes = recipes or identity_recipes(list(self.shapes))
        self.store = store

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self.store.dtype(self.recipes[name].sources[0])

    def get(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        return read_tensor(self.recipes[name], self.store, dtype)

    def release(self, name: str) -> None:
        release_sources(self.recipes[name], self.store)


#: `replace(module_name, meta_module)` -> a ready module to put in its place, or None to fill it normally
Replacer = Callable[[str, nn.Module], "nn.Module | None"]


def materialize(
    factory: Callable[[], nn.Module],
    recipes: dict[str, Recipe] | None,
    store: TensorStore,
    dtype: torch.dtype | None,
    replace: Replacer | None = None,
) -> nn.Module:
    """Build `factory()` on meta, check everything, then assign tensors one at a time (no second full copy).

    `recipes=None`: the file uses the model's own names. `replace` is asked once per module, before its own
    tensors are read, and may build the module itself (quantized layers); the pages of the stored tensors it
    read are released afterwards, so only one full-precision layer is ever held.
    """
    with torch.device("meta"):
        model = factory()
    if recipes is None:
        recipes = identity_recipes(list(model.state_dict()))
    check_recipes(model, recipes, store)
    params = dict(model.named_parameters())
    asked: set[str] = set()
    replaced: set[str] = set()
    for name in model.state_dict():
        owner, _, attr = name.rpartition(".")
        if replace is not None and owner and owner not in asked:
            asked.add(owner)
            new = replace(owner, model.get_submodule(owner))
            if new is not None:
                model.set_submodule(owner, new)
                replaced.add(owner)
        if owner in replaced:
            release_sources(recipes[name], store)
            continue
        value = read_tensor(recipes[name], store, dtype)
        module = model.get_submodule(owner) if owner else model
        if name in params:
            module._parameters[attr] = nn.Parameter(value, requires_grad=params[name].requires_grad)
        else:
            module._buffers[attr] = value
    return model
