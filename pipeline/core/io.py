"""Atomic files and folders, and advisory locks: one implementation for every stage.

A reader sees the old file (or folder) or the new one, never a half-written
one: everything is written to a hidden temporary sibling and renamed into
place. Temporaries are named ``.<name>.tmp-<random>`` so a crash leaves
only hidden debris that the next writer of that name ignores.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from pipeline.core.errors import UserError


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


def _created_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` (and missing parents); return those created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        _make_dir(d)
    return missing


def _make_dir(folder: Path) -> None:
    """mkdir -p that tolerates a releasing lock holder removing the folder meanwhile: Path.mkdir
    with exist_ok raises FileExistsError when the folder vanishes between its mkdir and its
    is_dir check (seen as a lost waiter in test_waiters_on_a_removed_lock_file_never_hold_it_together)."""
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return
        except FileExistsError:
            continue


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:  # not empty (someone else wrote there) or already gone
            return


def holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def describe_holder(text: str) -> str:
    """'pid 123 on host h (since ...)' from a lock file's content, or a neutral phrase."""
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']} (since {h['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class LockHeld(UserError):
    """The lock is held by another process; the message names it (pid, host)."""


def _acquire(path: Path, blocking: bool, what: str):
    """Open and flock ``path``; retry when the file was replaced or removed meanwhile."""
    while True:
        _make_dir(path.parent)  # a releasing holder may have removed it
        try:
            f = open(path, "a+")
        except FileNotFoundError:  # ... between the mkdir and the open: try again
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = describe_holder(f.read())
            f.close()
            raise LockHeld(f"{what} is in use by {holder}; wait for it to finish or stop it, then run again") from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()  # the previous holder removed it on release: lock the new file


@contextmanager
def exclusive_lock(path: str | Path, blocking: bool = True, what: str | None = None) -> Iterator[None]:
    """Hold the flock on ``path`` (created if missing), recording this process as the holder.

    Non-blocking, a held lock raises ``LockHeld`` naming the holder's pid and host.
    On release the lock file and any folder created for it are removed (waiters
    notice the removal and lock afresh), so a failed run leaves nothing behind.
    """
    path = Path(path)
    created = _created_dirs(path.parent)
    try:
        f = _acquire(path, blocking, what or str(path))
    except BaseException:
        _remove_empty(created)
        raise
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps(holder_info()))
        f.flush()
        yield
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        f.close()
        _remove_empty(created)


@contextmanager
def exclusive_locks(paths: list[Path], what: Callable[[Path], str]) -> Iterator[None]:
    """Non-blocking locks on several paths at once; the first one held raises ``LockHeld``."""
    with ExitStack() as stack:
        for p in paths:
            stack.enter_context(exclusive_lock(p, blocking=False, what=what(p)))
        yield


# ----- can the output be written? ------------------------------------------------------

WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the filesystem is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EDQUOT: "the disk quota is exceeded"}


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: str | Path, need_bytes: int = 0, what: str = "the output") -> None:
    """Fail before the work when ``path`` cannot be created or lacks ``need_bytes`` of free space."""
    probe = existing_ancestor(Path(path))
    if not probe.is_dir():
        raise UserError(f"cannot write {what} at {path}: {probe} is not a folder; choose another DATA_DIR")
    if not os.access(probe, os.W_OK | os.X_OK) or _read_only(probe):
        raise UserError(f"cannot write {what} at {path}: {probe} is not writable; choose a writable DATA_DIR")
    free = shutil.disk_usage(probe).free
    if need_bytes and free < need_bytes:
        raise UserError(f"not enough free space for {what} at {path}: {free / 1e6:,.1f} MB free, "
                        f"about {need_bytes / 1e6:,.1f} MB needed; free some space or choose another DATA_DIR")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def write_error(e: OSError, what: str, after: str) -> UserError | None:
    """One clear line for a failed write (disk full, read-only, permissions), or None for other errors."""
    reason = WRITE_ERRNOS.get(e.errno)
    if reason is None:
        return None
    return UserError(f"cannot write {what}: {reason} ({e.filename or e.strerror}); {after}")
