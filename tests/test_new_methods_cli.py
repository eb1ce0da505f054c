"""SPD, Matryoshka (per layer and CLT) and INIT=rkcnn go through train -> evaluate -> report
with the real CLI, reached through the method registry (issue 13)."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import run_nnd
from pipeline.core import paths
from pipeline.methods import REGISTRY


def test_new_methods_train_evaluate_and_reach_the_report(data_dir):
    common = ["--lm", "tiny-llama", "--data", "bbc", "--ctx", "32", "--data-dir", str(data_dir)]
    train = ["--k", "6", "--layers", "0-1", "--latents", "96", "--batch-size", "256", "--epochs", "1",
             "--wandb", "disabled", "--no-progress"]
    run_nnd("harvest", *common, "--layers", "0-1", "--tokens", "3000", "--chunk-rows", "256", "--no-progress")
    run_nnd("train", *common, "--model", "spd,matryoshka,matryoshka-clt", "--prefixes", "0.25,0.5", *train)
    run_nnd("train", *common, "--model", "topk", "--init", "rkcnn", *train)
    root = data_dir / "train" / "tiny-llama" / "bbc" / "ctx32"
    written = sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*") if not p.name.startswith("."))
    named = sorted(f"{g}/{n}" for model in ("spd", "matryoshka", "matryoshka-clt")
                   for g, n in paths.checkpoint_names(model, 6, [0, 1]))
    named += [f"{g}/{n}" for g, n in paths.checkpoint_names("topk", 6, [0, 1], init="rkcnn")]
    assert written == sorted(named), written  # Make's naming (paths.py) and the registry's agree
    cfg = json.loads((root / "transcoder" / "matryoshka-k6-L0" / "config.json").read_text())
    assert cfg["config"]["prefixes"] == [24, 48, 96]
    out = run_nnd("prefix", "--ckpt", str(root / "transcoder" / "matryoshka-k6-L0"),
                  "--ckpt", str(root / "transcoder" / "matryoshka-k6-L1"), "--width", "48")
    assert "48 of 96 latents" in out.stdout
    out = run_nnd("evaluate", "--ckpt", str(root / "spd"), "--ckpt", str(root / "transcoder"), "--ckpt", str(root / "clt"),
                  "--eval-tokens", "310", "--data-dir", str(data_dir), "--no-progress")
    for name in ("spd-k6-n96-L0-1", "transcoder-matryoshka-k6-n96-L0-1", "transcoder-matryoshka-k6-n48-L0-1",
                 "matryoshka-clt-batchtopk-k6-n96-L0-1", "transcoder-topk-rkcnn-k6-n96-L0-1"):
        assert name in out.stdout, (name, out.stdout)
    ev = data_dir / "eval" / "tiny-llama" / "bbc" / "ctx32-t310"
    single = json.loads((ev / "spd-k6-n96-L0-1" / "metrics.json").read_text())["modes"]["single_layer"]
    assert single["mean_l0"] == pytest.approx(6, rel=0.5)  # calibrated on training rows, measured on held-out ones
    assert single["active_params"] == pytest.approx(single["mean_l0"] * (64 + 128), rel=1e-6)  # d + d_mlp each
    run_nnd("report", *common, "--eval-tokens", "310")
    with open(ev / "report" / "table_single_layer.csv") as f:
        labels = [row[0] for row in csv.reader(f)][1:]
    for label in ("spd", "transcoder matryoshka", "transcoder matryoshka [:48 of 96]", "matryoshka-clt",
                  "transcoder topk-rkcnn"):
        assert label in labels, labels
    assert labels.index("transcoder matryoshka") < labels.index("matryoshka-clt") < labels.index("spd")
    assert REGISTRY.get("spd").order > REGISTRY.get("matryoshka-clt").order
    bad = run_nnd("train", *common, "--model", "spd", "--kind", "sae", "--k", "6", "--layers", "0", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "KIND=transcoder" in bad.stderr
    bad = run_nnd("prefix", "--ckpt", str(root / "spd" / "spd-k6-L0"), "--width", "8", check=False)
    assert bad.returncode == 2 and "only Matryoshka" in bad.stderr
