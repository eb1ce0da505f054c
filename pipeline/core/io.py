"""Atomic files and folders, and advisory locks: one implementation for every stage.

A reader sees the old file (or folder) or the new one, never a half-written
one: everything is written to a hidden temporary sibling and renamed into
place. Temporaries are named ``.<name>.tmp-<random>`` so a crash leaves
only hidden debris that the next writer of that name ignores.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def temporary_sibling(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}{suffix}")


def write_atomic(path: str | Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place.

    ``suffix`` keeps an extension on the temporary name for writers that
    choose the format by it (matplotlib)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | Path, obj, default: Callable | None = None) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n")


def publish_dir(tmp: Path, path: Path) -> None:
    """Move a fully written folder into place, replacing any older one.

    Readers see the old folder or the new one, never a half-written one; only
    between the two renames is there none at all.
    """
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def folder_atomic(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Block until this process holds the flock on ``path`` (created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
