"""The harvest store: one zarr v3 group of activations per (model, corpus, split, ctx).

Layout (see docs/CONTRACTS.md)::

    <store>.zarr/
      zarr.json                  group; attribute "manifest"
      tokens, doc, pos           [n_rows] int32
      layers/<l>/mlp_in          [n_rows, d_model] float16, chunks (chunk_rows, d_model)
      layers/<l>/mlp_out         (+ mlp_out_raw where the model has a post-MLP norm)
      progress/<l>/<chunk>.json  completion record of one chunk of one layer
    <store>.zarr.locks/          flock files (local filesystems only)

A new store is built under a hidden temporary name and renamed into place
once its manifest is written, so a store folder without a manifest is never
one of ours in progress: a metadata-only one (left by older versions) is
recreated, anything else is refused.

A chunk of a layer counts as written only once its completion record exists;
records are written after the data, by write-to-temporary-then-rename, so a
process killed at any moment leaves at worst a chunk that is recomputed. The
records also carry float64 partial sums, which ``finalize`` folds in chunk
order into per-array statistics: the result does not depend on which process
or shard wrote which chunk.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.core.errors import UserError
from pipeline.core.hashing import canonical_hash, code_version
from pipeline.data import integrity
from pipeline.data.store_root import Root
from pipeline.data.integrity import check_finite, half_created  # noqa: F401  (re-exported)
from pipeline.data.store_locks import meta_lock, writer_lock  # noqa: F401  (re-exported)

TARGET_CHUNK_ROWS = 8192
FORMAT_VERSION = 1
# Fields that identify what a store holds; a store whose manifest differs in
# any of them belongs to another model, corpus or tokenisation.
IDENTITY_FIELDS = (
    "lm", "lm_weights_sha256", "data", "split", "ctx", "bos_token_id", "separator_token_id", "dtype", "compressor",
    "chunk_rows",
)
COMPRESSORS = ("none", "zstd")
DTYPES = ("float16", "float32")


def chunk_rows_for(ctx: int, target: int = TARGET_CHUNK_ROWS) -> int:
    """The multiple of ``ctx - 1`` nearest below ``target``: chunks hold whole sequences."""
    per_seq = ctx - 1
    return max(1, target // per_seq) * per_seq


@dataclass(frozen=True)
class ArraySpec:
    layer: int
    hook: str

    @property
    def key(self) -> str:
        return f"layers/{self.layer}/{self.hook}"


class HarvestStore:
    """Read access to a finished (or partly finished) store."""

    def __init__(self, root: Root, group: zarr.Group, manifest: dict):
        self.root = root
        self.group = group
        self.manifest = manifest

    @classmethod
    def open(cls, location: str | Path, layers: list[int] | None = None, hooks: list[str] | None = None) -> "HarvestStore":
        root = Root(location)
        if not root.exists("zarr.json"):
            raise UserError(f"no harvest store at {location}; run `make harvest` (with the same LM, DATA and CTX) first")
        group = root.group("r")
        manifest = dict(group.attrs.get("manifest", {}))
        if not manifest:
            hint = ("its creation was interrupted; the same `make harvest` recreates it" if half_created(root)
                    else "delete it and harvest again")
            raise UserError(f"{location} is not a finished harvest store (no manifest): {hint}")
        store = cls(root, group, manifest)
        missing = [l for l in (layers or []) if l not in manifest["layers"]]
        if missing:
            raise UserError(
                f"harvest store {location} is incomplete: layers {missing} are not fully harvested "
                f"(complete: {manifest['layers'] or 'none'}); run `make harvest LAYERS=...` to finish it"
            )
        bad_hooks = [h for h in (hooks or []) if h not in manifest["hooks"]]
        if bad_hooks:
            raise UserError(f"harvest store {location} has no hooks {bad_hooks}; it holds {sorted(manifest['hooks'])}")
        return store

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def chunk_rows(self) -> int:
        return int(self.manifest["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def manifest_hash(self) -> str:
        return canonical_hash(self.manifest)

    def provenance(self) -> dict:
        """What a checkpoint records about the store it was trained on."""
        keep = ("lm", "lm_weights_sha256", "data", "split", "ctx", "n_rows")
        return {"store_manifest_hash": self.manifest_hash,
                "store_manifest": {k: self.manifest.get(k) for k in keep}}

    @property
    def content_hash(self) -> str:
        """Identifies the rows: model, corpus, split, tokenisation and row count.

        A layer's arrays depend on nothing else, so harvesting another layer
        into the store (which changes the manifest) leaves this unchanged and
        does not make checkpoints trained on the other layers stale.
        """
        return self.manifest["config_hash"]

    def rows_in_chunk(self, i: int) -> int:
        return min(self.chunk_rows, self.n_rows - i * self.chunk_rows)

    def array(self, layer: int, hook: str) -> zarr.Array:
        return self.group[ArraySpec(layer, hook).key]

    def stats(self, layer: int, hook: str) -> dict:
        return dict(self.array(layer, hook).attrs["stats"])

    def chunk_file(self, layer: int, hook: str, i: int) -> Path | None:
        """The raw chunk file, when reading it directly is possible (local, uncompressed)."""
        if not self.root.local or self.manifest["compressor"] != "none":
            return None
        return Path(self.root.join(ArraySpec(layer, hook).key, "c", str(i), "0"))

    @property
    def chunk_nbytes(self) -> int:
        """Size of a raw chunk file: every chunk, the last one included, is stored whole."""
        return self.chunk_rows * self.d_model * np.dtype(self.manifest["dtype"]).itemsize

    def chunk_damage(self, layer: int, hook: str, i: int) -> str | None:
        """Why the chunk cannot be read ("missing (...)", "damaged (...)"), or None."""
        path = self.chunk_file(layer, hook, i)
        if path is None:  # compressed or remote: zarr would read a missing chunk as zeros
            key = self.root.join(ArraySpec(layer, hook).key, "c", str(i), "0")
            return None if self.root.fs.exists(key) else f"missing ({key} does not exist)"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"missing ({path} does not exist)"
        if size != self.chunk_nbytes:
            return f"damaged ({path} holds {size} bytes, not {self.chunk_nbytes})"
        return None

    def chunk_error(self, layer: int, hook: str, i: int, reason: str) -> integrity.StoreDamage:
        return self.damage(f"chunk {i} of layer {layer} {hook} is {reason}")

    def damage(self, what: str) -> integrity.StoreDamage:
        return integrity.damage(self.root.location, what)

    def read_chunk(self, layer: int, hook: str, i: int) -> np.ndarray:
        """Chunk ``i`` (last one trimmed); ``StoreDamage`` naming it when missing, short or unreadable."""
        problem = self.chunk_damage(layer, hook, i)
        if problem:
            raise self.chunk_error(layer, hook, i, problem)
        rows = self.rows_in_chunk(i)
        path = self.chunk_file(layer, hook, i)
        if path is not None:
            full = np.fromfile(path, dtype=np.dtype(self.manifest["dtype"]).newbyteorder("<"))
            return full.reshape(self.chunk_rows, self.d_model)[:rows]
        start = i * self.chunk_rows
        try:
            return self.array(layer, hook)[start : start + rows]
        except Exception as e:  # a torn compressed chunk: any decoder error means damage
            raise self.chunk_error(layer, hook, i, f"unreadable ({e.__class__.__name__})") from None

    def record(self, layer: int, i: int) -> dict | None:
        """The completion record of chunk ``i`` of ``layer`` (rows, stats, checksums), or None."""
        try:
            return self.root.read_json("progress", str(layer), f"{i}.json")
        except (FileNotFoundError, ValueError):
            return None

    def rows(self, name: str) -> np.ndarray:
        """``tokens``, ``doc`` or ``pos`` for all rows."""
        return self.group[name][:]


class StoreWriter:
    """Creates, grows and fills a store; safe to run as several shards at once."""

    def __init__(self, location: str | Path, identity: dict, hooks: dict[str, str], d_model: int,
                 n_layers: int, d_mlp: int):
        self.root = Root(location)
        self.identity = identity
        self.hooks = hooks
        self.d_model = d_model
        self.n_layers = n_layers
        self.d_mlp = d_mlp
        self.group: zarr.Group | None = None
        self.manifest: dict = {}

    # ----- set-up ---------------------------------------------------------
    def prepare(self, n_rows: int, layers: list[int], row_data: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
                rewrite_rows: bool = False) -> None:
        """Create the store, or check it holds the same thing and grow it.

        ``row_data`` (tokens, doc, pos) covers at least the first ``n_rows``
        rows and every row already stored: it must yield the rows the store
        holds (``integrity.check_same_rows``). ``rewrite_rows`` rewrites the
        stored row arrays from it (repair).
        """
        chunk_rows = int(self.identity["chunk_rows"])
        if half_created(self.root):
            self.root.fs.rm(self.root.path, recursive=True)
        if not self.root.exists("zarr.json"):
            self._create_store()
        group = self.root.group("r+")
        manifest = self._check_same(group, row_data)
        old_rows = int(manifest["n_rows"])
        if rewrite_rows and old_rows:
            self._rewrite_rows(group, old_rows, row_data)
        if n_rows > old_rows:
            self._grow(group, manifest, old_rows, n_rows, row_data)
        for layer in layers:
            for hook in self.hooks:
                key = ArraySpec(layer, hook).key
                if key not in group:
                    self._create(group, key, (manifest["n_rows"], self.d_model), self.identity["dtype"], chunk_rows)
        manifest["code_version"] = code_version()
        manifest["config_hash"] = canonical_hash({k: manifest[k] for k in IDENTITY_FIELDS} | {"n_rows": manifest["n_rows"]})
        group.attrs["manifest"] = manifest
        self.group, self.manifest = group, manifest

    def check(self, row_data) -> None:
        """Before any write (or lock): an existing store must hold this model, corpus and rows."""
        if self.root.exists("zarr.json") and not half_created(self.root):
            self._check_same(self.root.group("r"), row_data)

    def _check_same(self, group: zarr.Group, row_data) -> dict:
        manifest = dict(group.attrs.get("manifest", {}))
        if not manifest:
            raise UserError(f"{self.root.location} exists but is not a harvest store; move it away or choose another DATA_DIR")
        clash = {k: (manifest.get(k), self.identity[k]) for k in IDENTITY_FIELDS if manifest.get(k) != self.identity[k]}
        if clash:
            field, (have, want) = next(iter(clash.items()))
            raise UserError(
                f"store {self.root.location} was written with {field}={have!r}, not {want!r}; "
                f"it belongs to another model or corpus: remove it or use another DATA_DIR"
            )
        if row_data is not None:
            integrity.check_same_rows(self.root.location, manifest, row_data,
                                      lambda: tuple(group[n][:] for n in integrity.ROW_ARRAYS))
        return manifest

    def _create_store(self) -> None:
        """An empty store with its manifest, appearing under its name only once complete."""
        manifest = {**self.identity, "format_version": FORMAT_VERSION, "d_model": self.d_model,
                    "n_layers": self.n_layers, "d_mlp": self.d_mlp, "n_rows": 0, "hooks": self.hooks,
                    "layers": [], "complete": False, "row_ranges": []}
        if not self.root.local:  # one object written whole, the manifest in it
            zarr.open_group(store=self.root.location, mode="w", attributes={"manifest": manifest})
            return
        final = Path(self.root.path)
        final.parent.mkdir(parents=True, exist_ok=True)
        for debris in final.parent.glob(f".{final.name}.tmp-*"):  # creators killed earlier (we hold meta_lock)
            shutil.rmtree(debris, ignore_errors=True)
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex}")
        zarr.open_group(store=str(tmp), mode="w", attributes={"manifest": manifest})
        os.rename(tmp, final)

    def _rewrite_rows(self, group, n_rows: int, row_data) -> None:
        for name, values in zip(integrity.ROW_ARRAYS, row_data):
            if self.root.exists(name, "c"):  # damaged chunks are not read back: write every one afresh
                self.root.fs.rm(self.root.join(name, "c"), recursive=True)
            group[name][0:n_rows] = values[:n_rows]

    def _create(self, group, key, shape, dtype, chunk_rows):
        compressors = None if self.identity["compressor"] == "none" else zarr.codecs.ZstdCodec(level=3)
        chunks = (chunk_rows,) + tuple(shape[1:])
        group.create_array(key, shape=shape, chunks=chunks, dtype=dtype, compressors=compressors,
                           fill_value=0, config={"write_empty_chunks": True})

    def _grow(self, group, manifest, old_rows, n_rows, row_data):
        if row_data is None or len(row_data[0]) < n_rows:
            raise ValueError(f"growing {self.root.location} to {n_rows} rows needs the rows' tokens")
        chunk_rows = int(manifest["chunk_rows"])
        for name, values in zip(integrity.ROW_ARRAYS, row_data):
            if name not in group:
                self._create(group, name, (0,), "int32", chunk_rows)
            arr = group[name]
            arr.resize((n_rows,))
            arr[old_rows:n_rows] = values[old_rows:n_rows]
        for layer in self.present_layers(group):
            for hook in self.hooks:
                group[ArraySpec(layer, hook).key].resize((n_rows, self.d_model))
        # A partly filled last chunk now has more rows to fill: forget it.
        if old_rows % chunk_rows:
            last = old_rows // chunk_rows
            for layer in self.present_layers(group):
                path = self.root.join("progress", str(layer), f"{last}.json")
                if self.root.fs.exists(path):
                    self.root.fs.rm(path)
        manifest["row_ranges"] = integrity.row_ranges_after_growth(manifest.get("row_ranges") or [], row_data, old_rows, n_rows)
        manifest["n_rows"] = n_rows
        manifest["layers"] = []
        manifest["complete"] = False

    @staticmethod
    def present_layers(group) -> list[int]:
        return sorted(int(k) for k in group["layers"].group_keys()) if "layers" in group else []

    # ----- chunks ---------------------------------------------------------
    @property
    def chunk_rows(self) -> int:
        return int(self.manifest["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return -(-int(self.manifest["n_rows"]) // self.chunk_rows)

    def chunk_done(self, layer: int, chunk: int) -> bool:
        return self.root.exists("progress", str(layer), f"{chunk}.json")

    def write_chunk(self, layer: int, chunk: int, values: dict[str, np.ndarray]) -> None:
        """Write one chunk of every hook of a layer, then its completion record."""
        start = chunk * self.chunk_rows
        record = {"rows": None, "stats": {}, "sha256": {}}
        for hook, x in values.items():
            x32 = np.ascontiguousarray(x, dtype=np.float32)
            # BLAS reductions: a chunk's sums in fp32 (folded across chunks in
            # fp64), exact enough for normalisation and cheap next to the forward.
            sum_sq = float(np.dot(x32.ravel(), x32.ravel()))
            if not np.isfinite(sum_sq):
                check_finite(x32, layer, hook, chunk, self.identity["dtype"])
            self.group[ArraySpec(layer, hook).key][start : start + len(x)] = x
            record["rows"] = len(x)
            record["sha256"][hook] = integrity.chunk_sha256(x, self.identity["dtype"])
            record["stats"][hook] = {"sum": (np.ones(len(x32), np.float32) @ x32).tolist(), "sum_sq_norm": sum_sq}
        self.root.write_json_atomic(record, "progress", str(layer), f"{chunk}.json")

    def finalize(self) -> list[int]:
        """Fold completion records into statistics; mark complete layers. Idempotent."""
        group = self.root.group("r+")
        manifest = dict(group.attrs["manifest"])
        n_chunks = -(-int(manifest["n_rows"]) // int(manifest["chunk_rows"]))
        complete = []
        for layer in self.present_layers(group):
            if not all(self.chunk_done(layer, c) for c in range(n_chunks)):
                continue
            records = [self.root.read_json("progress", str(layer), f"{c}.json") for c in range(n_chunks)]
            n = sum(r["rows"] for r in records)
            for hook in manifest["hooks"]:
                total = np.zeros(self.d_model, dtype=np.float64)
                sq = 0.0
                for r in records:  # chunk order: identical sums whoever wrote them
                    total += np.asarray(r["stats"][hook]["sum"], dtype=np.float64)
                    sq += r["stats"][hook]["sum_sq_norm"]
                mean = total / n
                mean_sq_norm = sq / n
                group[ArraySpec(layer, hook).key].attrs["stats"] = {
                    "n": n,
                    "mean": mean.tolist(),
                    "mean_sq_norm": mean_sq_norm,
                    "var_total": mean_sq_norm - float(mean @ mean),
                }
            complete.append(layer)
        self._remove_orphans()
        manifest["layers"] = complete
        manifest["complete"] = bool(complete) and len(complete) == len(self.present_layers(group))
        group.attrs["manifest"] = manifest
        self.manifest = manifest
        return complete


    def _remove_orphans(self) -> None:
        """Delete temporary record files left by killed writers.

        A temporary whose record exists was abandoned: a live writer's record
        appears only by renaming its temporary, which removes it.
        """
        for tmp in self.root.fs.glob(self.root.join("progress", "*", "*.json.tmp-*")):
            if self.root.fs.exists(tmp.split(".tmp-")[0]):
                self.root.fs.rm(tmp)
