"""Where a store lives: a local path or an fsspec URL, with the few file operations the store needs."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import zarr


class Root:
    """A store location: a local path or an fsspec URL (``file://``, ``s3://`` ...)."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.fs, self.path = fsspec.core.url_to_fs(self.location)
        self.local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.join(*parts))

    def read_json(self, *parts: str):
        with self.fs.open(self.join(*parts), "r") as f:
            return json.load(f)

    def write_json_atomic(self, obj, *parts: str) -> None:
        target = self.join(*parts)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        self.fs.makedirs(self.join(*parts[:-1]), exist_ok=True)
        with self.fs.open(tmp, "w") as f:
            json.dump(obj, f, sort_keys=True)
        self.fs.mv(tmp, target)

    def group(self, mode: str) -> zarr.Group:
        store = self.path if self.local else self.location
        return zarr.open_group(store=store, mode=mode)
