"""What the benchmarks share: the store to read (a real one, or a toy store of SmolLM2's shape)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.data.store import HarvestStore
from pipeline.data.toy import ToyConfig, write_toy_store


def store_or_toy(path: Path | None) -> tuple[HarvestStore, tempfile.TemporaryDirectory | None]:
    """The harvest store at ``path``, or (no path) a toy store with d=576 in a temporary folder,
    returned with that folder so the caller keeps it alive."""
    if path:
        return HarvestStore.open(path), None
    tmp = tempfile.TemporaryDirectory()
    cfg = ToyConfig(d_model=576, n_features=4608, n_rows=8 * 8192, mean_active=32)
    return write_toy_store(Path(tmp.name) / "toy.zarr", cfg), tmp
