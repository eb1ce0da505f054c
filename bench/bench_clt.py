"""CLT training cost against per-layer transcoders on the same batches.

    python bench/bench_clt.py [--store PATH] [--layers 0-3] [--k 64] [--variant batchtopk] [--rounds 5]

Default size: 8 x d_model latents per layer, k = 64 per source layer, batch
4096, layers 0-3 of the harvest store (default:
``data/harvest/smollm2-135m/bbc/train-ctx128.zarr``; make one with
``nnd harvest --layers 0-3``).

- **tokens/s**: the real training step of ``fit`` (``pipeline.train.loop._train_step``:
  loss, sparse backward, decoder-gradient projection, clipping, Adam, decoder
  renormalisation, threshold update, dead-latent bookkeeping) for one CLT, and
  for one transcoder per layer (same variant, k and width), on the same
  in-memory batches, alternated step by step so that noise from other
  processes on the shared cores hits both alike. Loader excluded (see
  bench_train.py for the loader's margin).
- **peak memory**: each configuration runs three steps in a fresh child
  process that reports its peak resident set (VmHWM); a child that only imports and reads
  the batches is the baseline, subtracted in the "over baseline" column. Also
  the exact bytes of weights + gradients + Adam state.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.methods.clt import CLTConfig, CrossLayerTranscoder
from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.core.layers import parse_layers
from pipeline.data.store import HarvestStore
from pipeline.methods.base import TrainJob, as_keys, select
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train_step

DEFAULT_STORE = Path("data/harvest/smollm2-135m/bbc/train-ctx128.zarr")


def load_batches(store: HarvestStore, layers: list[int], batch: int, n: int) -> list[dict]:
    """Batch i: the first ``batch`` rows of chunk i, every layer's mlp_in and mlp_out (fp16, as the loader serves).

    Read straight from the store rather than through the loader, whose
    prefetched groups (several chunks per key) would dominate peak memory.
    """
    assert store.chunk_rows >= batch and store.n_chunks >= n, "the store is too small for these batches"
    return [{(layer, hook): torch.from_numpy(store.read_chunk(layer, hook, i)[:batch].copy())
             for layer in layers for hook in ("mlp_in", "mlp_out")} for i in range(n)]


def build(kind: str, store: HarvestStore, layers: list[int], args) -> list[tuple[TrainJob, torch.optim.Optimizer]]:
    d = store.d_model
    n_latents = args.latents or 8 * d
    if kind == "clt":
        module = CrossLayerTranscoder(CLTConfig(variant=args.variant, k=args.k, d_in=d, d_out=d, n_latents=n_latents,
                                                layers=tuple(layers)))
        members = [TrainJob(module, tuple((l, "mlp_in") for l in layers), tuple((l, "mlp_out") for l in layers), Path("clt"))]
    else:
        members = [TrainJob(Transcoder(TranscoderConfig(variant=args.variant, k=args.k, d_in=d, d_out=d, n_latents=n_latents,
                                                      layer=l, seed=l)), (l, "mlp_in"), (l, "mlp_out"), Path(f"L{l}"))
                   for l in layers]
    out = []
    for m in members:
        stats = {key: store.stats(*key) for key in as_keys(m.input_key) + as_keys(m.target_key)}
        m.module.init_from_stats(select(stats, m.input_key), select(stats, m.target_key))
        m.module.train()
        out.append((m, torch.optim.Adam(m.module.parameters(), lr=1e-4, fused=True)))
    return out


def state_bytes(members) -> int:
    """Weights, their gradients and Adam's two moments."""
    return sum(4 * p.numel() * p.element_size() for m, _ in members for p in m.module.parameters())


def step(members, batch: dict, cfg: TrainConfig, first: bool) -> None:
    for m, opt in members:
        if first:
            m.module.init_from_batch(select(batch, m.input_key), select(batch, m.target_key))
        train_step(m, opt, batch, 1e-4, cfg, with_metrics=False)


def memory_child(args, store, layers) -> None:
    batches = load_batches(store, layers, args.batch, 2)
    if args.memory_of != "baseline":
        members = build(args.memory_of, store, layers, args)
        cfg = TrainConfig(tokens=10**9, batch_size=args.batch, wandb="disabled", progress=False)
        for i in range(3):
            step(members, batches[i % 2], cfg, i == 0)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent through fork and exec, so a child would report at least its parent's size."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--layers", default="0-3")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--latents", type=int, default=0)
    parser.add_argument("--variant", default="batchtopk")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-of", choices=["baseline", "clt", "per-layer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = parse_layers(args.layers)
    store = HarvestStore.open(args.store, layers=layers, hooks=["mlp_in", "mlp_out"])
    if args.memory_of:
        return memory_child(args, store, layers)

    memory = {}
    for what in ("baseline", "clt", "per-layer"):
        cmd = [sys.executable, __file__, "--memory-of", what, "--store", str(args.store), "--layers", args.layers,
               "--k", str(args.k), "--latents", str(args.latents), "--variant", args.variant, "--batch", str(args.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory[what] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]

    batches = load_batches(store, layers, args.batch, 4)
    cfg = TrainConfig(tokens=10**9, batch_size=args.batch, wandb="disabled", progress=False)
    runs = {"clt": build("clt", store, layers, args), "per-layer": build("per-layer", store, layers, args)}
    seconds = {name: 0.0 for name in runs}
    for r in range(args.rounds + 1):  # round 0 warms up (and initialises from the first batch)
        for name, members in runs.items():
            t = time.perf_counter()
            step(members, batches[r % len(batches)], cfg, r == 0)
            if r:
                seconds[name] += time.perf_counter() - t
    rate = {name: args.rounds * args.batch / s for name, s in seconds.items()}

    n_latents = args.latents or 8 * store.d_model
    print(f"\nlayers {args.layers} of {args.store}, {args.variant} k={args.k} per layer, {n_latents} latents per layer, "
          f"batch {args.batch}, {args.rounds} timed steps each, {torch.get_num_threads()} threads\n")
    print("| model | tokens/s | vs per-layer | peak RSS (MB) | over baseline (MB) | weights+grads+Adam (MB) |")
    print("|---|---|---|---|---|---|")
    for name, label in (("clt", "CLT (one, triangular decoders)"), ("per-layer", f"{len(layers)} per-layer transcoders")):
        print(f"| {label} | {rate[name]:,.0f} | {rate[name] / rate['per-layer']:.2f}x | {memory[name]:,.0f} | "
              f"{memory[name] - memory['baseline']:,.0f} | {state_bytes(runs[name]) / 2**20:,.0f} |")
    print(f"| baseline (imports + 2 batches) | | | {memory['baseline']:,.0f} | 0 | |")


if __name__ == "__main__":
    main()
