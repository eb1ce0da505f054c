"""Typed evaluation results, CE recovered, the Pareto axes, and ``metrics.json``.

``MethodMetrics`` (one per method) holds one ``ModeMetrics`` per replacement
mode; ``to_json`` gives the stable JSON of ``metrics.json`` (keys unchanged
since the first version; the report and tests read them). The Pareto x-axes
other than mean L0 come from the method's spec (``MethodSpec.pareto_axes``),
so a new method brings its own accounting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline.core import paths
from pipeline.core.io import write_json_atomic
from pipeline.eval.config import EvalConfig
from pipeline.eval.methods import EvalMethod
from pipeline.eval.reference import Reference, json_default

ABLATIONS = ("zero", "mean")
PREDICTION_KEYS = ("ce", "delta_ce", "delta_ce_se", "kl", "ce_recovered_zero", "ce_recovered_mean")
LAYER_KEYS = ("mse", "fvu", "fvu_normal", "l0")


@dataclass
class ModeMetrics:
    """One replacement mode: predictions, reconstruction means over layers, Pareto axes, per-layer detail."""

    ce: float
    delta_ce: float
    delta_ce_se: float
    kl: float
    ce_recovered_zero: float | None
    ce_recovered_mean: float | None
    mse: float | None
    fvu: float | None
    fvu_normal: float | None
    mean_l0: float | None
    active_components: float | None
    active_params: float | None
    layers: dict[str, dict] = field(default_factory=dict)


@dataclass
class MethodMetrics:
    name: str
    label: str
    family: str
    k: int | None
    layers: list[int]
    n_latents: dict[str, int]
    params: int
    lm: str
    lm_weights_sha256: str
    data: str
    ctx: int
    eval_rows: int
    eval_predictions: int
    dtype: str
    clean_ce: float
    tokens_sha256: str
    massive_norm: dict[str, float]
    seconds_run: float
    modes: dict[str, ModeMetrics] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # method facts: variant, kind, checkpoints, training facts

    def to_json(self) -> dict:
        out = asdict(self)
        return {**out.pop("info"), **out}


def _recovered(ref: Reference, family: str, replace: Sequence[int], ce: float) -> float | None:
    abl = ref.ablation(family, replace)
    if abl is None or abl["ce"] == ref.clean_ce:
        return None
    return 100.0 * (abl["ce"] - ce) / (abl["ce"] - ref.clean_ce)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _prediction_metrics(ref: Reference, replace: tuple[int, ...], r: dict) -> dict:
    return {"ce": r["ce"], "delta_ce": r["delta_ce"], "delta_ce_se": r["delta_ce_se"], "kl": r["kl"],
            "ce_recovered_zero": _recovered(ref, "zero", replace, r["ce"]),
            "ce_recovered_mean": _recovered(ref, "mean", replace, r["ce"])}


def _axes(lm, method: EvalMethod, mode: str, l0: dict[int, float | None]) -> dict:
    if method.spec is None or any(v is None for v in l0.values()):
        return {"active_components": None, "active_params": None}
    axes = method.spec.pareto_axes(lm.d_model, method.layers, l0, mode, method.weights_per_unit)
    return {"active_components": axes.active_components, "active_params": axes.active_params}


def _single_layer(lm, ref: Reference, method: EvalMethod, results: dict) -> ModeMetrics:
    per_layer = {l: {**_prediction_metrics(ref, (l,), results[(l,)]), **results[(l,)]["layers"][l]} for l in method.layers}
    summary = {key: _mean(per_layer[l].get(key) for l in method.layers) for key in PREDICTION_KEYS + LAYER_KEYS}
    # Recovered from mean CEs, not a mean of ratios: a layer whose ablation
    # costs little has a tiny denominator and would swamp the average.
    for family in ABLATIONS:
        ablated = [ref.ablation(family, (l,)) for l in method.layers]
        if all(a is not None for a in ablated):
            gap = _mean(a["ce"] for a in ablated) - ref.clean_ce
            summary[f"ce_recovered_{family}"] = 100.0 * (gap - summary["delta_ce"]) / gap if gap else None
    # The standard error of a mean over layers of independent estimates.
    ses = [per_layer[l]["delta_ce_se"] for l in method.layers]
    summary["delta_ce_se"] = sum(se**2 for se in ses) ** 0.5 / len(ses)
    summary["mean_l0"] = summary.pop("l0")
    summary |= _axes(lm, method, "single_layer", {l: per_layer[l].get("l0") for l in method.layers})
    return ModeMetrics(**summary, layers={str(l): v for l, v in per_layer.items()})


def _all_layers(lm, ref: Reference, method: EvalMethod, results: dict) -> ModeMetrics:
    r = results[method.layers]
    per_layer = r["layers"]
    summary = _prediction_metrics(ref, method.layers, r)
    summary |= {key: _mean(per_layer[l].get(key) for l in method.layers) for key in LAYER_KEYS}
    summary["mean_l0"] = summary.pop("l0")
    summary |= _axes(lm, method, "all_layers", {l: per_layer[l].get("l0") for l in method.layers})
    return ModeMetrics(**summary, layers={str(l): v for l, v in per_layer.items()})


def method_metrics(lm, cfg: EvalConfig, ref: Reference, method: EvalMethod, results: dict[tuple[int, ...], dict],
                   modes: Sequence[str], seconds: float) -> MethodMetrics:
    out = MethodMetrics(
        name=method.name, label=method.label, family=method.family, k=method.k, layers=list(method.layers),
        n_latents={str(l): n for l, n in method.n_latents.items()}, params=method.params,
        lm=cfg.lm, lm_weights_sha256=lm.weights_sha256, data=cfg.data, ctx=cfg.ctx, eval_rows=cfg.rows,
        eval_predictions=int(ref.ce.numel()), dtype=cfg.dtype, clean_ce=ref.clean_ce,
        tokens_sha256=ref.info["tokens_sha256"], massive_norm={str(l): ref.massive_norm[l] for l in method.layers},
        seconds_run=seconds, info=dict(method.info))
    if "single_layer" in modes:
        out.modes["single_layer"] = _single_layer(lm, ref, method, results)
    if "all_layers" in modes:
        out.modes["all_layers"] = _all_layers(lm, ref, method, results)
    return out


def metrics_path(cfg: EvalConfig, name: str) -> Path:
    return paths.metrics(cfg.out_dir, name)


def write_metrics(cfg: EvalConfig, metrics: MethodMetrics, path: Path | None = None) -> Path:
    from pipeline import __version__

    path = Path(path) if path is not None else metrics_path(cfg, metrics.name)
    return write_json_atomic(path, {**metrics.to_json(), "code_version": __version__}, json_default)
