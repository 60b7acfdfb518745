"""Named LoRA adapters for the service: `<lora_dir>/<name>.safetensors`, loaded on first use, kept in an LRU.

A name is a file stem: no folder separators, no `..`, not absolute, and the file it names must resolve inside
the folder (a symlink pointing out of it is refused). Only the worker thread loads, activates and evicts
adapters (it owns the pipeline); the app thread only resolves names (to answer 404 before queueing). With
several workers (`ServeConfig.workers`) each replica process has a library of its own, loading what it runs.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

from ..files import inside

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LoraNotFound(LookupError):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name

    def __reduce__(self):  # picklable (a replica process reports it to the app)
        return (type(self), (self.name, str(self)))


class LoraLoadError(RuntimeError):
    """An adapter file that exists but cannot be loaded (corrupt, wrong model)."""


class LoraLibrary:
    def __init__(self, lora_dir: str | os.PathLike | None, capacity: int = 8):
        self.folder = Path(lora_dir).resolve() if lora_dir else None
        self.capacity = capacity
        self.loaded: OrderedDict[str, float] = OrderedDict()  # adapter name -> file mtime, least recent first

    def available(self) -> list[str]:
        if self.folder is None:
            return []
        out = []
        for p in sorted(self.folder.glob("*.safetensors")):
            try:
                self.resolve(p.stem)
            except LoraNotFound:
                continue
            out.append(p.stem)
        return out

    def resolve(self, name: str) -> Path:
        """The adapter file of `name`, or LoraNotFound naming it (also for names that try to leave the folder)."""
        if self.folder is None:
            raise LoraNotFound(name, f"LoRA {name!r}: this server has no LoRA folder (start it with --lora-dir)")
        if not isinstance(name, str) or not NAME.match(name) or name in (".", ".."):
            raise LoraNotFound(name, f"LoRA {name!r}: not a valid adapter name (a file stem in the LoRA folder: "
                                     "letters, digits, '.', '_', '-')")
        try:
            path = inside(self.folder, f"{name}.safetensors", "the LoRA name")
        except ValueError:
            raise LoraNotFound(name, f"LoRA {name!r}: names must stay inside the LoRA folder") from None
        real = path.resolve()
        if real.parent != self.folder and self.folder not in real.parents:
            raise LoraNotFound(name, f"LoRA {name!r}: its file links outside the LoRA folder")
        if not real.is_file():
            raise LoraNotFound(name, f"LoRA {name!r}: no such adapter in the LoRA folder")
        return real

    @staticmethod
    def adapter_name(name: str) -> str:
        return f"serve:{name}"

    def activate(self, pipe, loras: tuple[tuple[str, float], ...]) -> None:
        """Load what is missing (evicting the least recently used beyond capacity), then make exactly `loras`
        active with their weights; with none, disable LoRA. Worker thread only."""
        if not loras:
            if self.loaded:
                pipe.disable_lora()
            return
        wanted = self.ensure_loaded(pipe, [n for n, _ in loras])
        pipe.set_adapters([self.adapter_name(n) for n in wanted], [w for _, w in loras])
        pipe.enable_lora()

    def ensure_loaded(self, pipe, wanted: list[str]) -> list[str]:
        """Load the adapters named (reloading a changed file), evict the least recently used others beyond
        capacity; returns `wanted`. Adapter names in the pipeline are `adapter_name(name)`."""
        for name in wanted:
            path = self.resolve(name)
            mtime = path.stat().st_mtime
            adapter = self.adapter_name(name)
            if name in self.loaded and self.loaded[name] != mtime:  # the file changed: reload it
                pipe.delete_adapters(adapter)
                del self.loaded[name]
            if name not in self.loaded:
                pipe.load_lora_weights(str(path), adapter_name=adapter)
                self.loaded[name] = mtime
            self.loaded.move_to_end(name)
        while len(self.loaded) > max(self.capacity, len(wanted)):
            old = next(n for n in self.loaded if n not in wanted)
            pipe.delete_adapters(self.adapter_name(old))
            del self.loaded[old]
        return wanted
