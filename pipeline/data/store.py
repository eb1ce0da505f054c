"""The harvest store: one zarr v3 group of activations per (model, corpus, split, ctx).

Layout (see docs/CONTRACTS.md)::

    <store>.zarr/
      zarr.json                  group; attribute "manifest"
      tokens, doc, pos           [n_rows] int32
      layers/<l>/mlp_in          [n_rows, d_model] float16, chunks (chunk_rows, d_model)
      layers/<l>/mlp_out         (+ mlp_out_raw where the model has a post-MLP norm)
      progress/<l>/<chunk>.json  completion record of one chunk of one layer
    <store>.zarr.locks/          flock files (local filesystems only)

A chunk of a layer counts as written only once its completion record exists;
records are written after the data, by write-to-temporary-then-rename, so a
process killed at any moment leaves at worst a chunk that is recomputed. The
records also carry float64 partial sums, which ``finalize`` folds in chunk
order into per-array statistics: the result does not depend on which process
or shard wrote which chunk.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import zarr

from pipeline.core.errors import UserError
from pipeline.core.hashing import canonical_hash, code_version

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
            raise UserError(f"{location} is not a harvest store (no manifest); delete it and harvest again")
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

    def read_chunk(self, layer: int, hook: str, i: int) -> np.ndarray:
        rows = self.rows_in_chunk(i)
        path = self.chunk_file(layer, hook, i)
        if path is not None:
            full = np.fromfile(path, dtype=np.dtype(self.manifest["dtype"]).newbyteorder("<"))
            return full.reshape(self.chunk_rows, self.d_model)[:rows]
        start = i * self.chunk_rows
        return self.array(layer, hook)[start : start + rows]

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
    def prepare(self, n_rows: int, layers: list[int], row_data: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
        """Create the store, or check it holds the same thing and grow it.

        ``row_data`` (tokens, doc, pos) covers the first ``n_rows`` rows; it is
        only read when the store is new or grows.
        """
        chunk_rows = int(self.identity["chunk_rows"])
        if self.root.exists("zarr.json"):
            group = self.root.group("r+")
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
        else:
            self.root.fs.makedirs(self.root.path, exist_ok=True)
            group = self.root.group("w")
            manifest = {
                **self.identity,
                "format_version": FORMAT_VERSION,
                "d_model": self.d_model,
                "n_layers": self.n_layers,
                "d_mlp": self.d_mlp,
                "n_rows": 0,
                "hooks": self.hooks,
                "layers": [],
                "complete": False,
            }
        old_rows = int(manifest["n_rows"])
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

    def _create(self, group, key, shape, dtype, chunk_rows):
        compressors = None if self.identity["compressor"] == "none" else zarr.codecs.ZstdCodec(level=3)
        chunks = (chunk_rows,) + tuple(shape[1:])
        group.create_array(key, shape=shape, chunks=chunks, dtype=dtype, compressors=compressors,
                           fill_value=0, config={"write_empty_chunks": True})

    def _grow(self, group, manifest, old_rows, n_rows, row_data):
        assert row_data is not None and len(row_data[0]) >= n_rows
        chunk_rows = int(manifest["chunk_rows"])
        for name, values in zip(("tokens", "doc", "pos"), row_data):
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
        record = {"rows": None, "stats": {}}
        for hook, x in values.items():
            x32 = np.ascontiguousarray(x, dtype=np.float32)
            # BLAS reductions: a chunk's sums in fp32 (folded across chunks in
            # fp64), exact enough for normalisation and cheap next to the forward.
            sum_sq = float(np.dot(x32.ravel(), x32.ravel()))
            if not np.isfinite(sum_sq):
                check_finite(x32, layer, hook, chunk, self.identity["dtype"])
            self.group[ArraySpec(layer, hook).key][start : start + len(x)] = x
            record["rows"] = len(x)
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


def check_finite(x: np.ndarray, layer: int, hook: str, chunk: int, dtype: str) -> None:
    if not np.isfinite(x).all() or (dtype == "float16" and np.abs(x).max() > np.finfo(np.float16).max):
        hint = " (values overflow float16; harvest with DTYPE=float32)" if dtype == "float16" else ""
        raise UserError(f"non-finite activations in layer {layer} {hook}, chunk {chunk}{hint}")


# ----- locking ---------------------------------------------------------------

@contextmanager
def writer_lock(root: Root, run_id: str, shard: int, n_shards: int) -> Iterator[None]:
    """Hold the store for one harvest run; shards of the same run may share it.

    A run is identified by its config and shard count. The first process of a
    run takes ``active.lock`` exclusively and records the run; processes of
    the same run join it with a shared lock, each holding its own shard lock;
    anything else is refused. Only local and shared POSIX filesystems support
    this; on object stores the caller must not start conflicting runs.
    """
    if not root.local:
        yield
        return
    lock_dir = Path(root.path.rstrip("/") + ".locks")
    lock_dir.mkdir(parents=True, exist_ok=True)
    meta = open(lock_dir / "meta.lock", "a+")
    active = open(lock_dir / "active.lock", "a+")
    shard_file = open(lock_dir / f"shard-{shard}.lock", "a+")
    run_file = lock_dir / "run.json"
    this_run = {"run": run_id, "shards": n_shards}
    try:
        fcntl.flock(meta, fcntl.LOCK_EX)
        try:
            fcntl.flock(active, fcntl.LOCK_EX | fcntl.LOCK_NB)
            run_file.write_text(json.dumps(this_run))
            fcntl.flock(active, fcntl.LOCK_SH)  # downgrade: siblings may join
        except BlockingIOError:
            current = json.loads(run_file.read_text()) if run_file.exists() else {}
            if current != this_run:
                raise UserError(
                    f"another harvest is writing {root.location} with different settings; "
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
def meta_lock(root: Root) -> Iterator[None]:
    """Serialise structural changes (create, grow, finalize) between shards."""
    if not root.local:
        yield
        return
    lock_dir = Path(root.path.rstrip("/") + ".locks")
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "meta.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
