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

MAIN = ["method", "K", "mean L0", "ΔCE", "ΔCE s.e.", "CE recovered vs mean %", "KL", "FVU", "FVU without massive rows",
        "dead %", "active params"]


@pytest.fixture(scope="module")
def evaluated(lm, cfg, tmp_path_factory) -> Path:
    """Baselines (zero, mean, neurons K=4,8) and transcoders K=2,4 on layers 0-1, through the CLI."""
    common = ["--eval-tokens", EVAL_TOKENS, "--data-dir", cfg.data_dir, "--no-progress"]
    result = run_cli("baselines", "--lm", "tiny-llama", "--data", "bbc", "--ctx", CTX, "--layers", "0-1", "--k", "4,8",
                     *common)
    assert result.exit_code == 0, result.output
    folder = tmp_path_factory.mktemp("ckpts")
    for k in (2, 4):
        save_checkpoints(lm, folder / f"k{k}", {l: transcoder(l, seed=l + k, k=k) for l in (0, 1)},
                         meta={"dead_fraction": 0.25, "dead_window_tokens": 1000})
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
    assert header[: len(MAIN)] == MAIN and "layer 1 alive on eval" in header
    models = [(r[0], r[1]) for r in rows[1:]]
    assert models == [("zero-ablation", ""), ("mean-ablation", ""), ("neurons", "4"), ("neurons", "8"),
                      ("transcoder topk", "2"), ("transcoder topk", "4")]
    by_model = {r[0] + r[1]: dict(zip(header, r)) for r in rows[1:]}
    assert float(by_model["transcoder topk4"]["layer 1 L0"]) == 4 and float(by_model["transcoder topk4"]["mean L0"]) == 4
    assert float(by_model["transcoder topk4"]["dead %"]) == 25.0 and by_model["neurons8"]["dead %"] == ""
    assert float(by_model["transcoder topk4"]["ΔCE s.e."]) > 0
    assert by_model["neurons8"]["layer 0 latents"] == "128"

    md = (report / "table.md").read_text()
    assert "## All layers replaced at once" in md and "## One layer replaced at a time" in md
    assert "| method | K | mean L0 | ΔCE ± s.e. | CE recovered vs mean % | KL | FVU | FVU without massive rows | dead % |" in md
    assert md.count("### Per layer") == 2 and "the last 1,000 training tokens" in md
    assert "| transcoder topk | 4 | 1 | " in md  # per-layer rows: method, K, layer


def test_report_order_and_legend_come_from_the_registry(evaluated, tmp_path):
    """A method the report has never heard of (skip transcoders) gets its registry slot with no report edit."""
    import json

    from pipeline.eval.report import slot
    from pipeline.methods import REGISTRY

    for path in evaluated.glob("*/metrics.json"):
        (tmp_path / path.parent.name).mkdir()
        (tmp_path / path.parent.name / "metrics.json").write_text(path.read_text())
    source = json.loads(next(evaluated.glob("transcoder-topk-k2*/metrics.json")).read_text())
    skip = {**source, "name": "skip-topk-k2", "label": "transcoder skip-topk", "family": "transcoder", "method": "skip"}
    (tmp_path / "skip").mkdir()
    (tmp_path / "skip" / "metrics.json").write_text(json.dumps(skip))
    build_report(tmp_path, tmp_path / "report")
    with open(tmp_path / "report" / "table_single_layer.csv") as f:
        labels = list(dict.fromkeys(r[0] for r in list(csv.reader(f))[1:]))
    assert labels == ["zero-ablation", "mean-ablation", "neurons", "transcoder topk", "transcoder skip-topk"]
    assert slot(skip) == REGISTRY.get("skip").order > REGISTRY.get("transcoder").order
    assert "transcoder skip-topk, K ∈ {2}" in (tmp_path / "report" / "pareto_single_layer.svg").read_text()


def test_pareto_pngs_are_real_images(evaluated):
    build_report(evaluated, evaluated / "report")
    for mode in ("all_layers", "single_layer"):
        image = matplotlib.image.imread(evaluated / "report" / f"pareto_{mode}.png")
        assert image.shape[0] > 800 and image.shape[1] > 1500
        svg = (evaluated / "report" / f"pareto_{mode}.svg").read_text()
        for text in ("transcoder topk, K ∈ {2, 4}", "neurons, K ∈ {4, 8}", "mean L0", "nats / token", "zero-ablation",
                     "± 1 standard error"):
            assert text in svg  # matplotlib keeps each text as a comment next to its glyph paths


def test_report_without_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no metrics.json"):
        build_report(tmp_path, tmp_path / "report")
