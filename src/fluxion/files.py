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


def check_writable(path: str | os.PathLike, what: str, suffix: str | None = None) -> Path:
    """Fail now, not after the work, when `path` cannot be written: a folder, a missing or read-only parent."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder: name a file in it")
    if suffix is not None and path.suffix.lower() != suffix:
        raise ValueError(f"{what} must name a {suffix} file, got {path}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{what} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {path}: the folder {parent} is not writable")
    return path


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file; another encoding is named, with the file, instead of a UnicodeDecodeError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
