"""The comparison table and Pareto plots, from every metrics.json of one eval set.

Two replacement modes, one table and one figure each:

- ``all_layers``: every layer of the method replaced at once;
- ``single_layer``: one layer at a time, metrics averaged over the layers.

Table columns: model, CE, CE degradation (ΔCE), MSE, FVU, mean L0, params,
then per layer: latents, alive, dead %, L0, mean activation; the CSV appends
CE recovered, KL, FVU without massive rows, ΔCE standard error and the Pareto
x-values. Pareto figures: CE (as ΔCE = CE - clean CE, on a log axis, so
the good end of a K sweep is not squashed onto the clean line) and FVU against mean L0, active components per
MLP reconstruction and active parameters (definitions in
``pipeline.eval.run._sparsity_axes``), one line per method through its K sweep.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.io import write_atomic, write_text_atomic
from pipeline.core.layers import layers_label

MODE_TITLES = {"all_layers": "all layers replaced at once", "single_layer": "one layer replaced at a time (mean over layers)"}
FAMILY_ORDER = {"clean": 0, "zero": 1, "mean": 2, "neurons": 3, "sae": 4, "transcoder": 5, "clt": 6}
X_AXES = {
    "mean_l0": ("mean L0", "active latents per layer, mean L0 (latents / token)"),
    "active_components": ("active components", "active components per MLP reconstruction (components / token)"),
    "active_params": ("active parameters", {
        "all_layers": "total active parameters, all replaced MLPs (weights / token)",
        "single_layer": "active parameters per replaced MLP (weights / token)",
    }),
}
Y_AXES = {
    "delta_ce": "CE with replacement − clean CE, ΔCE (nats / token)",
    "fvu": "FVU (fraction of variance unexplained)",
}
DELTA_FLOOR = 1e-4  # ΔCE at or below 0 (noise) is drawn here on the log axis


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


def display_name(m: dict) -> str:
    if m["family"] in ("zero", "mean"):
        return m["label"]
    return f"{m['label']} K={m['k']}"


def _order(m: dict):
    return (FAMILY_ORDER.get(m["family"], 9), m["label"], m["k"] or 0, m["name"])


# ----- table ----------------------------------------------------------------------

def _fmt(value, kind: str) -> str:
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


def table_rows(metrics: list[dict], mode: str) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(columns, rows) of the comparison table and (columns, rows) of the extra figures, for one mode."""
    chosen = sorted((m for m in metrics if mode in m["modes"]), key=_order)
    layers = sorted({l for m in chosen for l in m["layers"]})
    columns = ["model", "CE", "CE degradation", "MSE", "FVU", "mean L0", "params"]
    for l in layers:
        columns += [f"layer {l} latents", f"layer {l} alive", f"layer {l} dead %", f"layer {l} L0", f"layer {l} mean act"]
    extra_columns = ["model", "ΔCE s.e.", "CE recovered vs zero %", "CE recovered vs mean %", "KL",
                     "FVU without massive rows", "active components", "active params"]
    rows, extras = [], []
    if chosen:
        clean = chosen[0]["clean_ce"]
        rows.append(["clean model", _fmt(clean, "ce"), _fmt(0.0, "signed")] + [""] * (len(columns) - 3))
    for m in chosen:
        s = m["modes"][mode]
        row = [display_name(m), _fmt(s["ce"], "ce"), _fmt(s["delta_ce"], "signed"), _fmt(s["mse"], "g"),
               _fmt(s["fvu"], "g"), _fmt(s["mean_l0"], "g"), _fmt(m["params"], "int")]
        for l in layers:
            per = s["layers"].get(str(l), {})
            row += [_fmt(per.get("latents"), "int"), _fmt(per.get("alive"), "int"), _fmt(per.get("dead_pct"), "pct"),
                    _fmt(per.get("l0"), "g"), _fmt(per.get("mean_act"), "g")]
        rows.append(row)
        extras.append([display_name(m), _fmt(s["delta_ce_se"], "g"), _fmt(s["ce_recovered_zero"], "pct"),
                       _fmt(s["ce_recovered_mean"], "pct"), _fmt(s["kl"], "g"), _fmt(s["fvu_normal"], "g"),
                       _fmt(s["active_components"], "g"), _fmt(s["active_params"], "int")])
    return columns, rows, extra_columns, extras


def _markdown(columns: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    out.write("| " + " | ".join(columns) + " |\n")
    out.write("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|\n")
    for row in rows:
        out.write("| " + " | ".join(row) + " |\n")
    return out.getvalue()


def _csv(columns: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()


def write_tables(metrics: list[dict], out_dir: Path) -> list[Path]:
    written = []
    md = [f"# Comparison: {_setting(metrics)}\n"]
    for mode in ("all_layers", "single_layer"):
        columns, rows, extra_columns, extras = table_rows(metrics, mode)
        if len(rows) <= 1:
            continue
        csv_rows = [r + e[1:] for r, e in zip(rows[1:], extras)]
        path = out_dir / f"table_{mode}.csv"
        write_text_atomic(path, _csv(columns + extra_columns[1:], [rows[0] + [""] * (len(extra_columns) - 1)] + csv_rows))
        written.append(path)
        md.append(f"\n## {MODE_TITLES[mode].capitalize()}\n\n")
        md.append(_markdown(columns, rows))
        md.append("\n")
        md.append(_markdown(extra_columns, extras))
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


def plot_pareto(metrics: list[dict], mode: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = sorted((m for m in metrics if mode in m["modes"]), key=_order)
    swept = [m for m in chosen if m["family"] not in ("zero", "mean")]
    if not swept:
        return []
    labels = sorted({m["label"] for m in swept}, key=lambda l: (l != "neurons", l))
    colors = _colors(labels)
    ablations = {m["family"]: m["modes"][mode] for m in chosen if m["family"] in ("zero", "mean")}
    clean = chosen[0]["clean_ce"]
    layers = sorted({l for m in swept for l in m["layers"]})

    fig, axes = plt.subplots(2, 3, figsize=(17, 10), constrained_layout=True)
    for col, (x_key, (x_short, x_label)) in enumerate(X_AXES.items()):
        x_label = x_label[mode] if isinstance(x_label, dict) else x_label
        for row, y_key in enumerate(("delta_ce", "fvu")):
            ax = axes[row, col]
            for i, label in enumerate(labels):
                points = sorted(((m["modes"][mode][x_key], m["modes"][mode][y_key], m["k"]) for m in swept
                                 if m["label"] == label and m["modes"][mode][x_key] is not None
                                 and m["modes"][mode][y_key] is not None), key=lambda p: p[0])
                if not points:
                    continue
                xs, ys, ks = zip(*points)
                ys = [max(y, DELTA_FLOOR) for y in ys]
                k_text = ", ".join(str(k) for k in sorted(set(ks)))
                ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], color=colors[label], lw=1.6, ms=6,
                        label=f"{label}, K ∈ {{{k_text}}}")
                for x, y, k in zip(xs, ys, ks):
                    ax.annotate(f"{k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=colors[label])
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
            ax.set_xlabel(x_label)
            ax.set_ylabel(Y_AXES[y_key])
            ax.set_title(f"{'ΔCE' if y_key == 'delta_ce' else 'FVU'} vs {x_short}", fontsize=11)
            ax.grid(True, which="both", alpha=0.25)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(4, len(names)), fontsize=9, frameon=False,
               title="method, K (annotated at each point: K)")
    m = chosen[0]
    fig.suptitle(f"Pareto frontiers, {MODE_TITLES[mode]}: {m['lm']} layers {layers_label(layers)}, "
                 f"{m['data']} eval split ({m['eval_rows']:,} tokens, clean CE {clean:.3f} nats / token)",
                 fontsize=13)
    paths = []
    for ext in ("png", "svg"):
        path = out_dir / f"pareto_{mode}.{ext}"
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=130 if ext == "png" else None), f".{ext}")
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
    for mode in ("all_layers", "single_layer"):
        paths += plot_pareto(metrics, mode, out_dir)
    return paths
