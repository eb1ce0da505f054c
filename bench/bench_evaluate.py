"""Evaluation throughput: all layers spliced vs a clean forward, measured in the same run.

    python bench/bench_evaluate.py [--lm smollm2-135m] [--data-dir data] [--eval-tokens 2048]
                                   [--layers 0-3] [--ckpt DIR ...] [--repeats 3]

Rows of eval tokens per second for:
- clean: a plain forward of the model to logits plus log-softmax and CE,
  the cheapest way to score the tokens at all;
- spliced: one evaluate job with every layer replaced by a transcoder, as
  ``pipeline.eval.run.run_jobs`` runs it: the live forward with the hooks
  (encode, decode, per-layer statistics), the unembedding, log-softmax, CE,
  ΔCE and KL against the clean distribution;
- the clean log-probabilities recomputed from the cached final hidden
  states, which a run shares between all its jobs (per batch, once).

Without ``--ckpt`` the transcoders are TopK at the default size (8 x d
latents, k = 32), randomly initialised. Clean and spliced passes alternate
batch by batch and each figure is the median over the repeats, because the
machine is shared. Goal: spliced costs <= 1.3x clean.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.eval.config import EVAL_BATCH, EvalConfig, eval_tokens, load_model
from pipeline.eval.methods import load_checkpoints
from pipeline.eval.stats import CleanBatch, JobStats
from pipeline.core.layers import parse_layers
from pipeline.eval.splice import DecompositionSplice, final_hidden, logits
from pipeline.methods.transcoder import LayerwiseDecomposition


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lm", default="smollm2-135m")
    ap.add_argument("--data", default="bbc")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--layers", default="0-3")
    ap.add_argument("--ckpt", nargs="*", default=[])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    cfg = EvalConfig(lm=args.lm, data=args.data, ctx=args.ctx, eval_tokens=args.eval_tokens, data_dir=args.data_dir)
    lm = load_model(cfg)
    tokens = eval_tokens(lm, cfg)
    layers = parse_layers(args.layers)
    if args.ckpt:
        (method,) = load_checkpoints(lm, [Path(p) for p in args.ckpt])
        splice = method.splice
        what = f"checkpoints {', '.join(args.ckpt)}"
    else:
        d = lm.d_model
        splice = DecompositionSplice(LayerwiseDecomposition({l: Transcoder(TranscoderConfig(variant="topk", k=32, d_in=d, d_out=d, n_latents=8 * d,
                                                                 layer=l, seed=l)).eval() for l in layers}))
        what = f"random TopK transcoders, {8 * lm.d_model} latents, k=32"
    batches = [tokens[i : i + EVAL_BATCH] for i in range(0, tokens.shape[0], EVAL_BATCH)]
    d = lm.d_model
    with torch.inference_mode():
        hidden = [final_hidden(lm, b, [])[:, 1:-1].contiguous() for b in batches]
    massive = {l: float("inf") for l in splice.layers}

    def clean_batch(b):
        out = lm.bridge(b)
        logp = F.log_softmax(out[:, 1:-1].reshape(-1, out.shape[-1]).float(), dim=-1)
        return logp.gather(1, b[:, 2:].reshape(-1, 1)).mean()

    def clean_logp_batch(b, h):
        return CleanBatch.from_hidden(lm, h, b[:, 2:].reshape(-1), torch.zeros(h.shape[0] * h.shape[1]))

    def spliced_batch(b, clean, stats):
        h = final_hidden(lm, b, splice.hooks(lm, splice.layers, stats.record))[:, 1:-1]
        stats.add_predictions(F.log_softmax(logits(lm, h.reshape(-1, d)), dim=-1), clean)

    def timed(fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        return time.perf_counter() - t, out

    # Batch by batch, the three passes back to back, so load changes on the
    # shared machine hit them alike; the first repeat is a warm-up.
    times = {"clean": [], "spliced": [], "clean_logp": []}
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):
            total = dict.fromkeys(times, 0.0)
            stats = JobStats(massive)
            for b, h in zip(batches, hidden):
                total["clean"] += timed(clean_batch, b)[0]
                dt, clean = timed(clean_logp_batch, b, h)
                total["clean_logp"] += dt
                total["spliced"] += timed(spliced_batch, b, clean, stats)[0]
            if repeat:
                for k in times:
                    times[k].append(total[k])
    rows = tokens.shape[0] * (tokens.shape[1] - 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{lm.name}, {rows} eval tokens (ctx {cfg.ctx}, batch {EVAL_BATCH} sequences), layers "
          f"{args.layers} spliced with {what}; median of {args.repeats}, torch threads {torch.get_num_threads()}\n")
    print("| pass | tokens/s | seconds | cost vs clean |")
    print("|---|---:|---:|---:|")
    for name, label in (("clean", "clean forward (logits, log-softmax, CE)"),
                        ("spliced", "all layers spliced (hooks, stats, CE, KL)"),
                        ("clean_logp", "clean log-probs from cached hidden states (once per batch, shared)")):
        print(f"| {label} | {rows / med[name]:,.0f} | {med[name]:.2f} | {med[name] / med['clean']:.2f}x |")
    print(f"\nall-layers spliced / clean = {med['spliced'] / med['clean']:.2f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
