"""Harvest throughput against a bare and a full forward of the same tokens, in one run.

    .venv/bin/python bench/bench_harvest.py [--lm smollm2-135m] [--layers 0-3] [--tokens 32000]

* bare forward: the same windows, batched per chunk as harvest does, cut after
  the last harvested layer, nothing captured or written;
* full forward: the same windows through every block and the unembedding;
* harvest: the real stage (capture, fp16 conversion, zarr writes, completion
  records, statistics) into a fresh store.
Runs are interleaved and repeated; the ratios are of medians. Bytes on disk
per row are counted from the finished store.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.core.layers import parse_layers
from pipeline.data.harvest import HarvestConfig, harvest, token_table
from pipeline.data.models import StopForward
from pipeline.data.models import load_lm
from pipeline.data.store import chunk_rows_for
from stages.common import quiet_libraries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lm", default="smollm2-135m")
    ap.add_argument("--layers", default="0-3")
    ap.add_argument("--tokens", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", default="data")
    args = ap.parse_args()
    quiet_libraries()
    layers = parse_layers(args.layers)
    lm = load_lm(args.lm, Path(args.data_dir))
    ctx = 128
    per_chunk = chunk_rows_for(ctx) // (ctx - 1)
    table = token_table(lm, "bbc", "train", ctx, args.tokens)
    batches = [torch.from_numpy(table.ids[i : i + per_chunk]).long() for i in range(0, len(table.ids), per_chunk)]
    rows = table.n_rows
    stop_layer = lm.hf_model.model.layers[max(layers)]

    def bare():
        def stop(*_):
            raise StopForward
        h = stop_layer.register_forward_hook(stop)
        with torch.inference_mode():
            for ids in batches:
                try:
                    lm.hf_model(ids)
                except StopForward:
                    pass
        h.remove()

    def full():
        with torch.inference_mode():
            for ids in batches:
                lm.hf_model(ids)

    tmp = Path(tempfile.mkdtemp())
    (tmp / "models").symlink_to(Path(args.data_dir).resolve() / "models")
    bytes_per_row = 0.0

    def run_harvest():
        nonlocal bytes_per_row
        shutil.rmtree(tmp / "harvest", ignore_errors=True)
        s = harvest(HarvestConfig(lm=args.lm, layers=tuple(layers), tokens=args.tokens, ctx=ctx, data_dir=tmp),
                    progress=False)
        files = [p for p in Path(s.location).rglob("*") if p.is_file()]
        bytes_per_row = sum(p.stat().st_size for p in files) / s.n_rows
        return s.loop_seconds

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    times = {"bare": [], "harvest": [], "full": []}
    bare()  # warm-up
    for _ in range(args.repeats):
        times["bare"].append(timed(bare))
        times["harvest"].append(run_harvest())
        times["full"].append(timed(full))
    med = {k: statistics.median(v) for k, v in times.items()}
    shutil.rmtree(tmp)
    print(f"\n{args.lm}, layers {args.layers}, {rows} tokens, ctx {ctx}, torch threads {torch.get_num_threads()}\n")
    print("| run | tokens/s (median) | relative to bare forward |")
    print("|---|---|---|")
    for k in ("bare", "harvest", "full"):
        print(f"| {k} | {rows / med[k]:,.0f} | {med['bare'] / med[k]:.2f}x |")
    print(f"\nharvest throughput / bare forward of layers {args.layers}: {med['bare'] / med['harvest']:.2f} (goal >= 0.9)")
    print(f"harvest throughput / full forward: {med['full'] / med['harvest']:.2f}")
    print(f"bytes on disk per row: {bytes_per_row:,.0f} "
          f"({len(layers)} layers x {len(lm.hooks)} hooks x {lm.d_model} x 2 B = "
          f"{len(layers) * len(lm.hooks) * lm.d_model * 2:,} B of activations)")


if __name__ == "__main__":
    main()
