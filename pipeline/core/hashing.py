"""Content hashes: of JSON-able objects (configs, manifests) and of files (model weights)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def canonical_hash(obj) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: str | Path, bufsize: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(bufsize):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    from pipeline import __version__

    return __version__
