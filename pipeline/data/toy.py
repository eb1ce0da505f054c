"""A toy model of superposition as an activation source (``DATA=toy``).

Ground truth the trained dictionaries can be checked against:
- ``n_features`` > ``d_model`` known unit directions per layer, for the input
  (``mlp_in``) and, separately, for the output (``mlp_out``);
- each row activates each feature independently with probability
  ``mean_active / n_features`` with a magnitude uniform in [0.5, 1.5]
  (sparse, non-negative);
- ``mlp_in = a @ features_in`` (an SAE on it should recover ``features_in``);
- ``mlp_out = a @ features_out``: a transcoder map with a known sparse
  structure: feature i read along ``features_in[i]`` writes ``features_out[i]``.
  No linear map does this well, because with superposition ``a`` is not a
  linear function of ``mlp_in``.

The rows go through ``pipeline.data.store.StoreWriter``, chunk by chunk, exactly as
a harvest does, so the train stage cannot tell the two apart. Every chunk is a
pure function of (seed, split, layer, chunk): resumable and shardable like a
harvest. The ground truth is saved next to the store (``*.truth.npz``).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.io import write_atomic
from pipeline.data.store import HarvestStore, StoreWriter, chunk_rows_for

HOOKS = {"mlp_in": "toy.{layer}.mlp_in", "mlp_out": "toy.{layer}.mlp_out"}


@dataclass(frozen=True)
class ToyConfig:
    d_model: int = 64
    n_features: int = 512
    n_layers: int = 1
    n_rows: int = 65536
    mean_active: float = 5.0
    ctx: int = 129  # only shapes the chunking: (ctx - 1) rows per "sequence"
    seed: int = 0
    dtype: str = "float16"

    def __post_init__(self):
        if not 0 < self.d_model < self.n_features:
            raise UserError(f"toy: need 0 < d_model < n_features (superposition), got {self.d_model}, {self.n_features}")
        if not 0 < self.mean_active < self.n_features:
            raise UserError(f"toy: mean_active must be in (0, n_features), got {self.mean_active}")
        if self.n_rows <= 0 or self.n_layers <= 0 or self.ctx < 2:
            raise UserError("toy: n_rows and n_layers must be positive and ctx >= 2")

    @property
    def weights_sha256(self) -> str:
        """Identity of the 'model': the ground truth is a function of these fields."""
        key = {k: v for k, v in asdict(self).items() if k in ("d_model", "n_features", "n_layers", "mean_active", "seed")}
        return hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def ground_truth(cfg: ToyConfig, layer: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, layer, 0xFEA7])
    return {"features_in": unit_rows(rng, cfg.n_features, cfg.d_model),
            "features_out": unit_rows(rng, cfg.n_features, cfg.d_model)}


def magnitudes(cfg: ToyConfig, split: str, layer: int, chunk: int, n_rows: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, 1 + ("train", "eval").index(split), layer, chunk])
    active = rng.random((n_rows, cfg.n_features)) < cfg.mean_active / cfg.n_features
    return active * rng.uniform(0.5, 1.5, (n_rows, cfg.n_features))


def toy_rows(cfg: ToyConfig, split: str, layer: int, chunk: int, n_rows: int) -> dict[str, np.ndarray]:
    truth = ground_truth(cfg, layer)
    a = magnitudes(cfg, split, layer, chunk, n_rows)
    return {"mlp_in": (a @ truth["features_in"]).astype(cfg.dtype), "mlp_out": (a @ truth["features_out"]).astype(cfg.dtype)}


def truth_path(store_path: str | Path) -> Path:
    return Path(store_path).with_suffix(".truth.npz")


def write_toy_store(path: str | Path, cfg: ToyConfig, split: str = "train") -> HarvestStore:
    """Write (or finish) the toy store at ``path`` through the harvest writer."""
    if split not in ("train", "eval"):
        raise UserError(f"toy: split must be train or eval, got {split!r}")
    identity = {"lm": "toy", "lm_weights_sha256": cfg.weights_sha256, "data": "toy", "split": split, "ctx": cfg.ctx,
                "bos_token_id": None, "separator_token_id": None, "dtype": cfg.dtype, "compressor": "none",
                "chunk_rows": chunk_rows_for(cfg.ctx)}
    writer = StoreWriter(path, identity, HOOKS, d_model=cfg.d_model, n_layers=cfg.n_layers, d_mlp=cfg.d_model)
    per_seq = cfg.ctx - 1
    n_rows = cfg.n_rows - cfg.n_rows % per_seq
    rows = np.arange(n_rows)
    row_data = (np.zeros(n_rows, np.int32), (rows // per_seq).astype(np.int32), (1 + rows % per_seq).astype(np.int32))
    layers = list(range(cfg.n_layers))
    writer.prepare(n_rows, layers, row_data)
    chunk_rows = chunk_rows_for(cfg.ctx)
    for layer in layers:
        for chunk in range(writer.n_chunks):
            if writer.chunk_done(layer, chunk):
                continue
            rows_here = min(chunk_rows, n_rows - chunk * chunk_rows)
            writer.write_chunk(layer, chunk, toy_rows(cfg, split, layer, chunk, rows_here))
    writer.finalize()
    truth = {f"L{layer}/{name}": v for layer in layers for name, v in ground_truth(cfg, layer).items()}
    write_atomic(truth_path(path), lambda tmp: np.savez(tmp, **truth), ".npz")
    return HarvestStore.open(path)


def load_truth(store_path: str | Path, layer: int) -> dict[str, np.ndarray]:
    with np.load(truth_path(store_path)) as f:
        return {name: f[f"L{layer}/{name}"] for name in ("features_in", "features_out")}


def recovered_fraction(true_dirs: np.ndarray, learned_dirs: np.ndarray, min_cos: float = 0.9) -> float:
    """Fraction of true unit directions matched by some learned unit direction at |cos| >= min_cos."""
    learned = learned_dirs / np.linalg.norm(learned_dirs, axis=1, keepdims=True)
    best = np.abs(true_dirs @ learned.T).max(axis=1)
    return float((best >= min_cos).mean())
