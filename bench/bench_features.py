"""Features pass throughput as a ratio of a bare encode pass over the same rows.

    python bench/bench_features.py --ckpt DIR --store STORE [--rows 65536] [--repeats 2]

- encode: read the store's chunks and run ``encode_layer`` on them, nothing else
  (the least a features pass can do);
- features: ``pipeline.features.examples.collect`` over the same rows (statistics,
  histograms, top-k merge, uniform samples, contexts), state saved only at the end.

Both run in the same process, alternating, and each figure is the median over
the repeats (the machine is shared). Set OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint
from pipeline.data.store import HarvestStore
from pipeline.features.examples import FeatureConfig, collect, source_layers


def encode_pass(decomposition, store: HarvestStore, rows: int, batch: int) -> None:
    layers = source_layers(decomposition)
    with torch.inference_mode():
        for chunk in range(-(-rows // store.chunk_rows)):
            n = min(store.chunk_rows, rows - chunk * store.chunk_rows)
            for layer in layers:
                x = store.read_chunk(layer, decomposition.input_hook, chunk)[:n]
                for b in range(0, n, batch):
                    decomposition.encode_layer(layer, torch.from_numpy(np.ascontiguousarray(x[b:b + batch])).float())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    loaded = checkpoint.load(a.ckpt)
    decomposition = loaded.spec.combine([loaded.module])
    store = HarvestStore.open(a.store)
    window = int(store.manifest["ctx"]) - 1
    cfg = FeatureConfig(rows=a.rows)
    rows = min(store.n_rows, -(-a.rows // window) * window)
    batch = max(1, cfg.batch_rows // window) * window
    times: dict[str, list[float]] = {"encode": [], "features": []}
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        encode_pass(decomposition, store, rows, batch)
        times["encode"].append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            collect(decomposition, store, cfg, Path(tmp) / "features.safetensors", {"bench": 1}, save_every=1e9)
            times["features"].append(time.perf_counter() - t0)
    enc, feat = statistics.median(times["encode"]), statistics.median(times["features"])
    print(f"rows {rows}, latents {sum(decomposition.n_latents(l) for l in source_layers(decomposition))}")
    print(f"| pass | tokens/s | cost vs encode |\n|---|---:|---:|")
    print(f"| bare encode | {rows / enc:,.0f} | 1.00x |")
    print(f"| features pass | {rows / feat:,.0f} | {feat / enc:.2f}x |")


if __name__ == "__main__":
    main()
