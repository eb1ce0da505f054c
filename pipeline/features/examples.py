"""Per-latent statistics and example contexts in one streaming, resumable pass over a store.

For every latent of every source layer of a ``Decomposition`` it keeps, in
memory bounded by the number of latents (never by the number of rows):

- ``count`` (rows where it fired), ``sum`` (float64) and ``max`` of its activation;
- ``hist``: counts of its nonzero activations in fixed log10 bins
  (``HIST_LO``..``HIST_HI``; values outside fall into the end bins);
- the top ``top_n`` activating rows, by a chunked top-k merge (the state's
  top rows and a batch's top rows, top-k again);
- ``samples`` rows drawn uniformly from its nonzero activations (the rows with
  the largest random keys, merged the same way). Sorted by activation they
  are samples from its activation quantiles;
- for each kept row, the latent's activation on the surrounding rows of the
  same window (``left`` before, ``right`` after), taken while the batch is in
  memory: a chunk of a store holds whole windows, so a context never spans two.

Batches hold whole windows too. The state is saved every ``save_every``
seconds (and at the end) with the index of the next chunk; a killed run
resumes from there and ends with the same numbers as an uninterrupted one,
because the random keys of a batch depend only on the seed and its position.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.core.errors import Interrupted, UserError
from pipeline.core.hashing import canonical_hash
from pipeline.core.io import write_atomic, write_json_atomic
from pipeline.methods.base import Decomposition

HIST_LO, HIST_HI, HIST_BINS = -3.0, 3.0, 48  # log10 activation range of the histograms
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureConfig:
    top_n: int = 16  # top activating contexts kept per latent
    samples: int = 16  # uniform samples of nonzero activations per latent (quantile examples)
    left: int = 15  # context tokens before the activating one
    right: int = 4  # and after it
    rows: int = 0  # store rows to scan (0 = all), rounded up to whole windows
    seed: int = 0
    batch_rows: int = 2048  # rows encoded at once (rounded down to whole windows)

    def __post_init__(self):
        for name in ("top_n", "samples", "left", "right", "rows", "batch_rows"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)} must be >= 0")
        if self.top_n == 0:
            raise UserError("top_n must be at least 1")

    @property
    def width(self) -> int:
        return self.left + 1 + self.right


def hist_edges() -> np.ndarray:
    return np.linspace(HIST_LO, HIST_HI, HIST_BINS + 1)


class LatentState:
    """The running statistics of the latents of one source layer."""

    FIELDS = ("count", "sum", "max", "hist", "top_act", "top_row", "top_ctx",
              "smp_key", "smp_act", "smp_row", "smp_ctx")

    def __init__(self, n: int, cfg: FeatureConfig):
        self.cfg = cfg
        c = cfg.width
        self.count = torch.zeros(n, dtype=torch.int64)
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.max = torch.zeros(n)
        self.hist = torch.zeros(n, HIST_BINS, dtype=torch.int64)
        self.top_act = torch.full((cfg.top_n, n), -math.inf)
        self.top_row = torch.full((cfg.top_n, n), -1, dtype=torch.int64)
        self.top_ctx = torch.zeros(cfg.top_n, n, c)
        self.smp_key = torch.full((cfg.samples, n), -math.inf)
        self.smp_act = torch.zeros(cfg.samples, n)
        self.smp_row = torch.full((cfg.samples, n), -1, dtype=torch.int64)
        self.smp_ctx = torch.zeros(cfg.samples, n, c)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}{f}": getattr(self, f).contiguous() for f in self.FIELDS}

    def load(self, tensors: dict[str, Tensor], prefix: str) -> None:
        for f in self.FIELDS:
            setattr(self, f, tensors[f"{prefix}{f}"])

    def update(self, acts: Tensor, row0: int, window: int, gen: torch.Generator) -> None:
        """Fold in dense activations [rows, n] of global rows ``row0``..; rows hold whole windows."""
        fired = acts > 0
        self.count += fired.sum(0)
        self.sum += acts.sum(0, dtype=torch.float64)
        self.max = torch.maximum(self.max, acts.max(0).values)
        rows, lat = fired.nonzero(as_tuple=True)
        if rows.numel():
            logs = acts[rows, lat].log10()
            bins = ((logs - HIST_LO) / ((HIST_HI - HIST_LO) / HIST_BINS)).floor().clamp(0, HIST_BINS - 1).long()
            self.hist.view(-1).index_add_(0, lat * HIST_BINS + bins, torch.ones_like(bins))
        take = min(self.cfg.top_n, acts.shape[0])
        vals, idx = acts.topk(take, dim=0)
        vals = torch.where(vals > 0, vals, -math.inf)
        self.top_act, self.top_row, self.top_ctx = _merge(
            (self.top_act, self.top_row, self.top_ctx), (vals, idx + row0, self._contexts(acts, idx, row0, window)),
            self.cfg.top_n)
        if self.cfg.samples:
            keys = torch.rand(acts.shape, generator=gen)
            keys = torch.where(fired, keys, -math.inf)
            take = min(self.cfg.samples, acts.shape[0])
            kv, idx = keys.topk(take, dim=0)
            new_act = acts.gather(0, idx)
            merged_key, merged = _merge_keyed((self.smp_key, self.smp_act, self.smp_row, self.smp_ctx),
                                              (kv, new_act, idx + row0, self._contexts(acts, idx, row0, window)),
                                              self.cfg.samples)
            self.smp_key = merged_key
            self.smp_act, self.smp_row, self.smp_ctx = merged

    def _contexts(self, acts: Tensor, idx: Tensor, row0: int, window: int) -> Tensor:
        """The latent's activation on rows idx-left..idx+right of the same window: [take, n, width]."""
        offsets = torch.arange(-self.cfg.left, self.cfg.right + 1)
        near = idx.unsqueeze(-1) + offsets  # [take, n, width] local rows
        home = (idx.unsqueeze(-1) + row0).div(window, rounding_mode="floor")
        same = (near + row0).div(window, rounding_mode="floor") == home
        valid = same & (near >= 0) & (near < acts.shape[0])
        cols = torch.arange(acts.shape[1]).view(1, -1, 1).expand_as(near)
        return torch.where(valid, acts[near.clamp(0, acts.shape[0] - 1), cols], 0.0)


def _merge(old: tuple, new: tuple, keep: int) -> tuple:
    """Top ``keep`` along dim 0 by the first tensor of (score, row, ctx) state and batch."""
    score = torch.cat([old[0], new[0]])
    top, idx = score.topk(keep, dim=0)
    row = torch.cat([old[1], new[1]]).gather(0, idx)
    ctx_all = torch.cat([old[2], new[2]])
    ctx = ctx_all.gather(0, idx.unsqueeze(-1).expand(-1, -1, ctx_all.shape[-1]))
    return top, torch.where(torch.isfinite(top), row, -1), ctx


def _merge_keyed(old: tuple, new: tuple, keep: int) -> tuple:
    """Like ``_merge`` for (key, act, row, ctx): kept by key, the activations carried along."""
    key = torch.cat([old[0], new[0]])
    top, idx = key.topk(keep, dim=0)
    act = torch.cat([old[1], new[1]]).gather(0, idx)
    row = torch.cat([old[2], new[2]]).gather(0, idx)
    ctx_all = torch.cat([old[3], new[3]])
    ctx = ctx_all.gather(0, idx.unsqueeze(-1).expand(-1, -1, ctx_all.shape[-1]))
    alive = torch.isfinite(top)
    return top, (torch.where(alive, act, 0.0), torch.where(alive, row, -1), ctx)


# ----- the pass --------------------------------------------------------------------------

def source_layers(decomposition: Decomposition) -> tuple[int, ...]:
    """Every layer whose latents the decomposition has (a CLT: all of its layers)."""
    return tuple(sorted({i for j in decomposition.layers for i in decomposition.sources(j)}))


@dataclass
class PassState:
    next_chunk: int
    rows_seen: int
    layers: dict[int, LatentState]


def _partial_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".partial.safetensors"), out.with_name(out.name + ".partial.json")


def _save_state(state: PassState, out: Path, identity: str) -> None:
    tensors: dict[str, Tensor] = {}
    for layer, st in state.layers.items():
        tensors |= st.tensors(f"L{layer}.")
    weights, meta = _partial_paths(out)
    write_atomic(weights, lambda tmp: save_file(tensors, str(tmp)), ".safetensors")
    write_json_atomic(meta, {"identity": identity, "next_chunk": state.next_chunk, "rows_seen": state.rows_seen,
                             "weights_sha": _file_stamp(weights)})


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def _load_state(out: Path, identity: str, fresh: Callable[[], PassState]) -> PassState:
    weights, meta = _partial_paths(out)
    state = fresh()
    if not (weights.exists() and meta.exists()):
        return state
    info = json.loads(meta.read_text())
    if info.get("identity") != identity or info.get("weights_sha") != _file_stamp(weights):
        return state  # another checkpoint, store or setting (or a torn save): start over
    tensors = load_file(str(weights))
    for layer, st in state.layers.items():
        st.load(tensors, f"L{layer}.")
    state.next_chunk, state.rows_seen = int(info["next_chunk"]), int(info["rows_seen"])
    return state


def clear_state(out: Path) -> None:
    for p in _partial_paths(out):
        p.unlink(missing_ok=True)


def collect(decomposition: Decomposition, store, cfg: FeatureConfig, out: Path, identity: dict,
            save_every: float = 60.0, on_chunk: Callable[[int, int, bool], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> PassState:
    """Stream the store's rows through the encoders of every source layer; resumable at ``out``.

    ``on_chunk(done, total, resumed)`` reports progress; ``should_stop()`` (a signal) ends the pass
    after the state of the last finished chunk was saved, raising ``Interrupted``.
    """
    layers = source_layers(decomposition)
    window = int(store.manifest["ctx"]) - 1
    hook = decomposition.input_hook
    total_rows = store.n_rows if not cfg.rows else min(store.n_rows, -(-cfg.rows // window) * window)
    n_chunks = -(-total_rows // store.chunk_rows)
    key = canonical_hash({**identity, "config": asdict(cfg), "rows": total_rows, "format": FORMAT_VERSION})
    state = _load_state(out, key, lambda: PassState(0, 0, {l: LatentState(decomposition.n_latents(l), cfg)
                                                            for l in layers}))
    resumed = state.next_chunk > 0
    batch = max(1, cfg.batch_rows // window) * window
    last_save = time.monotonic()
    if on_chunk:
        on_chunk(state.next_chunk, n_chunks, resumed)
    with torch.inference_mode():
        for chunk in range(state.next_chunk, n_chunks):
            start = chunk * store.chunk_rows
            rows = min(store.chunk_rows, total_rows - start)
            inputs = {l: store.read_chunk(l, hook, chunk)[:rows] for l in layers}
            for b0 in range(0, rows, batch):
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start + b0)
                for l in layers:
                    x = torch.from_numpy(np.ascontiguousarray(inputs[l][b0:b0 + batch])).float()
                    acts = decomposition.encode_layer(l, x).float()
                    state.layers[l].update(acts, start + b0, window, gen)
            state.next_chunk, state.rows_seen = chunk + 1, start + rows
            stopping = should_stop is not None and should_stop()
            if stopping or time.monotonic() - last_save >= save_every:
                _save_state(state, out, key)
                last_save = time.monotonic()
            if on_chunk:
                on_chunk(chunk + 1, n_chunks, False)
            if stopping and chunk + 1 < n_chunks:
                raise Interrupted(f"features state saved after chunk {chunk + 1}/{n_chunks}; "
                                  f"the same command resumes from there")
    return state


# ----- the output file ---------------------------------------------------------------------

def context_tokens(rows: Tensor, tokens: np.ndarray, window: int, left: int, right: int) -> Tensor:
    """Token ids around each global row (same window only, -1 elsewhere): [*rows.shape, width]."""
    offsets = torch.arange(-left, right + 1)
    near = rows.unsqueeze(-1) + offsets
    valid = (rows.unsqueeze(-1) >= 0) & (near >= 0) & (near < len(tokens)) & \
        (near.div(window, rounding_mode="floor") == rows.unsqueeze(-1).div(window, rounding_mode="floor"))
    ids = torch.from_numpy(tokens.astype(np.int64))[near.clamp(0, len(tokens) - 1)]
    return torch.where(valid, ids, -1).to(torch.int32)


def feature_tensors(state: PassState, cfg: FeatureConfig, tokens: np.ndarray, window: int) -> dict[str, Tensor]:
    """The output tensors, latent-major (``[n_latents, ...]``), keyed ``L<layer>.<name>``."""
    out: dict[str, Tensor] = {}
    rows = max(state.rows_seen, 1)
    for layer, st in state.layers.items():
        p = f"L{layer}."
        count = st.count
        top_row, smp_row = st.top_row.T.contiguous(), st.smp_row.T.contiguous()
        out |= {
            p + "frequency": (count.double() / rows).float(),
            p + "count": count,
            p + "mean_act": torch.where(count > 0, st.sum / count.clamp(min=1), 0.0).float(),
            p + "max_act": st.max,
            p + "hist": st.hist.to(torch.int32),
            p + "top_act": torch.where(top_row >= 0, st.top_act.T, 0.0).contiguous(),
            p + "top_row": top_row,
            p + "top_ctx_act": st.top_ctx.permute(1, 0, 2).to(torch.float16).contiguous(),
            p + "top_ctx_tok": context_tokens(top_row, tokens, window, cfg.left, cfg.right),
        }
        if cfg.samples:
            # samples sorted by activation, so they read as quantiles (lowest first; empty slots last)
            act = torch.where(smp_row >= 0, st.smp_act.T, math.inf)
            order = act.argsort(dim=1)
            srow = smp_row.gather(1, order)
            out |= {
                p + "sample_act": torch.where(srow >= 0, st.smp_act.T.gather(1, order), 0.0).contiguous(),
                p + "sample_row": srow.contiguous(),
                p + "sample_ctx_act": st.smp_ctx.permute(1, 0, 2).gather(
                    1, order.unsqueeze(-1).expand(-1, -1, cfg.width)).to(torch.float16).contiguous(),
                p + "sample_ctx_tok": context_tokens(srow, tokens, window, cfg.left, cfg.right),
            }
    return out


KEYS_DOC = {
    "frequency": "[n] fraction of scanned rows where the latent was > 0",
    "count": "[n] rows where it fired",
    "mean_act": "[n] mean activation over the rows where it fired",
    "max_act": "[n] largest activation",
    "hist": "[n, bins] counts of nonzero activations per log10 bin (hist_log10_edges; outside values in the end bins)",
    "top_act": "[n, top_n] top activations, descending (0 where fewer rows fired)",
    "top_row": "[n, top_n] store row of each (-1: empty)",
    "top_ctx_act": "[n, top_n, width] the latent's activation on the context tokens (offsets context_offsets)",
    "top_ctx_tok": "[n, top_n, width] token ids of the context (-1 outside the window)",
    "sample_act": "[n, samples] uniform samples of nonzero activations, ascending (quantiles); 0/-1 rows: empty",
    "sample_row": "[n, samples]", "sample_ctx_act": "[n, samples, width]", "sample_ctx_tok": "[n, samples, width]",
    "logit_top_id": "[n, t] token ids its decoder direction promotes most (direct path through final norm and W_U)",
    "logit_top_value": "[n, t] their logit change for a unit-RMS direction",
    "logit_bottom_id": "[n, t] token ids it suppresses most", "logit_bottom_value": "[n, t]",
}


def write_features(path: Path, tensors: dict[str, Tensor], sidecar: dict) -> None:
    """``features.safetensors`` and ``features.json`` (written last: its presence marks a finished file)."""
    json_path = path.with_suffix(".json")
    json_path.unlink(missing_ok=True)
    header = {"format": "nnd-features", "version": str(FORMAT_VERSION)}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=header), ".safetensors")
    write_json_atomic(json_path, sidecar)


def read_features(path: Path) -> tuple[dict[str, Tensor], dict]:
    path = Path(path)
    json_path = path.with_suffix(".json")
    if not json_path.exists() or not path.exists():
        raise UserError(f"no finished features file at {path}; run `make features CKPT=...` first")
    return load_file(str(path)), json.loads(json_path.read_text())


def token_strings(tokenizer, ids) -> dict[str, str]:
    """{id: text} for every id (as JSON keys), decoded one token at a time."""
    return {str(i): tokenizer.decode([int(i)]) for i in sorted(set(int(i) for i in ids) - {-1})}
