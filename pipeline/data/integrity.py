"""What a harvest store's content is, and whether it is still intact.

- Row identity: the manifest records, for each range of rows added to the
  store, a SHA-256 of its ``tokens``, ``doc`` and ``pos`` values. Those are a
  function of the documents, their order and the tokenizer, so a store is
  only extended by a corpus that still yields exactly the rows it holds.
- Chunk checksums: each chunk's completion record carries the SHA-256 of the
  bytes written for every hook (the chunk's rows, little-endian).
- ``StoreDamage``: a chunk that is missing, truncated, non-finite or does not
  match its checksum; its message names the chunk and the repair command.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.core.errors import UserError

ROW_ARRAYS = ("tokens", "doc", "pos")


class StoreDamage(UserError):
    """A damaged chunk or row array; the message says how to repair it."""


def repair_command(location: str) -> str:
    """The command that recomputes the damaged chunks of the store at ``location``."""
    parts = Path(str(location)).parts
    data_dir = ""
    if len(parts) >= 5 and parts[-4] == "harvest":  # <data_dir>/harvest/<lm>/<data>/<split>-ctx<ctx>.zarr
        data_dir = f" --data-dir {Path(*parts[:-4])}"
    return f"nnd harvest --repair --store {location}{data_dir}"


def damage(location: str, what: str) -> StoreDamage:
    return StoreDamage(f"{what} in {location}; repair it with `{repair_command(location)}`")


def chunk_sha256(x: np.ndarray, dtype: str) -> str:
    """The checksum of one chunk's rows as stored (``dtype``, little-endian)."""
    data = np.ascontiguousarray(x, dtype=np.dtype(dtype).newbyteorder("<"))
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def rows_sha256(rows: tuple[np.ndarray, np.ndarray, np.ndarray], start: int, stop: int) -> str:
    h = hashlib.sha256()
    for values in rows:
        h.update(np.ascontiguousarray(values[start:stop], dtype="<i4").tobytes())
    return h.hexdigest()


def row_ranges_after_growth(ranges: list[dict], rows, old_rows: int, n_rows: int) -> list[dict]:
    return [*ranges, {"start": old_rows, "stop": n_rows, "sha256": rows_sha256(rows, old_rows, n_rows)}]


def check_same_rows(location: str, manifest: dict, rows, stored=None) -> None:
    """Refuse to extend a store whose rows the corpus no longer yields.

    ``rows`` (tokens, doc, pos) comes from the corpus now; the manifest's
    recorded range hashes (or, for stores written before they existed, the
    stored row arrays via ``stored()``) say what the store holds.
    """
    n = int(manifest["n_rows"])
    if n == 0:
        return
    if len(rows[0]) < n:
        raise UserError(f"the corpus now yields {len(rows[0])} rows at this CTX, fewer than the {n} rows of "
                        f"{location}; it has changed since the store was harvested: {_what_to_do(location)}")
    ranges = manifest.get("row_ranges")
    if ranges:
        bad = [r for r in ranges if rows_sha256(rows, r["start"], r["stop"]) != r["sha256"]]
        if not bad:
            return
        start, stop = bad[0]["start"], bad[0]["stop"]
    else:
        held = stored()
        differ = [np.flatnonzero(held[i][:n] != rows[i][:n]) for i in range(2)]
        firsts = [int(d[0]) for d in differ if len(d)]
        if not firsts:
            return
        start, stop = min(firsts), n
    raise UserError(f"DATA={manifest.get('data')} has changed since {location} was harvested: rows {start}-{stop - 1} "
                    f"now come from other text (documents, their order or the tokenizer differ); the store cannot be "
                    f"extended with it: {_what_to_do(location)}")


def _what_to_do(location: str) -> str:
    return f"restore the old corpus, or delete {location} (or use another DATA_DIR) to harvest the new text"


def half_created(root) -> bool:
    """A store folder whose creation was interrupted: zarr metadata only, no manifest, no data."""
    if not root.exists("zarr.json"):
        return False
    try:
        if root.read_json("zarr.json").get("attributes", {}).get("manifest"):
            return False
    except ValueError:  # a torn zarr.json
        pass
    names = {Path(f).name for f in root.fs.find(root.path)}
    return names <= {"zarr.json"}


def check_finite(x: np.ndarray, layer: int, hook: str, chunk: int, dtype: str) -> None:
    if not np.isfinite(x).all() or (dtype == "float16" and np.abs(x).max() > np.finfo(np.float16).max):
        hint = " (values overflow float16; harvest with DTYPE=float32)" if dtype == "float16" else ""
        raise UserError(f"non-finite activations in layer {layer} {hook}, chunk {chunk}{hint}")
