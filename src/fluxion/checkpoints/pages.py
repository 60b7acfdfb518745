"""Giving back the memory-mapped file pages behind a model's weights, so a large model fits a small RAM.

Weights that load zero-copy are views of private file mappings: tensors of a .safetensors file already in the
compute dtype (fluxion's SafetensorsFile, and transformers' loading of the text encoders), and every tensor of a
GGUF file that stays quantized (GGUFStore; QuantLinear keeps the raw blocks). Their pages become resident as
the model reads them and then count in the process's RSS until the kernel needs the memory.
`release_pages(module)` says they are not needed now (madvise MADV_DONTNEED on the file-backed ranges behind
the module's tensors, found in /proc/self/maps): RSS drops at once, the page cache usually keeps the data, and
the next forward re-reads it from there (or from disk if the kernel evicted it). The weights are unchanged;
tensors in anonymous memory (copies, computed values) are never touched.

`stream_blocks(model)` releases each repeated block (the entries of a model's ModuleLists: FLUX double and
single blocks, T5 layers, ...) right after its forward, so only about one block's weights are resident at a time.

Safety: in a private file mapping, MADV_DONTNEED also discards pages the process has written to (copy-on-write
copies), which would silently turn an in-place change of a weight (a fused LoRA, a user's `weight.data.mul_()`)
back into the file's values. So each range is first checked in /proc/self/pagemap and pages holding private
copies are skipped. Linux only: without /proc/self/maps and /proc/self/pagemap nothing is released.
"""
from __future__ import annotations

import bisect
import ctypes
import logging
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
MAPS, PAGEMAP = "/proc/self/maps", "/proc/self/pagemap"
MERGE_GAP = 64  # bytes: tensors this close (GGUF alignment padding) release as one range
_PAGEMAP_CHUNK = 1 << 20  # pagemap entries read at a time (8 MiB)


@dataclass(frozen=True)
class FileMapping:
    """One file-backed entry of /proc/self/maps: addresses [start, end) show the file from byte `offset`."""

    start: int
    end: int
    offset: int
    path: str

    def file_offset(self, address: int) -> int:
        return self.offset + address - self.start


def file_mappings() -> list[FileMapping]:
    """The process's file-backed mappings (inode != 0), sorted by address; [] without /proc/self/maps."""
    out = []
    try:
        with open(MAPS) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[4] == "0":  # anonymous memory, heap, stack: never released
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append(FileMapping(lo, hi, int(parts[2], 16), parts[5]))
    out.sort(key=lambda m: m.start)
    return out


def _tensors(obj) -> Iterable[Tensor]:
    if isinstance(obj, nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, Tensor):
        yield obj
    else:
        for item in obj:
            yield from _tensors(item)


def mapped_ranges(obj) -> dict[FileMapping, list[tuple[int, int]]]:
    """{file mapping: sorted, merged [start, end) address ranges} of the file-backed memory behind `obj`'s tensors.

    `obj`: a module (its parameters and buffers), a tensor, or an iterable of either. Tensors in anonymous
    memory (copies, computed values) are left out.
    """
    maps = file_mappings()
    starts = [m.start for m in maps]
    spans: dict[FileMapping, list[tuple[int, int]]] = {}
    seen: set[tuple[int, int]] = set()
    for t in _tensors(obj):
        if t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        ptr, n = storage.data_ptr(), storage.nbytes()
        if n == 0 or (ptr, n) in seen:
            continue
        seen.add((ptr, n))
        i = bisect.bisect_right(starts, ptr) - 1
        if i < 0 or ptr + n > maps[i].end:
            continue
        spans.setdefault(maps[i], []).append((ptr, ptr + n))
    out = {}
    for m, ranges in spans.items():
        ranges.sort()
        merged = [list(ranges[0])]
        for lo, hi in ranges[1:]:
            if lo <= merged[-1][1] + MERGE_GAP:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        out[m] = [(lo, hi) for lo, hi in merged]
    return out


_libc = None


def _madvise(address: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if _libc.madvise(address, length, mmap.MADV_DONTNEED) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({address:#x}, {length}, MADV_DONTNEED): {os.strerror(err)}")


def _private_pages(address: int, pages: int) -> np.ndarray | None:
    """Per page of [address, address + pages*PAGE): True where the process holds a private (written) copy."""
    try:
        fd = os.open(PAGEMAP, os.O_RDONLY)
    except OSError:
        return None
    try:
        out = np.empty(pages, dtype=bool)
        first = address // PAGE
        for i in range(0, pages, _PAGEMAP_CHUNK):
            n = min(_PAGEMAP_CHUNK, pages - i)
            raw = os.pread(fd, 8 * n, 8 * (first + i))
            if len(raw) != 8 * n:
                return None
            e = np.frombuffer(raw, dtype=np.uint64)
            present, swapped = (e >> np.uint64(63)) & np.uint64(1), (e >> np.uint64(62)) & np.uint64(1)
            file_page = (e >> np.uint64(61)) & np.uint64(1)
            # an anonymous page in a file mapping (present but not a file page, or swapped out) is a private copy
            out[i : i + n] = ((present == 1) & (file_page == 0)) | (swapped == 1)
        return out
    except OSError:
        return None
    finally:
        os.close(fd)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index runs where `mask` is False."""
    ok = np.concatenate([[False], ~mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(ok))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


_warned_no_pagemap = False


def release_pages(obj) -> int:
    """Drop the resident file pages behind `obj`'s tensors (madvise MADV_DONTNEED); returns the bytes advised.

    Only whole pages inside the tensors' file-backed ranges are released, pages holding in-place changes are
    kept (see the module docstring), and tensors in anonymous memory are untouched. The values do not change.
    """
    global _warned_no_pagemap
    total = 0
    for ranges in mapped_ranges(obj).values():
        for lo, hi in ranges:
            lo = -(-lo // PAGE) * PAGE
            hi = hi // PAGE * PAGE
            if hi <= lo:
                continue
            private = _private_pages(lo, (hi - lo) // PAGE)
            if private is None:
                if not _warned_no_pagemap:
                    _warned_no_pagemap = True
                    log.warning("cannot read %s: mapped weights are not released", PAGEMAP)
                return total
            for a, b in _runs(private):
                _madvise(lo + a * PAGE, (b - a) * PAGE)
                total += (b - a) * PAGE
    return total


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ModuleLists of `model` (its stacks of repeated blocks), by name."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and not any(
            name.startswith(f"{outer}.") for outer, _ in found
        ):
            found.append((name, module))
    return found


def _release_after_forward(module: nn.Module, args, output) -> None:
    release_pages(module)


def stream_blocks(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Release each repeated block's file pages right after its forward; returns the hook handles."""
    return [block.register_forward_hook(_release_after_forward)
            for _, blocks in block_lists(model) for block in blocks]
