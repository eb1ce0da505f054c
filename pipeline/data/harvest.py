"""Run the target model over a corpus and write MLP activations to a store.

The unit of work is one chunk: the ``chunk_rows // (ctx-1)`` sequences whose
rows fill it, run as one batch, up to the last layer still missing in that
chunk and no further (a hook raises to stop the forward, so no later block
and no unembedding runs). Chunks are dealt to shards round-robin; a chunk is
skipped when its completion record exists, so a killed run resumes where it
stopped and a grown run computes only what is new.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.data import corpora
from pipeline.core.errors import UserError
from pipeline.core.hashing import canonical_hash
from pipeline.core.io import check_writable
from pipeline.core.progress import progress_bar
from pipeline.core import paths
from pipeline.data.models import HOOKS, MODEL_DTYPES, LoadedLM, StopForward, check_device, load_lm
from pipeline.data.store import COMPRESSORS, DTYPES, TARGET_CHUNK_ROWS, Root, StoreWriter, check_finite, chunk_rows_for, meta_lock, writer_lock
from pipeline.data.tokens import DEFAULT_CTX, TokenTable, pack


@dataclass(frozen=True)
class HarvestConfig:
    lm: str = "smollm2-135m"
    data: str = "bbc"
    split: str = "train"
    layers: tuple[int, ...] = (0, 1, 2, 3)
    tokens: int = 200_000
    ctx: int = DEFAULT_CTX
    dtype: str = "float16"
    compressor: str = "none"
    data_dir: Path = Path("data")
    store: str | None = None  # a path or fsspec URL overriding the default location
    shard: int = 0
    n_shards: int = 1
    text_field: str = "text"
    chunk_rows: int = TARGET_CHUNK_ROWS  # rounded down to whole sequences
    device: str = "cpu"  # cpu, cuda, cuda:N
    # the model's weights and compute: float32 (the default, as on CPU) or bfloat16 (GPU: about
    # half the time; the stored activations differ, so a bf16 store is a different store)
    model_dtype: str = "float32"

    def __post_init__(self):
        if self.tokens <= 0:
            raise UserError(f"TOKENS={self.tokens} must be a positive number of tokens, e.g. TOKENS=200000")
        if self.ctx < 2:
            raise UserError(f"CTX={self.ctx} must be at least 2")
        if self.dtype not in DTYPES:
            raise UserError(f"DTYPE={self.dtype} is not one of {', '.join(DTYPES)}")
        if self.compressor not in COMPRESSORS:
            raise UserError(f"COMPRESSOR={self.compressor} is not one of {', '.join(COMPRESSORS)}")
        if self.split not in corpora.SPLITS:
            raise UserError(f"SPLIT={self.split} is not one of {', '.join(corpora.SPLITS)}")
        if not (self.n_shards >= 1 and 0 <= self.shard < self.n_shards):
            raise UserError(f"shard {self.shard} of {self.n_shards} is out of range; shards are numbered 0..SHARDS-1")
        if self.chunk_rows < 1:  # rounded down to whole sequences, at least one (chunk_rows_for)
            raise UserError(f"CHUNK_ROWS={self.chunk_rows} must be a positive number of rows, e.g. CHUNK_ROWS=8192")
        if not self.layers:
            raise UserError("LAYERS is empty; give at least one layer, e.g. LAYERS=0-3")
        if self.model_dtype not in MODEL_DTYPES:
            raise UserError(f"MODEL_DTYPE={self.model_dtype} is not one of {', '.join(MODEL_DTYPES)}")
        check_device(self.device)

    @property
    def location(self) -> str:
        return self.store or str(store_path(self.data_dir, self.lm, self.data, self.split, self.ctx))


def store_path(data_dir: Path, lm: str, data: str, split: str, ctx: int) -> Path:
    return paths.store(data_dir, lm, data, split, ctx)


def token_table(lm: LoadedLM, data: str, split: str, ctx: int, n_rows: int | None, text_field: str = "text") -> TokenTable:
    docs = corpora.documents(data, split, text_field)
    return pack(lm.tokenizer, docs, ctx, lm.bos_token_id, lm.separator_token_id, n_rows,
                what=f"the {split} split of DATA={data}")


FP16_MAX = 65504.0


def capture(lm: LoadedLM, ids: torch.Tensor, wanted: dict[int, tuple[str, ...]]) -> dict[tuple[int, str], torch.Tensor]:
    """Run ``ids`` through the model and return the wanted hook activations.

    The forward is cut right after the last layer's ``hook_mlp_out``, which
    fires after everything else that layer computes.
    """
    last = max(wanted)
    stop_name = lm.hook_name(last, "mlp_out")
    out: dict[tuple[int, str], torch.Tensor] = {}

    def grabber(key, stops):
        def grab(t, hook=None):
            out[key] = t.detach()
            if stops:
                raise StopForward
        return grab

    hooks = [(lm.hook_name(layer, h), grabber((layer, h), False))
             for layer, names in wanted.items() for h in names if lm.hook_name(layer, h) != stop_name]
    hooks.append((stop_name, grabber((last, "mlp_out"), True)))
    try:
        with torch.inference_mode():
            lm.bridge.run_with_hooks(ids, fwd_hooks=hooks)
    except StopForward:
        pass
    return out


@dataclass
class HarvestSummary:
    location: str
    n_rows: int
    computed_chunks: dict[int, int] = field(default_factory=dict)  # layer -> chunks computed by this run
    complete_layers: list[int] = field(default_factory=list)
    tokens_computed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0  # end to end, model load and tokenisation included
    loop_seconds: float = 0.0  # forward passes and writes only

    def line(self) -> str:
        rate = self.tokens_computed / self.seconds if self.seconds else 0.0
        return (f"harvest: {self.n_rows:,} rows, layers {self.complete_layers} complete, "
                f"{sum(self.computed_chunks.values())} layer-chunks computed, "
                f"{self.bytes_written / 1e9:.2f} GB written, {rate:,.0f} tokens/s -> {self.location}")


class _ChunkWriter:
    """Writes chunks on a background thread so disk I/O overlaps the forward."""

    def __init__(self, writer: StoreWriter, depth: int = 2):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    layer, chunk, values, ready = item
                    if ready is not None:  # the GPU -> pinned host copies of this chunk have landed
                        ready.synchronize()
                    self.writer.write_chunk(layer, chunk, {h: v.numpy() for h, v in values.items()})
                except BaseException as e:  # re-raised on the main thread
                    self.error = e

    def put(self, layer: int, chunk: int, values: dict[str, torch.Tensor], ready=None):
        """``values`` on the host; on a GPU, pinned and still being copied until ``ready`` (a CUDA event)."""
        self._raise()
        self.q.put((layer, chunk, values, ready))

    def close(self):
        self.q.put(None)
        self.thread.join()
        self._raise()

    def _raise(self):
        if self.error is not None:
            raise self.error


def store_identity(cfg: HarvestConfig, lm: LoadedLM) -> dict:
    """The manifest fields that say what a store holds (``store.IDENTITY_FIELDS``)."""
    identity = {"lm": cfg.lm, "lm_weights_sha256": lm.weights_sha256, "data": cfg.data, "split": cfg.split,
                "ctx": cfg.ctx, "bos_token_id": lm.bos_token_id, "separator_token_id": lm.separator_token_id,
                "dtype": cfg.dtype, "compressor": cfg.compressor, "chunk_rows": chunk_rows_for(cfg.ctx, cfg.chunk_rows)}
    if cfg.model_dtype != "float32":  # recorded only when not the default, so older fp32 stores keep their identity
        identity["model_dtype"] = cfg.model_dtype
    return identity


def harvest(cfg: HarvestConfig, progress: bool = True, repair: bool = False) -> HarvestSummary:
    """Harvest ``cfg``; ``repair`` first forgets the chunks ``verify`` finds damaged, so exactly
    those are recomputed (and the row arrays rewritten if they are damaged)."""
    t0 = time.perf_counter()
    layers = sorted(set(cfg.layers))
    root = Root(cfg.location)
    _check_writable(root)
    lm = load_lm(cfg.lm, cfg.data_dir, cfg.device, cfg.model_dtype)
    lm.check_layers(layers)
    lm.check_ctx(cfg.ctx)
    per_seq = cfg.ctx - 1
    n_rows = -(-cfg.tokens // per_seq) * per_seq
    # the table covers every stored row too: they are checked against the corpus, and may be recomputed;
    # it also refuses a TOKENS the corpus cannot give, which no amount of disk space would fix
    table = token_table(lm, cfg.data, cfg.split, cfg.ctx, max(n_rows, _stored_rows(root)), cfg.text_field)
    _check_space(root, cfg, lm, layers, n_rows)
    identity = store_identity(cfg, lm)
    hooks = {h: HOOKS[h] for h in lm.hooks}
    writer = StoreWriter(cfg.location, identity, hooks, lm.d_model, lm.n_layers, lm.d_mlp)
    run_id = canonical_hash({"identity": identity, "layers": layers, "n_rows": n_rows})
    summary = HarvestSummary(cfg.location, n_rows)
    torch_dtype = getattr(torch, cfg.dtype)
    if not repair:  # refuse another model or a changed corpus before taking any lock (checked again under it)
        writer.check(table.rows())
    with writer_lock(root, run_id, cfg.shard, cfg.n_shards):
        with meta_lock(root):
            rewrite_rows = _forget_damaged(cfg.location) if repair else False
            writer.prepare(n_rows, layers, table.rows(), rewrite_rows=rewrite_rows)
        seqs_per_chunk = writer.chunk_rows // per_seq
        todo = []
        for c in range(cfg.shard, writer.n_chunks, cfg.n_shards):
            missing = [l for l in layers if not writer.chunk_done(l, c)]
            if missing:
                todo.append((c, missing))
        total_rows = sum(min(writer.chunk_rows, n_rows - c * writer.chunk_rows) for c, _ in todo)
        bar = progress_bar(total_rows, progress, f"harvest {cfg.lm} L{layers[0]}-{layers[-1]}"
                        + (f" shard {cfg.shard}/{cfg.n_shards}" if cfg.n_shards > 1 else ""))
        chunk_writer = _ChunkWriter(writer)
        t_loop = time.perf_counter()
        try:
            for c, missing in todo:
                ids = torch.from_numpy(table.ids[c * seqs_per_chunk : (c + 1) * seqs_per_chunk]).long()
                acts = capture(lm, ids.to(lm.device), {l: tuple(hooks) for l in missing})
                for layer in missing:
                    values = {}
                    for h in hooks:
                        x = acts[(layer, h)][:, 1:].reshape(-1, lm.d_model)
                        if cfg.dtype == "float16" and not bool(x.abs().max() <= FP16_MAX):
                            check_finite(x.float().cpu().numpy(), layer, h, c, cfg.dtype)  # names the problem
                        values[h] = _to_host(x.to(torch_dtype))
                    ready = None
                    if lm.device.type == "cuda":
                        ready = torch.cuda.Event()
                        ready.record()
                    chunk_writer.put(layer, c, values, ready)
                    summary.computed_chunks[layer] = summary.computed_chunks.get(layer, 0) + 1
                    summary.bytes_written += sum(v.nbytes for v in values.values())
                rows = ids.shape[0] * per_seq
                summary.tokens_computed += rows
                bar.update(rows)
        finally:
            chunk_writer.close()
            bar.close()
        summary.loop_seconds = time.perf_counter() - t_loop
        with meta_lock(root):
            summary.complete_layers = writer.finalize()
    summary.seconds = time.perf_counter() - t0
    return summary


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A CPU tensor as is; a GPU one copied without blocking into fresh pinned memory (the
    writer thread waits for the copy's event), so the next forward starts at once."""
    if x.device.type == "cpu":
        return x
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host


def _stored_manifest(root: Root) -> dict:
    """The manifest of the store at ``root`` ({} if there is none yet)."""
    try:
        manifest = root.read_json("zarr.json").get("attributes", {}).get("manifest", {})
    except (FileNotFoundError, ValueError, AttributeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _stored_rows(root: Root) -> int:
    return int(_stored_manifest(root).get("n_rows", 0))


def _check_space(root: Root, cfg: HarvestConfig, lm: LoadedLM, layers: list[int], n_rows: int) -> None:
    """Fail before the work when the disk cannot hold the chunks still to compute."""
    if not root.local:
        return
    manifest = _stored_manifest(root)
    done = manifest.get("layers") or []
    stored = int(manifest.get("n_rows", 0))
    rows = sum(max(0, n_rows - stored) if layer in done else n_rows for layer in layers)
    need = rows * lm.d_model * len(lm.hooks) * np.dtype(cfg.dtype).itemsize
    check_writable(root.path, need, what="the harvest store")


def _forget_damaged(location: str) -> bool:
    from pipeline.data.verify import forget_damaged, verify

    report = verify(location)
    if report.half_created:
        return False  # prepare recreates it
    return forget_damaged(location, report)


def _check_writable(root: Root) -> None:
    if not root.local:
        return
    probe = Path(root.path)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"cannot write to {probe} (needed for {root.path}); choose a writable DATA_DIR")
