"""Locks of a harvest store: ``flock`` files in ``<store>.locks/`` next to it.

Only local and shared POSIX filesystems support them; on object stores the
caller must not start conflicting runs.
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import UserError
from pipeline.core.io import describe_holder, holder_info


def lock_dir(root) -> Path:
    return Path(root.path.rstrip("/") + ".locks")


@contextmanager
def writer_lock(root, run_id: str, shard: int, n_shards: int) -> Iterator[None]:
    """Hold the store for one harvest run; shards of the same run may share it.

    A run is identified by its config and shard count. The first process of a
    run takes ``active.lock`` exclusively and records the run and itself; processes of
    the same run join it with a shared lock, each holding its own shard lock;
    anything else is refused with the holder's pid and host.
    """
    if not root.local:
        yield
        return
    folder = lock_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    meta = open(folder / "meta.lock", "a+")
    active = open(folder / "active.lock", "a+")
    shard_file = open(folder / f"shard-{shard}.lock", "a+")
    run_file = folder / "run.json"
    this_run = {"run": run_id, "shards": n_shards}
    try:
        fcntl.flock(meta, fcntl.LOCK_EX)
        try:
            fcntl.flock(active, fcntl.LOCK_EX | fcntl.LOCK_NB)
            run_file.write_text(json.dumps({**this_run, "holder": holder_info()}))
            fcntl.flock(active, fcntl.LOCK_SH)  # downgrade: siblings may join
        except BlockingIOError:
            current = json.loads(run_file.read_text()) if run_file.exists() else {}
            if {k: current.get(k) for k in this_run} != this_run:
                holder = describe_holder(json.dumps(current.get("holder")))
                raise UserError(
                    f"another harvest ({holder}) is writing {root.location} with different settings; "
                    f"wait for it to finish (only shards of one run, SHARDS=N, may write at once)"
                ) from None
            fcntl.flock(active, fcntl.LOCK_SH)
        try:
            fcntl.flock(shard_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"shard {shard} of this harvest of {root.location} is already running") from None
        fcntl.flock(meta, fcntl.LOCK_UN)
        yield
    finally:
        for f in (shard_file, active, meta):
            f.close()


@contextmanager
def meta_lock(root) -> Iterator[None]:
    """Serialise structural changes (create, grow, repair, finalize) between shards."""
    if not root.local:
        yield
        return
    folder = lock_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "meta.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
