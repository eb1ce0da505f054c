"""One process against two on this machine: DDP (each batch split) and a spread sweep (dictionaries dealt out).

    python bench/bench_ddp.py --store data/harvest/smollm2-135m/bbc/train-ctx128.zarr [--tokens 102400]

The same `nnd train` (TopK transcoders, K=16,32, one layer, 4 x d_model latents) three ways, each in a
fresh DATA_DIR that links the store, timed end to end (process start, loading and saving included):
1 process; --nproc 2 (DDP, gloo); --nproc 2 --spread sweep. Reports wall seconds and the speed-up,
and the held-out-free training FVU each run ends with, so a faster run is not a worse one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {"1 process": [], "2 processes, DDP": ["--nproc", "2"], "2 processes, sweep spread": ["--nproc", "2", "--spread", "sweep"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="a harvest store of smollm2-135m / bbc / ctx 128")
    ap.add_argument("--tokens", type=int, default=102400)
    ap.add_argument("--layer", type=int, default=2)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    rows = {}
    for name, extra in RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            link = data / "harvest" / "smollm2-135m" / "bbc" / "train-ctx128.zarr"
            link.parent.mkdir(parents=True)
            link.symlink_to(args.store.resolve(), target_is_directory=True)
            cmd = [sys.executable, "-m", "stages.cli", "train", "--model", "topk", "--k", "16,32", "--layers",
                   str(args.layer), "--tokens", str(args.tokens), "--wandb", "disabled", "--no-progress",
                   "--data-dir", str(data), *extra]
            t = time.perf_counter()
            subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
            seconds = time.perf_counter() - t
            fvu = [json.loads(p.read_text())["metadata"]["final"]["fvu"]
                   for p in sorted(data.glob("train/**/config.json"))]
            rows[name] = (seconds, fvu)
            print(f"{name}: {seconds:.1f} s, final training FVU {', '.join(f'{f:.3f}' for f in fvu)}", flush=True)
    base = rows["1 process"][0]
    print(f"\n{os.cpu_count()} CPUs, {args.tokens:,} tokens, TopK K=16,32, layer {args.layer}\n")
    print("| run | wall s | speed-up | final training FVU (K=16, K=32) |\n|---|---:|---:|---|")
    for name, (seconds, fvu) in rows.items():
        print(f"| {name} | {seconds:.1f} | {base / seconds:.2f}x | {', '.join(f'{f:.3f}' for f in fvu)} |")


if __name__ == "__main__":
    main()
