"""Lazy, mmap-backed reading of .safetensors files, with errors that name the file and the tensor.

We parse the (JSON) header ourselves rather than use `safetensors.safe_open` for two reasons, both measured
by bench/load_memory.py: tensors whose dtype already matches become zero-copy views of the mapping, and pages
of tensors we convert are released right after (madvise), so peak RSS stays near the size of the weights in
the target dtype instead of file + copy. Writing goes through the `safetensors` package.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..files import atomic_path

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
PAGE = mmap.PAGESIZE


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated or does not fit the model."""


def refuse_integer_weights(where, name: str, stored: torch.dtype) -> None:
    """Model weights are floats: integer data would load as garbage (a relabelled or foreign file)."""
    if not stored.is_floating_point:
        raise CheckpointError(f"{str(where) + ': ' if where else ''}tensor {name!r} is stored as {stored}, not a "
                              "floating-point type: weights are F32, F16, BF16 or F8 (a relabelled or foreign file?)")


class SafetensorsFile:
    """One .safetensors file: `keys()`, `shape(name)`, `dtype(name)`, `get(name, dtype=None)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100 * 2**20):
                raise CheckpointError(
                    f"{self.path}: corrupt or not a safetensors file (header length {header_len} exceeds the file)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + header_len
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        data_size = size - self._start
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r}: corrupt header entry {info!r}") from None
            if begin < 0 or end < begin or any(s < 0 for s in shape):
                raise CheckpointError(f"{self.path}: tensor {name!r}: corrupt header entry (offsets {begin}..{end}, "
                                      f"shape {list(shape)}): offsets must satisfy 0 <= begin <= end, sizes >= 0")
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r}: {end - begin} bytes stored for shape {list(shape)} "
                    f"{info['dtype']} ({numel * dtype.itemsize} expected): the file is corrupt"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ends at byte {self._start + end} but the file has {size} bytes: "
                    "the file is truncated (an interrupted download or copy?)"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._check_layout(data_size)
        self._map = None

    def _check_layout(self, data_size: int) -> None:
        """As strict as the `safetensors` library: the tensors tile the data section, from byte 0 to its end, in
        offset order, without gaps or overlaps (otherwise two names could share bytes, or bytes hide between)."""
        at = 0
        for name, (_, _, begin, end) in sorted(self._entries.items(), key=lambda item: item[1][2:]):
            if begin != at:
                what = "overlaps the tensor before it" if begin < at else f"leaves {begin - at} unexplained bytes"
                raise CheckpointError(f"{self.path}: tensor {name!r} starts at data byte {begin}, {what} (expected "
                                      f"{at}): the header is corrupt")
            at = end
        if at != data_size:
            raise CheckpointError(f"{self.path}: {data_size - at} bytes after the last tensor's end ({at}): the file "
                                  "is corrupt or not a safetensors file")

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: private pages, so in-place updates of zero-copy weights never touch the file.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[0]

    def nbytes(self) -> int:
        return sum(end - begin for _, _, begin, end in self._entries.values())

    def _entry(self, name: str):
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return self._entries[name]

    def get(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor, as a view of the mapping when no conversion is needed, else a converted copy."""
        tdtype, shape, begin, end = self._entry(name)
        if dtype is not None and dtype.is_floating_point:
            refuse_integer_weights(self.path, name, tdtype)
        if end == begin:
            return torch.empty(shape, dtype=dtype or tdtype)
        mapping = self._mapping()
        view = torch.frombuffer(mapping, dtype=tdtype, count=(end - begin) // tdtype.itemsize, offset=self._start + begin)
        view = view.view(shape)
        if dtype is None or dtype == tdtype:
            return view
        out = view.to(dtype)
        self.release(name)
        return out

    def release(self, name: str) -> None:
        """Drop the file pages behind a tensor that was copied out (they are re-read if needed again)."""
        if self._map is None:
            return
        _, _, begin, end = self._entries[name]
        lo = -(-(self._start + begin) // PAGE) * PAGE
        hi = (self._start + end) // PAGE * PAGE
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write atomically: a temp file in the same folder, then rename."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
