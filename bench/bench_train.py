"""Training throughput of the train stage, against references measured in the same run.

    python bench/bench_train.py [--store PATH] [--layer L] [--steps N] [--batch 4096]

Prints a markdown table:
- training tokens/s of a TopK transcoder (d -> 8d, k=32, batch 4096), the full
  step (loader + loss + sparse backward + Adam + decoder constraint + AuxK);
- the loader alone (rows/s, both hooks): goal >= 20x what training consumes;
- the matmul roofline: the encoder's [batch, d] x [d, 8d] matmul alone (bf16
  and fp32): the one dense product a TopK step cannot avoid; the fraction of
  it the full step reaches;
- a reference step written the way the fastest public CPU path does it
  (fp32 encoder, dense top-k, embedding-bag decode, index_add encoder
  backward), so the speed-up is a same-run ratio;
- sparse vs dense decoding (forward + backward);
- the cost of a K sweep of 4 (one pass, four dictionaries) vs one dictionary.

With no ``--store`` it writes a toy store of the same shape (d=576) in a
temporary directory. The machine is shared: run it when it is quiet, and
compare only ratios from one run. On a machine shared with other
processes, OMP_NUM_THREADS=1 is much faster than two spinning OpenMP threads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.data.loader import ActivationLoader, LoaderConfig
from pipeline.methods.codes import SparseCodes
from pipeline.methods.kernels import SparsePattern
from common import store_or_toy
from pipeline.methods.base import TrainJob
from pipeline.train.config import TrainConfig
from pipeline.train.loop import param_groups, train_step


def timed(fn, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def train_rate(store, layer, ks, steps, batch, variant="topk") -> float:
    """Tokens/s of the real loop (loader included) for a set of members trained together."""
    keys = [(layer, "mlp_in"), (layer, "mlp_out")]
    d = store.d_model
    cfg = TrainConfig(tokens=10**9, batch_size=batch, wandb="disabled", progress=False, log_every=10**9)
    members = []
    for k in ks:
        module = Transcoder(TranscoderConfig(variant=variant, k=k, d_in=d, d_out=d, n_latents=8 * d, seed=k))
        module.init_from_stats(store.stats(*keys[0]), store.stats(*keys[1]))
        module.train()
        members.append((TrainJob(module, keys[0], keys[1], Path("unused")), torch.optim.Adam(param_groups(module), fused=True)))
    loader = ActivationLoader(store, keys, LoaderConfig(batch_size=batch, seed=0))
    n, t0 = 0, None
    for batch_data in loader:
        if n == 0:
            for m, _ in members:
                m.module.init_from_batch(batch_data[keys[0]], batch_data[keys[1]])
        if n == 2:
            t0 = time.perf_counter()
        for m, opt in members:
            train_step(m, opt, batch_data, 1e-4, cfg, with_metrics=False)
        n += 1
        if n == steps + 2:
            break
    return steps * batch / (time.perf_counter() - t0)


def loader_rate(store, layer, batches, batch) -> float:
    loader = ActivationLoader(store, [(layer, "mlp_in"), (layer, "mlp_out")], LoaderConfig(batch_size=batch, seed=1))
    n, t0 = 0, time.perf_counter()
    for _ in loader:
        n += 1
        if n == batches:
            break
    return n * batch / (time.perf_counter() - t0)


def reference_step_rate(d, batch, k, repeat) -> float:
    """fp32 encoder + top-k + embedding_bag decode + index_add encoder backward (the public CPU path)."""
    n = 8 * d
    W_enc = torch.randn(n, d, requires_grad=False) / d**0.5
    b_enc = torch.zeros(n)
    W_dec = torch.nn.Parameter(torch.randn(n, d) / d**0.5)
    x, y = torch.randn(batch, d), torch.randn(batch, d)
    opt = torch.optim.Adam([W_dec], fused=True)

    def step():
        pre = F.relu(F.linear(x, W_enc, b_enc))
        values, idx = pre.topk(k, dim=-1, sorted=False)
        values = values.requires_grad_()
        out = F.embedding_bag(idx, W_dec, per_sample_weights=values, mode="sum")
        loss = (out - y).pow(2).sum()
        loss.backward()
        grad_w = torch.zeros_like(W_enc)
        grad_w.index_add_(0, idx.flatten(), (values.grad.unsqueeze(-1) * x.unsqueeze(1)).reshape(-1, d))
        opt.step()
        opt.zero_grad()

    return batch / timed(step, repeat)


def decode_times(d, batch, k, repeat) -> tuple[float, float]:
    n = 8 * d
    W_dec = torch.nn.Parameter(torch.randn(n, d))
    idx = torch.randint(0, n, (batch, k))
    values = torch.rand(batch * k, requires_grad=True)
    pattern = SparsePattern.from_topk(idx, n)
    grad = torch.randn(batch, d)

    def sparse():
        out = SparseCodes(values, SparsePattern.from_topk(idx, n)).decode(W_dec)
        out.backward(grad)

    dense_acts = SparseCodes(values.detach(), pattern).to_dense().requires_grad_()

    def dense():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = dense_acts @ W_dec
        out.float().backward(grad)

    return timed(sparse, repeat), timed(dense, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="harvest store (default: a toy store with d=576)")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4096)
    args = ap.parse_args()
    store, tmp = store_or_toy(args.store)
    d, batch, k = store.d_model, args.batch, 32
    print(f"store: {store.root.location} (d={d}, {store.n_rows:,} rows); torch threads: {torch.get_num_threads()}")

    single = train_rate(store, args.layer, [k], args.steps, batch)
    sweep = train_rate(store, args.layer, [8, 16, 32, 64], max(3, args.steps // 2), batch)
    loader = loader_rate(store, args.layer, 4 * args.steps, batch)
    x = torch.randn(batch, d)
    W = torch.randn(8 * d, d)
    mm_bf16 = timed(lambda: torch.addmm(torch.zeros(8 * d, dtype=torch.bfloat16), x.bfloat16(), W.bfloat16().T), 5)
    mm_fp32 = timed(lambda: torch.addmm(torch.zeros(8 * d), x, W.T), 3)
    reference = reference_step_rate(d, batch, k, 3)
    sparse_t, dense_t = decode_times(d, batch, k, 5)
    others = {v: train_rate(store, args.layer, [k], max(3, args.steps // 3), batch, v) for v in ("batchtopk", "jumprelu", "vanilla")}

    rows = [
        ("TopK train step, tokens/s (d->8d, k=32, batch %d)" % batch, f"{single:,.0f}", ""),
        ("reference step (fp32, dense top-k, index_add backward), tokens/s", f"{reference:,.0f}",
         f"ours {single / reference:.2f}x"),
        ("loader alone (mlp_in + mlp_out), rows/s", f"{loader:,.0f}", f"{loader / single:.1f}x training (goal >= 20x)"),
        ("encoder matmul roofline bf16, tokens/s", f"{batch / mm_bf16:,.0f}",
         f"training reaches {single * mm_bf16 / batch:.0%} of it"),
        ("encoder matmul fp32, tokens/s", f"{batch / mm_fp32:,.0f}", f"bf16 is {mm_fp32 / mm_bf16:.1f}x fp32"),
        ("decode fwd+bwd: sparse (CSR) vs dense bf16, ms", f"{sparse_t * 1e3:.1f} vs {dense_t * 1e3:.1f}",
         f"sparse {dense_t / sparse_t:.1f}x faster"),
        ("K sweep of 4 (8,16,32,64) in one pass, tokens/s", f"{sweep:,.0f}", f"costs {single / sweep:.2f}x one run (goal < 2.5x)"),
    ] + [(f"{v} train step, tokens/s", f"{r:,.0f}", f"{r / single:.2f}x TopK") for v, r in others.items()]
    print()
    print("| measure | value | ratio |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
