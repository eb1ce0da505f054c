"""Dead-latent trajectory of a TopK transcoder on real activations (to compare AuxK implementations).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_auxk_revival.py --store PATH [--layer 3] [--steps 200]

576 -> 4608, k=32, batch 4096, our defaults, dead window 4 batches (so dead
latents appear and AuxK acts within a short run). Prints the dead fraction,
FVU and AuxK loss every 20 steps; run it on two versions of ``pipeline`` (same
seed, same batches) and compare.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.data.loader import ActivationLoader, LoaderConfig
from pipeline.data.store import HarvestStore
from pipeline.methods.base import TrainJob
from pipeline.train.config import TrainConfig, default_lr, lr_at
from pipeline.train.loop import param_groups, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--variant", default="topk")
    args = ap.parse_args()
    store = HarvestStore.open(args.store)
    keys = [(args.layer, "mlp_in"), (args.layer, "mlp_out")]
    d = store.d_model
    cfg = TrainConfig(tokens=args.steps * 4096, wandb="disabled", progress=False, dead_window=4 * 4096)
    m = Transcoder(TranscoderConfig(variant=args.variant, k=32, d_in=d, d_out=d, n_latents=8 * d))
    m.init_from_stats(store.stats(*keys[0]), store.stats(*keys[1]))
    m.train()
    opt = torch.optim.Adam(param_groups(m), lr=1.0, fused=True)
    member = TrainJob(m, keys[0], keys[1], Path("unused"))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for i, b in enumerate(ActivationLoader(store, keys, LoaderConfig(seed=0))):
        if i == args.steps:
            break
        if i == 0:
            m.init_from_batch(b[keys[0]], b[keys[1]])
        log = (i + 1) % 20 == 0
        metrics = train_step(member, opt, b, lr_at(i, cfg, default_lr(8 * d)), cfg, with_metrics=log)
        if log:
            dead = float((m.tokens_since_fired >= cfg.dead_tokens).float().mean())
            print(f"step {i + 1}: dead {dead:.3f} fvu {float(metrics['fvu']):.3f} aux {float(metrics['aux']):.4f}", flush=True)
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
