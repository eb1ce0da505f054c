"""The comparison tables and Pareto plots, from every metrics.json of one eval set.

Two replacement modes, one main table, one per-layer table and one figure each:

- ``all_layers``: every layer of the method replaced at once;
- ``single_layer``: one layer at a time, metrics averaged over the layers.

Main table, one row per (method, K): method, K, mean L0, ΔCE ± standard
error, CE recovered vs mean-ablation, KL, FVU, FVU without massive rows,
dead % (latents that did not fire in the trailing training window recorded
in the checkpoint) and active parameters. The per-layer table below it holds
each layer's numbers on the eval tokens (ΔCE in single-layer mode, FVU, L0,
latents, alive on the eval tokens, mean activation). ``table_<mode>.csv``
holds the main columns (ΔCE and its s.e. as two numbers) and then the rest.

Rows and legends follow the method registry (``MethodSpec.order``, by the
``method`` recorded in metrics.json), after the ablations: a new method
appears in its place with no edit here. Pareto figures: ΔCE (log axis, with
± 1 s.e. bars) and FVU against mean L0, active components per MLP
reconstruction and active parameters, one line per method through its K sweep.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.io import write_atomic, write_text_atomic
from pipeline.core.layers import layers_label

MODES = ("all_layers", "single_layer")
MODE_TITLES = {"all_layers": "all layers replaced at once", "single_layer": "one layer replaced at a time (mean over layers)"}
ABLATION_SLOTS = {"zero": -2, "mean": -1}  # before every registered method
UNKNOWN_SLOT = 1000
X_AXES = {
    "mean_l0": ("mean L0", "active latents per layer, mean L0 (latents / token)"),
    "active_components": ("active components", "active components per MLP reconstruction (components / token)"),
    "active_params": ("active parameters", {
        "all_layers": "total active parameters, all replaced MLPs (weights / token)",
        "single_layer": "active parameters per replaced MLP (weights / token)",
    }),
}
Y_AXES = {
    "delta_ce": "CE with replacement − clean CE, ΔCE (nats / token), ± 1 s.e.",
    "fvu": "FVU (fraction of variance unexplained)",
}
DELTA_FLOOR = 1e-4  # ΔCE at or below 0 (noise) is drawn here on the log axis
MAIN_COLUMNS = ["method", "K", "mean L0", "ΔCE ± s.e.", "CE recovered vs mean %", "KL", "FVU",
                "FVU without massive rows", "dead %", "active params"]
CSV_EXTRA = ["CE", "CE recovered vs zero %", "MSE", "active components", "params", "eval tokens"]
LAYER_COLUMNS = ["method", "K", "layer", "ΔCE ± s.e.", "FVU", "FVU without massive rows", "L0", "latents",
                 "alive on eval", "dead % on eval", "mean act"]


def load_metrics(eval_dir: Path) -> list[dict]:
    found = []
    for path in sorted(Path(eval_dir).glob("*/metrics.json")):
        found.append(json.loads(path.read_text()))
    if not found:
        raise UserError(f"no metrics.json under {eval_dir}; run `make evaluate` / `make baselines` for this eval set first")
    keys = {(m["lm"], m["data"], m["ctx"], m["eval_rows"], m["dtype"]) for m in found}
    if len(keys) > 1:
        raise UserError(f"{eval_dir} mixes evaluations of different settings {sorted(keys)}; keep one eval set per folder")
    return found


def is_ablation(m: dict) -> bool:
    return m["family"] in ABLATION_SLOTS


def display_name(m: dict) -> str:
    return m["label"] if is_ablation(m) else f"{m['label']} K={m['k']}"


def slot(m: dict) -> int:
    """Where a method goes in tables and legends: ablations first, then the registry's order."""
    from pipeline.methods import REGISTRY

    if is_ablation(m):
        return ABLATION_SLOTS[m["family"]]
    for name in (m.get("method"), m["family"]):
        if name:
            try:
                return REGISTRY.get(name).order
            except UserError:
                continue
    return UNKNOWN_SLOT


def _order(m: dict):
    return (slot(m), m["label"], m["k"] or 0, m["name"])


# ----- tables ---------------------------------------------------------------------

def _fmt(value, kind: str = "g") -> str:
    if value is None:
        return ""
    if kind == "int":
        return f"{int(round(value)):,}"
    if kind == "pct":
        return f"{value:.1f}" if abs(value) >= 0.05 else "0.0"  # no "-0.0"
    if kind == "ce":
        return f"{value:.4f}"
    if kind == "signed":
        return f"{value:+.4f}"
    return f"{value:.4g}"


def _pm(value, se) -> str:
    return "" if value is None else _fmt(value, "signed") + ("" if se is None else f" ± {se:.4f}")


def _dead_pct(m: dict):
    f = m.get("train_dead_fraction")
    return None if f is None else 100.0 * f


def _chosen(metrics: list[dict], mode: str) -> list[dict]:
    return sorted((m for m in metrics if mode in m["modes"]), key=_order)


def main_rows(metrics: list[dict], mode: str) -> list[list[str]]:
    """The main table of one mode: one row per (method, K), ``MAIN_COLUMNS``."""
    rows = []
    for m in _chosen(metrics, mode):
        s = m["modes"][mode]
        rows.append([m["label"], "" if m["k"] is None else str(m["k"]), _fmt(s["mean_l0"]),
                     _pm(s["delta_ce"], s["delta_ce_se"]), _fmt(s["ce_recovered_mean"], "pct"), _fmt(s["kl"]),
                     _fmt(s["fvu"]), _fmt(s["fvu_normal"]), _fmt(_dead_pct(m), "pct"), _fmt(s["active_params"], "int")])
    return rows


def csv_rows(metrics: list[dict], mode: str) -> tuple[list[str], list[list[str]]]:
    """The main columns as plain numbers (ΔCE and its s.e. apart), then CE, MSE, ... and each layer's numbers."""
    chosen = _chosen(metrics, mode)
    layers = sorted({l for m in chosen for l in m["layers"]})
    columns = MAIN_COLUMNS[:3] + ["ΔCE", "ΔCE s.e."] + MAIN_COLUMNS[4:] + CSV_EXTRA
    columns += [f"layer {l} {c}" for l in layers for c in LAYER_COLUMNS[3:]]
    rows = []
    for m, main in zip(chosen, main_rows(metrics, mode)):
        s = m["modes"][mode]
        row = main[:3] + [_fmt(s["delta_ce"], "signed"), _fmt(s["delta_ce_se"])] + main[4:]
        row += [_fmt(s["ce"], "ce"), _fmt(s["ce_recovered_zero"], "pct"), _fmt(s["mse"]),
                _fmt(s["active_components"]), _fmt(m["params"], "int"), str(m["eval_rows"])]
        for l in layers:
            row += _layer_cells(s["layers"].get(str(l), {}))
        rows.append(row)
    return columns, rows


def _layer_cells(per: dict) -> list[str]:
    return [_pm(per.get("delta_ce"), per.get("delta_ce_se")), _fmt(per.get("fvu")), _fmt(per.get("fvu_normal")),
            _fmt(per.get("l0")), _fmt(per.get("latents"), "int"), _fmt(per.get("alive"), "int"),
            _fmt(per.get("dead_pct"), "pct"), _fmt(per.get("mean_act"))]


def layer_rows(metrics: list[dict], mode: str) -> list[list[str]]:
    """The per-layer table of one mode: one row per (method, K, layer), ``LAYER_COLUMNS``."""
    rows = []
    for m in _chosen(metrics, mode):
        for l, per in sorted(m["modes"][mode]["layers"].items(), key=lambda kv: int(kv[0])):
            rows.append([m["label"], "" if m["k"] is None else str(m["k"]), l, *_layer_cells(per)])
    return rows


def _markdown(columns: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    out.write("| " + " | ".join(columns) + " |\n")
    out.write("|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|\n")
    for row in rows:
        out.write("| " + " | ".join(row) + " |\n")
    return out.getvalue()


def _csv(columns: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()


def _dead_window(metrics: list[dict]) -> str:
    windows = sorted({m["train_dead_window_tokens"] for m in metrics if m.get("train_dead_window_tokens")})
    return " / ".join(f"{w:,}" for w in windows) if windows else "(not recorded)"


def _captions(metrics: list[dict], mode: str) -> tuple[str, str]:
    m = metrics[0]
    windows = m["eval_rows"] // (m["ctx"] - 1)
    main = (f"ΔCE ± its standard error over the {windows} eval windows ({m['eval_rows']:,} tokens); "
            f"dead %: latents that did not fire in the last {_dead_window(metrics)} training tokens "
            f"(recorded at the end of training); active params: "
            + ("all replaced MLPs" if mode == "all_layers" else "per replaced MLP") + ".")
    detail = (f"Per layer, on the {m['eval_rows']:,} eval tokens: alive = latents that fired at least once, "
              f"dead % on eval = the rest" + ("; ΔCE with only that layer replaced." if mode == "single_layer" else "."))
    return main, detail


def write_tables(metrics: list[dict], out_dir: Path) -> list[Path]:
    written = []
    md = [f"# Comparison: {_setting(metrics)}\n"]
    for mode in MODES:
        rows = main_rows(metrics, mode)
        if not rows:
            continue
        path = out_dir / f"table_{mode}.csv"
        write_text_atomic(path, _csv(*csv_rows(metrics, mode)))
        written.append(path)
        main_caption, detail_caption = _captions(metrics, mode)
        md.append(f"\n## {MODE_TITLES[mode].capitalize()}\n\n{main_caption}\n\n")
        md.append(_markdown(MAIN_COLUMNS, rows))
        md.append(f"\n### Per layer\n\n{detail_caption}\n\n")
        md.append(_markdown(LAYER_COLUMNS, layer_rows(metrics, mode)))
    path = out_dir / "table.md"
    write_text_atomic(path, "".join(md))
    return [path, *written]


def _setting(metrics: list[dict]) -> str:
    m = metrics[0]
    return (f"{m['lm']} on {m['data']} (eval split, {m['eval_rows']:,} tokens, ctx {m['ctx']}, "
            f"{m['dtype']}); clean CE {m['clean_ce']:.4f} nats/token")


# ----- Pareto plots ---------------------------------------------------------------------

def _colors(labels: list[str]) -> dict[str, str]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    fixed = {"neurons": "#555555"}
    others = [l for l in labels if l not in fixed]
    return {**{l: cmap(i % 10) for i, l in enumerate(others)}, **{l: c for l, c in fixed.items() if l in labels}}


MARKERS = "osD^v<>ph*"


def _legend_labels(swept: list[dict]) -> list[str]:
    """Legend groups in table order (the registry's), each once."""
    return list(dict.fromkeys(m["label"] for m in swept))


def _points(swept: list[dict], label: str, mode: str, x_key: str, y_key: str) -> list[tuple]:
    found = []
    for m in swept:
        s = m["modes"][mode]
        if m["label"] == label and s[x_key] is not None and s[y_key] is not None:
            found.append((s[x_key], s[y_key], s["delta_ce_se"] if y_key == "delta_ce" else None, m["k"]))
    return sorted(found, key=lambda p: p[0])


def _draw_method(ax, points: list[tuple], label: str, color, marker: str) -> None:
    xs, ys, ses, ks = zip(*points)
    ys = [max(y, DELTA_FLOOR) for y in ys]
    k_text = ", ".join(str(k) for k in sorted(set(ks)))
    ax.plot(xs, ys, marker=marker, color=color, lw=1.6, ms=6, label=f"{label}, K ∈ {{{k_text}}}")
    if all(se is not None for se in ses):  # ± 1 s.e.; the lower bar stops at the log axis floor
        low = [min(se, y - DELTA_FLOOR) for y, se in zip(ys, ses)]
        ax.errorbar(xs, ys, yerr=[low, list(ses)], fmt="none", ecolor=color, elinewidth=1, capsize=3)
    for x, y, k in zip(xs, ys, ks):
        ax.annotate(f"{k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)


def _draw_panel(ax, swept: list[dict], ablations: dict, mode: str, x_key: str, y_key: str, colors: dict) -> None:
    x_short, x_label = X_AXES[x_key]
    for i, label in enumerate(_legend_labels(swept)):
        points = _points(swept, label, mode, x_key, y_key)
        if points:
            _draw_method(ax, points, label, colors[label], MARKERS[i % len(MARKERS)])
    if y_key == "delta_ce":
        styles = {"zero": ":", "mean": "--"}
        for family, s in sorted(ablations.items()):
            ax.axhline(s["delta_ce"], color="firebrick", lw=1, ls=styles[family],
                       label=f"{family}-ablation (ΔCE {s['delta_ce']:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        _readable_log_ticks(axis)
    ax.margins(x=0.08, y=0.08)
    ax.set_xlabel(x_label[mode] if isinstance(x_label, dict) else x_label)
    ax.set_ylabel(Y_AXES[y_key])
    ax.set_title(f"{'ΔCE' if y_key == 'delta_ce' else 'FVU'} vs {x_short}", fontsize=11)
    ax.grid(True, which="both", alpha=0.25)


def plot_pareto(metrics: list[dict], mode: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = _chosen(metrics, mode)
    swept = [m for m in chosen if not is_ablation(m)]
    if not swept:
        return []
    colors = _colors(_legend_labels(swept))
    ablations = {m["family"]: m["modes"][mode] for m in chosen if is_ablation(m)}
    layers = sorted({l for m in swept for l in m["layers"]})
    fig, axes = plt.subplots(2, 3, figsize=(17, 10), constrained_layout=True)
    for col, x_key in enumerate(X_AXES):
        for row, y_key in enumerate(("delta_ce", "fvu")):
            _draw_panel(axes[row, col], swept, ablations, mode, x_key, y_key, colors)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(4, len(names)), fontsize=9, frameon=False,
               title="method, K (annotated at each point: K); ΔCE bars: ± 1 standard error over eval windows")
    m = chosen[0]
    fig.suptitle(f"Pareto frontiers, {MODE_TITLES[mode]}: {m['lm']} layers {layers_label(layers)}, "
                 f"{m['data']} eval split ({m['eval_rows']:,} tokens, clean CE {m['clean_ce']:.3f} nats / token)",
                 fontsize=13)
    return save_figure(fig, out_dir, f"pareto_{mode}")


def save_figure(fig, out_dir: Path, stem: str, exts: tuple[str, ...] = ("png", "svg"), dpi: int = 130) -> list[Path]:
    """Write ``fig`` as ``out_dir/stem.<ext>`` for each ext, each file atomically; close it."""
    import matplotlib.pyplot as plt

    paths = []
    for ext in exts:
        path = Path(out_dir) / f"{stem}.{ext}"
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi if ext == "png" else None), f".{ext}")
        paths.append(path)
    plt.close(fig)
    return paths


def _si(value: float, _pos=None) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _readable_log_ticks(axis) -> None:
    """Log axes labelled 1, 2, 5, 10, 20 ... with k/M suffixes instead of 10^n."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(_si))
    axis.set_minor_formatter(NullFormatter())


def build_report(eval_dir: Path, out_dir: Path) -> list[Path]:
    """Tables and plots for every metrics.json under ``eval_dir``; the written paths."""
    metrics = load_metrics(eval_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_tables(metrics, out_dir)
    for mode in MODES:
        paths += plot_pareto(metrics, mode, out_dir)
    return paths
