"""The measured effect of RkCNN decoder initialisation (INIT=rkcnn) against the default random rows.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_rkcnn.py toy    --out DIR [--seeds 0,1,2]
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_rkcnn.py smollm --data-dir DIR --out DIR [--seeds 0,1,2]
                                                                [--tokens 100000] [--k 32]
    PYTHONPATH=. .venv/bin/python bench/bench_rkcnn.py table  --out DIR

Same budget, same seeds, with and without RkCNN; everything else (data order, the rest of the
init, the training settings) is equal, because the seed sets both and INIT changes only the
first ``rkcnn_fraction`` of the decoder rows (and their tied encoder rows).

- ``toy``: the toy model of superposition (``pipeline.data.toy``, d=64, 512 true features,
  5 active per row on average): TopK k=5, 512 latents, an SAE on mlp_out and a transcoder
  mlp_in -> mlp_out, 4 epochs of 65,536 rows. Measured: dead fraction (the checkpoint's, over
  the last half of training), held-out FVU on the eval split, and the fraction of true
  output features recovered (some decoder row at cosine > 0.9), at the end and right after
  the initialisation.
- ``smollm``: per-layer TopK transcoders on SmolLM2 layers 0-3 from the harvest store under
  ``--data-dir`` (``models/`` and ``harvest/`` there; nothing else is read), through the real
  CLI (``nnd train`` then ``nnd evaluate``, one DATA_DIR per seed under ``--out``): dead
  fraction, FVU and single-layer ΔCE on 4096 held-out tokens.

Each writes ``<out>/<part>.json`` (one record per run); ``table`` prints means ± standard
deviation over seeds, per init, and the RkCNN - random difference with its spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INITS = ("random", "rkcnn")
RECOVERED_COS = 0.9


def recovered(W_dec, truth) -> float:
    """Fraction of true feature directions some decoder row matches at cosine > RECOVERED_COS."""
    import torch

    dec = torch.as_tensor(W_dec, dtype=torch.float32)
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = torch.as_tensor(truth, dtype=torch.float32)
    t = t / t.norm(dim=1, keepdim=True)
    return float(((t @ dec.T).max(dim=1).values > RECOVERED_COS).float().mean())


def toy(out: Path, seeds: list[int]) -> list[dict]:
    import numpy as np
    import torch

    from pipeline import checkpoint
    from pipeline.data.loader import ActivationLoader, LoaderConfig
    from pipeline.data.toy import ToyConfig, truth_path, write_toy_store
    from pipeline.train.config import TrainConfig
    from pipeline.train.jobs import build_jobs, train_jobs

    torch.set_num_threads(1)
    cfg = ToyConfig(d_model=64, n_features=512, n_rows=65536, mean_active=5.0)
    store = write_toy_store(out / "toy" / "train.zarr", cfg, "train")
    held = write_toy_store(out / "toy" / "eval.zarr", cfg, "eval")
    truth = np.load(truth_path(out / "toy" / "train.zarr"))["L0/features_out"]
    x_eval = torch.tensor(held.read_chunk(0, "mlp_in", 0), dtype=torch.float32)
    y_eval = torch.tensor(held.read_chunk(0, "mlp_out", 0), dtype=torch.float32)
    rows = []
    for seed in seeds:
        jobs = []
        for kind in ("sae", "transcoder"):
            for init in INITS:
                jobs += build_jobs(["topk"], store=store, ks=(5,), layers=(0,), n_latents=512, seed=seed, kind=kind,
                                   init=init, out=lambda group, name, s=seed: out / "toy" / f"s{s}" / group / name)
        keys = sorted({k for j in jobs for k in j.keys()})
        first = next(iter(ActivationLoader(store, keys, LoaderConfig(batch_size=1024, seed=seed))))
        at_init = {}
        for j in jobs:  # what the initialisation alone gives (a copy: training re-initialises)
            probe = type(j.module)(j.module.cfg)
            stats = [store.stats(*k) for k in (j.input_key, j.target_key)]
            probe.init_from_stats(*stats)
            probe.init_from_batch(first[j.input_key], first[j.target_key])
            at_init[j.out_dir] = recovered(probe.W_dec.detach(), truth)
        train = TrainConfig(tokens=4 * store.n_rows, batch_size=1024, seed=seed, wandb="disabled", progress=False)
        for kind in ("sae", "transcoder"):  # one fit per kind: the SAE and the transcoder share checkpoint names
            train_jobs([j for j in jobs if j.module.cfg.kind == kind],
                       lambda: ActivationLoader(store, keys, LoaderConfig(batch_size=1024, seed=seed)), train)
        for j in jobs:
            loaded = checkpoint.load(j.out_dir)
            m = loaded.module
            x = y_eval if m.cfg.kind == "sae" else x_eval
            with torch.no_grad():
                err = m(x) - y_eval
            rows.append({"part": "toy", "kind": m.cfg.kind, "init": m.cfg.decoder_init, "seed": seed,
                         "dead": loaded.metadata["dead_fraction"],
                         "fvu": float(err.pow(2).sum() / (y_eval - y_eval.mean(0)).pow(2).sum()),
                         "recovered": recovered(m.W_dec.detach(), truth), "recovered_at_init": at_init[j.out_dir]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def nnd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})


def smollm(data_dir: Path, out: Path, seeds: list[int], tokens: int, k: int) -> list[dict]:
    rows = []
    for seed in seeds:
        d = out / "smollm" / f"s{seed}"
        d.mkdir(parents=True, exist_ok=True)
        for entry in ("models", "harvest"):
            if not (d / entry).exists():
                (d / entry).symlink_to((data_dir / entry).resolve(), target_is_directory=True)
        for init in INITS:
            nnd("train", "--model", "topk", "--k", str(k), "--layers", "0-3", "--tokens", str(tokens), "--seed", str(seed),
                "--init", init, "--wandb", "disabled", "--no-progress", "--data-dir", str(d))
        folder = d / "train" / "smollm2-135m" / "bbc" / "ctx128" / "transcoder"
        nnd("evaluate", "--ckpt", str(folder), "--eval-tokens", "4096", "--data-dir", str(d), "--no-progress")
        for init in INITS:
            tag = "" if init == "random" else f"-{init}"
            metrics = json.loads(next((d / "eval").glob(f"*/*/ctx128-t4096/transcoder-topk{tag}-k{k}-n*-L0-3/metrics.json"))
                                 .read_text())
            single = metrics["modes"]["single_layer"]
            rows.append({"part": "smollm", "kind": "transcoder", "init": init, "seed": seed,
                         "dead": metrics["train_dead_fraction"], "fvu": single["fvu"], "delta_ce": single["delta_ce"],
                         "l0": single["mean_l0"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(out: Path) -> str:
    lines = []
    for part in ("toy", "smollm"):
        path = out / f"{part}.json"
        if not path.exists():
            continue
        rows = json.loads(path.read_text())
        metrics = [m for m in ("dead", "fvu", "delta_ce", "recovered", "recovered_at_init") if m in rows[0]]
        lines += [f"\n{part}: mean ± sd over seeds {sorted({r['seed'] for r in rows})}",
                  "| kind | init | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for kind in dict.fromkeys(r["kind"] for r in rows):
            by = {init: [r for r in rows if r["kind"] == kind and r["init"] == init] for init in INITS}
            for init in INITS:
                cells = [_mean_sd([r[m] for r in by[init]]) for m in metrics]
                lines.append(f"| {kind} | {init} | " + " | ".join(cells) + " |")
            diffs = []
            for m in metrics:  # paired by seed
                pairs = {r["seed"]: r[m] for r in by["rkcnn"]}
                diffs.append(_mean_sd([pairs[r["seed"]] - r[m] for r in by["random"] if r["seed"] in pairs]))
            lines.append(f"| {kind} | rkcnn - random (paired) | " + " | ".join(diffs) + " |")
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {sd:.2g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["toy", "smollm", "table"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--k", type=int, default=32)
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    if a.part == "table":
        print(table(a.out))
        return
    rows = toy(a.out, seeds) if a.part == "toy" else smollm(a.data_dir, a.out, seeds, a.tokens, a.k)
    (a.out / f"{a.part}.json").write_text(json.dumps(rows, indent=1))
    print(table(a.out))


if __name__ == "__main__":
    main()
