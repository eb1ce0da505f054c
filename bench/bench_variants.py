"""Training-step speed of every sparsity variant, in a warmed-up state with dead latents.

    python bench/bench_variants.py [--store PATH] [--layer L] [--warmup 60] [--steps 4] [--rounds 3]
                                   [--dead-frac 0.10]

A freshly initialised dictionary has no dead latents, so it never runs AuxK,
and penalised variants (vanilla, JumpReLU) start far from their target L0.
Neither is the state a real run spends its time in. So, for each variant
(576 -> 8 x 576 transcoder, k=32, batch 4096):

1. warm up: ``--warmup`` real training steps from the loader (the L0
   controller runs 10x faster than its default during warm-up only, so
   vanilla and JumpReLU reach their target L0 within it);
2. plant dead latents: before every timed step, exactly the ``--dead-frac``
   of latents that fired least recently are marked dead (tokens_since_fired
   at the window, all others below it), so AuxK runs on them as in a real
   run where that fraction is dead (default 20%, about what a TopK
   transcoder on SmolLM2 layer 3 has after the warm-up with a window of a
   tenth of it: 922 latents, more than k_aux = 288, so AuxK does its full
   work); TopK and BatchTopK are also timed with no dead latent (no AuxK);
3. time ``--steps`` full training steps (loss + AuxK + backward + clip +
   Adam + decoder constraint + update + bookkeeping), on batches held in
   memory (the loader is measured in ``bench_train.py``), the variants
   interleaved over ``--rounds`` rounds; the median per variant is reported.

Every ratio is against the TopK step measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.data.loader import ActivationLoader, LoaderConfig
from pipeline.methods.sparsity import SparsitySettings
from common import store_or_toy
from pipeline.methods.base import TrainJob
from pipeline.train.config import TrainConfig, default_lr
from pipeline.train.loop import param_groups, train_step

VARIANTS = ("topk", "batchtopk", "jumprelu", "vanilla")


def build(variant, store, keys, k, seed=0):
    d = store.d_model
    module = Transcoder(TranscoderConfig(variant=variant, k=k, d_in=d, d_out=d, n_latents=8 * d, seed=seed,
                                         settings=SparsitySettings(controller_rate=0.2)))
    module.init_from_stats(store.stats(*keys[0]), store.stats(*keys[1]))
    module.train()
    opt = torch.optim.Adam(param_groups(module), lr=1.0, fused=True)
    return TrainJob(module, keys[0], keys[1], Path("unused"), name=variant), opt


def plant_dead(module, n_dead: int, window: int) -> None:
    """Exactly n_dead dead latents: the n_dead that fired least recently."""
    tsf = module.tokens_since_fired
    idx = tsf.topk(n_dead).indices if n_dead else tsf.new_zeros(0)
    tsf.clamp_(max=window - 1)
    tsf[idx] = window


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="harvest store (default: a toy store with d=576)")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dead-frac", type=float, default=0.20)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    variants = args.variants.split(",")
    store, tmp = store_or_toy(args.store)
    keys = [(args.layer, "mlp_in"), (args.layer, "mlp_out")]
    print(f"store: {store.root.location} (d={store.d_model}, {store.n_rows:,} rows), layer {args.layer}; "
          f"torch threads: {torch.get_num_threads()}")
    # The dead window of a real run of this length (tokens // 10); planted latents sit above it.
    cfg = TrainConfig(tokens=max(args.batch, args.warmup * args.batch), batch_size=args.batch,
                      wandb="disabled", progress=False, log_every=10**9)
    cfg = dataclasses.replace(cfg, dead_window=cfg.dead_tokens)
    members = {v: build(v, store, keys, args.k) for v in variants}
    lr = default_lr(8 * store.d_model)

    # 1. warm-up through the real loader
    loader = ActivationLoader(store, keys, LoaderConfig(batch_size=args.batch, seed=0))
    held, t_warm = [], time.perf_counter()
    for i, batch in enumerate(loader):
        if i == 0:
            for m, _ in members.values():
                m.module.init_from_batch(batch[keys[0]], batch[keys[1]])
        if i >= args.warmup:
            held.append(batch)
            if len(held) == args.steps:
                break
            continue
        for m, opt in members.values():
            train_step(m, opt, batch, lr, cfg, with_metrics=False)
    natural = {v: float((m.module.tokens_since_fired >= cfg.dead_tokens).float().mean()) for v, (m, _) in members.items()}
    print(f"warm-up: {args.warmup} steps x {len(variants)} variants in {time.perf_counter() - t_warm:.0f} s; "
          f"dead window {cfg.dead_tokens:,} tokens")

    # 2-3. timed steps, interleaved
    n_dead = round(args.dead_frac * 8 * store.d_model)
    runs = [(v, v, n_dead) for v in variants]
    runs += [(f"{v}, no dead latent (no AuxK)", v, 0) for v in variants if members[v][0].module.sparsity.uses_auxk]
    times = {name: [] for name, _, _ in runs}
    l0 = {name: [] for name, _, _ in runs}
    dead = {name: [] for name, _, _ in runs}
    for _ in range(args.rounds):
        for name, v, n in runs:
            m, opt = members[v]
            elapsed = 0.0
            for batch in held:
                plant_dead(m.module, n, cfg.dead_tokens)
                dead[name].append(float((m.module.tokens_since_fired >= cfg.dead_tokens).float().mean()))
                t = time.perf_counter()
                metrics = train_step(m, opt, batch, lr, cfg, with_metrics=False)
                elapsed += time.perf_counter() - t
                with torch.no_grad():
                    xn = batch[keys[0]].float() * m.module.input_scale
                    l0[name].append(float(m.module.sparsity.encode(xn, m.module.W_enc, m.module.b_enc).l0()))
            times[name].append(len(held) * args.batch / elapsed)
    rates = {v: statistics.median(r) for v, r in times.items()}
    ref = rates.get("topk")
    print()
    print(f"| variant | train step tokens/s (median of {args.rounds} rounds x {args.steps} steps) | vs TopK | "
          f"L0 while timed | dead while timed (natural after warm-up) |")
    print("|---|---:|---:|---:|---:|")
    for name, v, _ in runs:
        ratio = f"{rates[name] / ref:.2f}x" if ref else "-"
        print(f"| {name} | {rates[name]:,.0f} | {ratio} | {statistics.mean(l0[name]):.1f} | "
              f"{statistics.mean(dead[name]):.1%} ({natural[v]:.1%}) |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
