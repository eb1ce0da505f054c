"""`nnd evaluate`, `nnd baselines`, `nnd report`: splice, measure, compare."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.core import defaults
from pipeline.core.errors import UserError
from stages.common import parse_ints, stage

DEFAULT_EVAL_TOKENS = defaults.EVAL_TOKENS
EVAL_DIR_HELP = ("folder of this eval set: cached reference, one folder per method, report "
                 "(default: <data-dir>/eval/<lm>/<data>/ctx<ctx>-t<eval-tokens>)")


def _modes(text: str) -> tuple[str, ...]:
    from pipeline.eval.config import MODES

    aliases = {"single": "single_layer", "all": "all_layers"}
    modes = tuple(aliases.get(m.strip(), m.strip()) for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"MODES='{text}' must be a comma list of single_layer and all_layers (or single, all)")
    return modes


def _ks(text: str) -> list[int]:
    ks = sorted(set(parse_ints(text, "K")))
    if ks[0] <= 0:
        raise UserError(f"K='{text}' must hold positive integers, e.g. 8,16,32,64")
    return ks


@stage
def evaluate(
    ckpt: List[Path] = typer.Option(..., help="checkpoint directory, folder of checkpoints, or quoted glob (repeatable)"),
    lm: Optional[str] = typer.Option(None, help="target model (default: the one the checkpoint was trained on)"),
    data: Optional[str] = typer.Option(None, help="corpus whose eval split is used (default: the checkpoint's)"),
    ctx: Optional[int] = typer.Option(None, help="context length (default: the checkpoint's)"),
    eval_tokens: int = typer.Option(DEFAULT_EVAL_TOKENS, help="held-out tokens, rounded up to whole windows"),
    modes: str = typer.Option("single_layer,all_layers", help="single_layer and/or all_layers"),
    dtype: str = typer.Option("float32", help="float32, or bfloat16 (~3x faster, ΔCE noise ~0.005 nats)"),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    eval_dir: Optional[Path] = typer.Option(None, help=EVAL_DIR_HELP),
    out: Optional[Path] = typer.Option(None, help="metrics.json path (default: <eval dir>/<method name>/metrics.json)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N (model, dictionaries and splices)"),
):
    """Splice checkpoints into the live model; write metrics.json.

    The per-layer checkpoints of one configuration are spliced together (all
    layers at once, and one at a time); several configurations (or CLTs) in
    CKPT are evaluated in one pass over the eval tokens, one metrics.json each.
    """
    from pipeline.eval.config import EvalConfig, load_model
    from pipeline.eval.methods import checkpoint_origin, load_checkpoints
    from pipeline.eval.run import evaluate_and_write

    origin = checkpoint_origin(ckpt)
    cfg = EvalConfig(lm=lm or origin.get("lm", "smollm2-135m"), data=data or origin.get("data", "bbc"),
                     ctx=ctx or origin.get("ctx", 128), eval_tokens=eval_tokens, dtype=dtype, data_dir=data_dir,
                     eval_dir=eval_dir, device=device)
    model = load_model(cfg)
    methods = load_checkpoints(model, ckpt)
    if out is not None and len(methods) > 1:
        raise UserError(f"--out names one metrics.json, but the checkpoints hold {len(methods)} configurations "
                        f"({', '.join(m.name for m in methods)}); leave --out out to write one per configuration")
    for metrics, path in evaluate_and_write(model, cfg, methods, _modes(modes), progress=progress, out=out):
        print(_summary(metrics, path))


@stage
def baselines(
    lm: str = typer.Option(defaults.LM, help="target model"),
    data: str = typer.Option(defaults.DATA, help="corpus whose eval split is used (mean-ablation reads its training store)"),
    ctx: int = typer.Option(defaults.CTX, help="context length"),
    layers: str = typer.Option(defaults.LAYERS, help="layers, e.g. 0-3"),
    k: str = typer.Option(defaults.PARETO_K, help="neuron-baseline sweep: hidden units kept per token"),
    eval_tokens: int = typer.Option(DEFAULT_EVAL_TOKENS, help="held-out tokens, rounded up to whole windows"),
    modes: str = typer.Option("single_layer,all_layers", help="single_layer and/or all_layers"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    eval_dir: Optional[Path] = typer.Option(None, help=EVAL_DIR_HELP),
    progress: bool = typer.Option(True, help="show a progress bar"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N (model, dictionaries and splices)"),
):
    """Zero-ablation, mean-ablation and the neuron baseline over a K sweep; one metrics.json each."""
    from pipeline.eval.config import EvalConfig, load_model
    from pipeline.eval.methods import mean_method, neuron_method, zero_method
    from pipeline.eval.run import evaluate_and_write
    from pipeline.core.layers import parse_layers

    cfg = EvalConfig(lm=lm, data=data, ctx=ctx, eval_tokens=eval_tokens, dtype=dtype, data_dir=data_dir,
                     eval_dir=eval_dir, device=device)
    wanted = parse_layers(layers)
    ks = _ks(k)
    model = load_model(cfg)
    model.check_layers(wanted)
    methods = [zero_method(model, wanted), mean_method(model, cfg, wanted)]
    methods += [neuron_method(model, kk, wanted) for kk in ks]
    for metrics, path in evaluate_and_write(model, cfg, methods, _modes(modes), progress=progress):
        print(_summary(metrics, path))


@stage
def report(
    lm: str = typer.Option(defaults.LM, help="target model"),
    data: str = typer.Option(defaults.DATA, help="corpus of the evaluation"),
    ctx: int = typer.Option(defaults.CTX, help="context length"),
    eval_tokens: int = typer.Option(DEFAULT_EVAL_TOKENS, help="the EVAL_TOKENS of the evaluations to compare"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    eval_dir: Optional[Path] = typer.Option(None, help=EVAL_DIR_HELP),
    out_dir: Optional[Path] = typer.Option(None, help="where tables and plots go (default: <eval dir>/report)"),
):
    """Comparison table (CSV + Markdown) and Pareto plots (PNG + SVG) from every metrics.json of one eval set."""
    from pipeline.eval.config import EvalConfig
    from pipeline.eval.report import build_report

    cfg = EvalConfig(lm=lm, data=data, ctx=ctx, eval_tokens=eval_tokens, dtype=dtype, data_dir=data_dir,
                     eval_dir=eval_dir)
    outputs = build_report(cfg.out_dir, out_dir or cfg.out_dir / "report")
    outputs.append(_html_report(cfg.out_dir, out_dir or cfg.out_dir / "report", data_dir))
    for path in outputs:
        print(path)


def _html_report(eval_folder: Path, report_dir: Path, data_dir: Path) -> Path:
    """report/index.html: tables, Pareto plots, curves, density and dashboard links (pipeline.features)."""
    from pipeline.features.extract import target_for
    from pipeline.features.report_html import build_html

    def features_dir_of(ckpt: Path) -> Path | None:
        try:
            return target_for(ckpt, data_dir).out_dir
        except UserError:  # a checkpoint that is gone or records no store: no features to link
            return None

    return build_html(eval_folder, report_dir, features_dir_of)


def _summary(metrics, path: Path) -> str:
    parts = [metrics.name]
    for mode, m in metrics.modes.items():
        rec = m.ce_recovered_zero
        parts.append(f"{mode}: ΔCE {m.delta_ce:+.4f} KL {m.kl:.4f}"
                     + (f" FVU {m.fvu:.3f}" if m.fvu is not None else "")
                     + (f" L0 {m.mean_l0:.1f}" if m.mean_l0 is not None else "")
                     + (f" recovered {rec:.1f}%" if rec is not None else ""))
    return "evaluate: " + "; ".join(parts) + f" -> {path}"
