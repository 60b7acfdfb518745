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


def inside(folder: str | os.PathLike, name: str, what: str) -> Path:
    """`folder / name` for a file name read from a file in `folder` (a shard index, a metadata.jsonl), refusing a
    name that is absolute or climbs out with `..`: such files may only point inside their own folder.

    The check is on the name, not on the resolved path: symlinks inside the folder stay allowed, as the Hugging
    Face cache links every snapshot file to a blob outside it.
    """
    text = str(name)
    norm = os.path.normpath(text)
    if os.path.isabs(text) or norm == ".." or norm.startswith(".." + os.sep) or "\x00" in text:
        raise ValueError(f"{what} names {text!r}, outside {folder}: files it names must be inside its folder")
    return Path(folder) / norm
