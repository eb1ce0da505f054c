"""Comparison table and Pareto plots from real metrics.json files of the tiny model."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.image
import pytest

from pipeline.core.errors import UserError
from pipeline.eval.report import build_report

from test_evaluate import CTX, EVAL_TOKENS, cfg, data_dir, lm, run_cli, save_checkpoints  # noqa: F401 (fixtures)
from test_splice import transcoder

REQUIRED = ["model", "CE", "CE degradation", "MSE", "FVU", "mean L0", "params"]
PER_LAYER = ["latents", "alive", "dead %", "L0", "mean act"]


@pytest.fixture(scope="module")
def evaluated(lm, cfg, tmp_path_factory) -> Path:
    """Baselines (zero, mean, neurons K=4,8) and transcoders K=2,4 on layers 0-1, through the CLI."""
    common = ["--eval-tokens", EVAL_TOKENS, "--data-dir", cfg.data_dir, "--no-progress"]
    result = run_cli("baselines", "--lm", "tiny-llama", "--data", "bbc", "--ctx", CTX, "--layers", "0-1", "--k", "4,8",
                     *common)
    assert result.exit_code == 0, result.output
    folder = tmp_path_factory.mktemp("ckpts")
    for k in (2, 4):
        save_checkpoints(lm, folder / f"k{k}", {l: transcoder(l, seed=l + k, k=k) for l in (0, 1)})
    # both configurations in one call: grouped by configuration, one metrics.json each
    result = run_cli("evaluate", "--ckpt", f"{folder}/k*/L*", *common)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("evaluate: transcoder-topk-") == 2
    return cfg.out_dir


def test_report_writes_tables_with_the_required_columns(evaluated, cfg):
    result = run_cli("report", "--lm", "tiny-llama", "--data", "bbc", "--ctx", CTX, "--eval-tokens", EVAL_TOKENS,
                     "--data-dir", cfg.data_dir)
    assert result.exit_code == 0, result.output
    printed = [Path(p) for p in result.stdout.split()]
    report = evaluated / "report"
    for name in ("table.md", "table_all_layers.csv", "table_single_layer.csv",
                 "pareto_all_layers.png", "pareto_all_layers.svg", "pareto_single_layer.png", "pareto_single_layer.svg"):
        assert report / name in printed and (report / name).stat().st_size > 0

    with open(report / "table_all_layers.csv") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    per_layer = [f"layer {l} {c}" for l in (0, 1) for c in PER_LAYER]
    assert header[: len(REQUIRED) + len(per_layer)] == REQUIRED + per_layer
    models = [r[0] for r in rows[1:]]
    assert models == ["clean model", "zero-ablation", "mean-ablation", "neurons K=4", "neurons K=8",
                      "transcoder topk K=2", "transcoder topk K=4"]
    by_model = {r[0]: dict(zip(header, r)) for r in rows[1:]}
    assert float(by_model["transcoder topk K=4"]["layer 1 L0"]) == 4
    assert by_model["neurons K=8"]["layer 0 latents"] == "128"
    assert float(by_model["clean model"]["CE degradation"]) == 0

    md = (report / "table.md").read_text()
    assert "## All layers replaced at once" in md and "## One layer replaced at a time" in md
    assert "| " + " | ".join(REQUIRED) in md


def test_pareto_pngs_are_real_images(evaluated):
    build_report(evaluated, evaluated / "report")
    for mode in ("all_layers", "single_layer"):
        image = matplotlib.image.imread(evaluated / "report" / f"pareto_{mode}.png")
        assert image.shape[0] > 800 and image.shape[1] > 1500
        svg = (evaluated / "report" / f"pareto_{mode}.svg").read_text()
        for text in ("transcoder topk, K ∈ {2, 4}", "neurons, K ∈ {4, 8}", "mean L0", "nats / token", "zero-ablation"):
            assert text in svg  # matplotlib keeps each text as a comment next to its glyph paths


def test_report_without_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no metrics.json"):
        build_report(tmp_path, tmp_path / "report")
