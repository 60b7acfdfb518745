"""Atomic file writes: every output and checkpoint is written to a temp file beside it, then renamed over it."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path in `path`'s folder; write to it; on success it replaces `path`, on failure it is removed.

    `suffix` ends the temp name, for writers that infer the format from it (e.g. ".png"). A kill mid-write leaves
    the old file whole (and at worst a hidden temp file).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
