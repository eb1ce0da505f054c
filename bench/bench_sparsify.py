"""Side by side with EleutherAI's sparsify: TopK SAE and transcoder, same rows, same tokens.

Runs in the separate bench environment (sparsify must never enter .venv):

    make bench-env   # .venv-bench: torch==2.13.0, eai-sparsify==1.3.3, our store deps pinned
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv-bench/bin/python bench/bench_sparsify.py \\
        --store data/harvest/smollm2-135m/bbc/train-ctx128.zarr --layer 3 --tokens 1048576

One process; per kind, ours and sparsify's are trained in lockstep on the
same batches (one ``ActivationLoader``; each batch goes to both, the order
alternating per step, each step timed), 576 -> 8 x 576 latents, k=32,
batch 4096, the same tokens:

- ours: ``Transcoder`` (TopK, kind transcoder: mlp_in -> mlp_out; kind sae:
  mlp_out) trained with our loop (``pipeline.train._train_step``, our
  defaults: Adam, lr 1e-3/sqrt(n/2^14), 5% warm-up + cosine, AuxK, bf16
  encoder matmul, sparse backward);
- sparsify: ``sparsify.SparseCoder`` (``SparseCoderConfig(k=32,
  expansion_factor=8, transcode=...)``), driven the way ``sparsify.Trainer``
  drives it, with *its* defaults: FVU loss, ``signum`` optimiser
  (ScheduleFreeWrapper(SignSGD), momentum 0.95, lr 5e-3/sqrt(n/2^14)), no
  AuxK (auxk_alpha 0), b_dec at the batch mean, transcoder encoder bias at
  -mean(x) W_enc^T, SAE decoder kept at unit norm with the parallel gradient
  removed. On CPU its forward runs in fp32 (its bf16 autocast is CUDA-only)
  and its decoder is the eager embedding_bag (Triton is GPU-only).

Held out: the last ``--heldout-groups`` loader groups of epoch 0 (never
reached by training; checked). Reported per run: training tokens/s (steps
only, the loader excluded for both), held-out FVU on all rows and on the rows
whose target norm is below 5x the held-out median, and dead % (latents that
fire on no held-out row). The tokens/s ratio is of the two step times summed
over the same interleaved run.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import sys

if "cuda" not in " ".join(sys.argv):  # on CPU sparsify's Triton decoder cannot run; on a GPU it is its default
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import numpy as np
import torch

from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.data.loader import ActivationLoader, LoaderConfig
from pipeline.data.store import HarvestStore
from pipeline.methods.base import TrainJob
from pipeline.train.config import TrainConfig, default_lr, lr_at
from pipeline.train.loop import param_groups, train_step

HOOKS = {"transcoder": ("mlp_in", "mlp_out"), "sae": ("mlp_out", "mlp_out")}


DEVICE = "cpu"  # --device


def _sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def batches(store, keys, batch, n_steps, seed=0):
    """On a GPU: pinned host batches copied without blocking (the loader's device path)."""
    loader = ActivationLoader(store, list(dict.fromkeys(keys)), LoaderConfig(batch_size=batch, seed=seed, device=DEVICE))
    for i, b in enumerate(loader):
        if i == n_steps:
            return
        yield b


def heldout_rows(store, keys, batch, groups, train_rows, seed=0):
    """Rows of the last ``groups`` loader groups of epoch 0, which training never reaches."""
    loader = ActivationLoader(store, list(dict.fromkeys(keys)), LoaderConfig(batch_size=batch, seed=seed))
    all_groups = loader.epoch_groups(0)
    held = np.concatenate(all_groups[-groups:])
    before = sum(store.rows_in_chunk(int(c)) for g in all_groups[:-groups] for c in g)
    if train_rows > before:
        raise SystemExit(f"--tokens {train_rows:,} would reach the held-out chunks (first {before:,} rows only)")
    out = {}
    for key in dict.fromkeys(keys):
        out[key] = torch.from_numpy(np.concatenate([store.read_chunk(*key, int(c)) for c in held]).astype(np.float32)).to(DEVICE)
    return out


@torch.no_grad()
def evaluate(predict, x, y, fired_fn, n_latents, chunk=8192):
    """Held-out FVU (all rows; rows with ||y|| < 5x median) and dead % (no fire on any row)."""
    err = torch.empty_like(y)
    fired = torch.zeros(n_latents, dtype=torch.bool, device=y.device)
    for i in range(0, x.shape[0], chunk):
        y_hat, idx = predict(x[i:i + chunk])
        err[i:i + chunk] = y_hat - y[i:i + chunk]
        fired[fired_fn(idx)] = True
    norms = y.norm(dim=-1)
    normal = norms < 5 * norms.median()

    def fvu(e, t):
        return float(e.pow(2).sum() / (t - t.mean(0)).pow(2).sum())

    return fvu(err, y), fvu(err[normal], y[normal]), 1 - float(fired.float().mean())


class Ours:
    """Our TopK dictionary and loop (``_train_step``, our defaults)."""

    def __init__(self, store, layer, kind, tokens, batch, k):
        self.keys = keys = [(layer, h) for h in HOOKS[kind]]
        d = store.d_model
        self.n_latents = 8 * d
        self.cfg = TrainConfig(tokens=tokens, batch_size=batch, wandb="disabled", progress=False, log_every=10**9)
        self.module = Transcoder(TranscoderConfig(variant="topk", k=k, d_in=d, d_out=d, n_latents=self.n_latents,
                                                  kind=kind, layer=layer, input_hook=keys[0][1], target_hook=keys[1][1]))
        self.module.init_from_stats(store.stats(*keys[0]), store.stats(*keys[1]))
        self.module.to(DEVICE).train()
        self.opt = torch.optim.Adam(param_groups(self.module), lr=1.0, betas=self.cfg.betas, eps=self.cfg.eps, fused=True)
        self.member = TrainJob(self.module, keys[0], keys[1], Path("unused"))
        self.base_lr = default_lr(self.n_latents)

    def step(self, i, b):
        if i == 0:
            self.module.init_from_batch(b[self.keys[0]], b[self.keys[1]])
        train_step(self.member, self.opt, b, lr_at(i, self.cfg, self.base_lr), self.cfg, with_metrics=False)

    def finish(self):
        self.module.eval()
        self.train_dead = float((self.module.tokens_since_fired >= self.cfg.dead_tokens).float().mean())

    def predict(self, x):
        codes = self.module.codes(x)
        y = (codes.decode(self.module.W_dec) + self.module.b_dec) / self.module.target_scale
        return y, codes.pattern.cols[codes.values > 0]


class Sparsify:
    """sparsify's SparseCoder, stepped as sparsify.Trainer steps it, with its defaults."""

    def __init__(self, store, layer, kind, tokens, batch, k):
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD

        self.keys = [(layer, h) for h in HOOKS[kind]]
        self.transcode = kind == "transcoder"
        torch.manual_seed(0)
        self.sae = SparseCoder(store.d_model, SparseCoderConfig(k=k, expansion_factor=8, transcode=self.transcode),
                               device=DEVICE, dtype=torch.float32)
        self.n_latents = self.sae.num_latents
        # Trainer's defaults: signum, lr 5e-3 / sqrt(n / 2^14), ScheduleFree momentum 0.95, auxk_alpha 0.
        lr = 5e-3 / (self.n_latents / 2**14) ** 0.5
        self.opt = ScheduleFreeWrapper(SignSGD([{"params": self.sae.parameters(), "lr": lr}]), momentum=0.95)
        self.opt.train()
        self.train_dead = float("nan")

    def step(self, i, b):
        sae = self.sae
        x, y = b[self.keys[0]].float(), b[self.keys[1]].float()
        if i == 0:  # Trainer: centre the pre-activations, b_dec at the target mean
            with torch.no_grad():
                if self.transcode:
                    sae.encoder.bias.data = -x.mean(0) @ sae.encoder.weight.data.T
                sae.b_dec.data = y.mean(0)
        if not self.transcode:
            sae.set_decoder_norm_to_unit_norm()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEVICE != "cpu"):  # as sparsify.Trainer on a GPU
            out = sae(x=x, y=y, dead_mask=None)
        out.fvu.backward()
        if not self.transcode:
            sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()

    def finish(self):
        self.opt.eval()  # schedule-free: the averaged weights, as Trainer checkpoints them
        self.sae.eval()

    def predict(self, x):
        enc = self.sae.encode(x)
        return self.sae.decode(enc.top_acts, enc.top_indices), enc.top_indices[enc.top_acts > 0]


def run_pair(store, layer, kind, tokens, batch, k, held):
    """Both trained in lockstep on each batch (order alternating), so load drift hits both alike."""
    runs = {"ours": Ours(store, layer, kind, tokens, batch, k), "sparsify": Sparsify(store, layer, kind, tokens, batch, k)}
    elapsed = dict.fromkeys(runs, 0.0)
    keys = runs["ours"].keys
    steps = tokens // batch
    for i, b in enumerate(batches(store, keys, batch, steps)):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            _sync()
            t = time.perf_counter()
            runs[name].step(i, b)
            _sync()
            elapsed[name] += time.perf_counter() - t
    out = {}
    for name, r in runs.items():
        r.finish()
        fvu, fvu_normal, dead = evaluate(r.predict, held[keys[0]], held[keys[1]], lambda i: i, r.n_latents)
        out[name] = {"tok/s": steps * batch / elapsed[name], "fvu": fvu, "fvu_normal": fvu_normal, "dead": dead,
                     "train_dead": r.train_dead}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=2**20)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--heldout-groups", type=int, default=2)
    ap.add_argument("--kinds", default="transcoder,sae")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    import sparsify

    store = HarvestStore.open(args.store)
    print(f"store {args.store} ({store.n_rows:,} rows, d={store.d_model}), layer {args.layer}, "
          f"{args.tokens:,} tokens, torch {torch.__version__}, device {DEVICE}"
          f"{' (' + torch.cuda.get_device_name() + ')' if DEVICE != 'cpu' else ''}, {torch.get_num_threads()} thread(s), "
          f"sparsify from {Path(sparsify.__file__).parent}")
    results = {}
    for kind in args.kinds.split(","):
        keys = [(args.layer, h) for h in HOOKS[kind]]
        held = heldout_rows(store, keys, args.batch, args.heldout_groups, args.tokens)
        n_held = next(iter(held.values())).shape[0]
        t = time.perf_counter()
        for who, r in run_pair(store, args.layer, kind, args.tokens, args.batch, args.k, held).items():
            results[kind, who] = r
            print(f"{kind} {who}: {r}", flush=True)
        print(f"({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"\nheld-out rows: {n_held:,}\n")
    print("| kind | library | train tokens/s | ours / sparsify | held-out FVU (all) | FVU (rows < 5x median norm) | dead % |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (kind, who), r in results.items():
        ratio = r["tok/s"] / results[kind, "sparsify"]["tok/s"] if (kind, "sparsify") in results else math.nan
        print(f"| {kind} | {who} | {r['tok/s']:,.0f} | {ratio:.2f}x | {r['fvu']:.3f} | {r['fvu_normal']:.3f} | "
              f"{100 * r['dead']:.1f} |")


if __name__ == "__main__":
    main()
