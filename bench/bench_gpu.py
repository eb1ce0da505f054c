"""GPU measurements (run by bench/gpu_check.sh on a CUDA machine; each part prints one table).

    python bench/bench_gpu.py harvest --data-dir D [--tokens N] [--layers 3]
        fp32 and bf16 harvests of the same rows on the GPU: tokens/s of each, end to end
        (tokenising, forward, device->pinned host copies, the writer thread, zarr chunks).
    python bench/bench_gpu.py dtype --data-dir D
        what a bf16 model changes: relative error of the hooked activations and the clean
        next-token cross-entropy against the fp32 model on held-out text.
    python bench/bench_gpu.py decode
        (above)
    python bench/bench_gpu.py loop --data-dir D
        the loader alone, the training step alone and both: does the GPU wait for data?
        our sparse decode (embedding-bag forward, CSR backward) against the dense fallback
        (codes densified, one matmul each way), forward + backward, 576 -> 4608, k=32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.core.layers import parse_layers


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def harvest_speed(data_dir: Path, tokens: int, layers: str) -> None:
    from pipeline.data.harvest import HarvestConfig, harvest, store_path

    rows = {}
    for dtype in ("float32", "bfloat16"):
        location = store_path(data_dir, "smollm2-135m", "bbc", "train", 128)
        if dtype != "float32":
            location = location.with_name(f"train-ctx128-{dtype}.zarr")
            shutil.rmtree(location, ignore_errors=True)
        cfg = HarvestConfig(lm="smollm2-135m", data="bbc", layers=tuple(parse_layers(layers)), tokens=tokens, ctx=128,
                            data_dir=data_dir, store=str(location), device="cuda", model_dtype=dtype)
        summary = harvest(cfg, progress=False)
        rows[dtype] = summary
        print(f"{dtype}: {summary.line()}; loop {summary.loop_seconds:.1f} s, end to end {summary.seconds:.1f} s",
              flush=True)
    print("\n| model dtype | rows | loop tokens/s | end-to-end tokens/s |\n|---|---:|---:|---:|")
    for dtype, s in rows.items():
        print(f"| {dtype} | {s.tokens_computed:,} | {s.tokens_computed / s.loop_seconds:,.0f} | "
              f"{s.tokens_computed / s.seconds:,.0f} |")


@torch.no_grad()
def dtype_effect(data_dir: Path, n_seqs: int = 64) -> None:
    from pipeline.data.harvest import capture, token_table
    from pipeline.data.models import load_lm

    models = {d: load_lm("smollm2-135m", data_dir, "cuda", d) for d in ("float32", "bfloat16")}
    table = token_table(models["float32"], "bbc", "eval", 128, n_seqs * 127)
    ids = torch.from_numpy(table.ids[:n_seqs]).long().cuda()
    wanted = {layer: ("mlp_in", "mlp_out") for layer in range(4)}
    acts = {d: capture(lm, ids, wanted) for d, lm in models.items()}
    print("| layer | hook | relative error of bf16 (Frobenius, all rows) | max abs error |\n|---|---|---:|---:|")
    for key in sorted(acts["float32"]):
        a, b = acts["float32"][key][:, 1:].float(), acts["bfloat16"][key][:, 1:].float()
        print(f"| {key[0]} | {key[1]} | {float((a - b).norm() / a.norm()):.4f} | {float((a - b).abs().max()):.3g} |")
    ces = {}
    for d, lm in models.items():
        logits = lm.hf_model(ids).logits[:, 1:-1].float()
        ces[d] = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1)))
    print(f"\nclean CE on {n_seqs} x 126 held-out tokens: fp32 {ces['float32']:.4f}, bf16 {ces['bfloat16']:.4f} "
          f"(difference {ces['bfloat16'] - ces['float32']:+.4f} nats/token)")


def decode_speed(n_rows: int = 4096, d: int = 576, n_latents: int = 4608, k: int = 32, reps: int = 50) -> None:
    from pipeline.methods.kernels import SparseDecode, SparsePattern

    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(n_latents, d, device=device, generator=gen, requires_grad=True)
    pre = torch.randn(n_rows, n_latents, device=device, generator=gen)
    values, idx = pre.topk(k, dim=-1)
    values = values.relu().reshape(-1).requires_grad_()
    pattern = SparsePattern.from_topk(idx, n_latents)
    grad = torch.randn(n_rows, d, device=device, generator=gen)

    def sparse():
        out = SparseDecode.apply(values, W, pattern)
        out.backward(grad)

    def dense():
        acts = torch.zeros(n_rows, n_latents, device=device).scatter(1, idx, values.view(n_rows, k))
        (acts @ W).backward(grad)

    times = {}
    for name, fn in (("sparse (embedding-bag + CSR)", sparse), ("dense fallback", dense)):
        for _ in range(5):
            fn()
        _sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync()
        times[name] = (time.perf_counter() - t) / reps
    print(f"decode forward+backward, {n_rows} rows, {d} -> {n_latents}, k={k}, fp32, {torch.cuda.get_device_name()}")
    print("| decode | ms per step | rows/s |\n|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * t:.3f} | {n_rows / t:,.0f} |")


def loop_profile(data_dir: Path, batch: int = 4096, steps: int = 128) -> None:
    """Does the loader keep the GPU fed? The loader alone, the training step alone (one resident
    batch), and both together, on the fp32 store's layer 3 (TopK transcoder, k=32, 4 x d latents)."""
    from pipeline.data.harvest import store_path
    from pipeline.data.loader import ActivationLoader, LoaderConfig
    from pipeline.data.store import HarvestStore
    from pipeline.methods.base import TrainJob
    from pipeline.methods.transcoder import Transcoder, TranscoderConfig
    from pipeline.train.config import TrainConfig, default_lr
    from pipeline.train.loop import param_groups, train_step

    store = HarvestStore.open(store_path(data_dir, "smollm2-135m", "bbc", "train", 128))
    keys = [(3, "mlp_in"), (3, "mlp_out")]
    d = store.d_model
    module = Transcoder(TranscoderConfig(variant="topk", k=32, d_in=d, d_out=d, n_latents=4 * d, layer=3))
    module.init_from_stats(store.stats(*keys[0]), store.stats(*keys[1]))
    module.cuda().train()
    opt = torch.optim.Adam(param_groups(module), lr=1.0)
    job = TrainJob(module, keys[0], keys[1], Path("unused"))
    cfg = TrainConfig(tokens=batch * steps, batch_size=batch, wandb="disabled", progress=False)
    lr = default_lr(4 * d)

    def loader():
        return ActivationLoader(store, keys, LoaderConfig(batch_size=batch, device="cuda"))

    first = next(iter(loader()))
    module.init_from_batch(first[keys[0]], first[keys[1]])
    timings = {}
    for name in ("loader only", "step only (one resident batch)", "loader + step"):
        it = iter(loader())
        next(it)  # the first group's read and the thread start are not timed
        _sync()
        t = time.perf_counter()
        for _ in range(steps):
            b = first if name.startswith("step") else next(it)
            if not name.startswith("loader only"):
                train_step(job, opt, b, lr, cfg, with_metrics=False)
        _sync()
        timings[name] = time.perf_counter() - t
    print(f"{steps} steps of {batch} rows, TopK k=32, {d} -> {4 * d}, {torch.cuda.get_device_name()}")
    print("| what | seconds | rows/s |\n|---|---:|---:|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.2f} | {steps * batch / seconds:,.0f} |")
    stall = timings["loader + step"] - timings["step only (one resident batch)"]
    print(f"\ntime the step waited on the loader: {stall:.2f} s of {timings['loader + step']:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("harvest", "dtype", "decode", "loop"))
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    ap.add_argument("--tokens", type=int, default=2**20)
    ap.add_argument("--layers", default="3")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}), flush=True)
    if args.what == "harvest":
        harvest_speed(args.data_dir, args.tokens, args.layers)
    elif args.what == "dtype":
        dtype_effect(args.data_dir)
    elif args.what == "loop":
        loop_profile(args.data_dir)
    else:
        decode_speed()


if __name__ == "__main__":
    main()
