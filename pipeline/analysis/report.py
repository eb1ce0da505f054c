"""Tables (Markdown + CSV) and plots of the topic experiments."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from pipeline.core.io import write_text_atomic
from pipeline.eval.report import save_figure
from pipeline.analysis.steering import SteerRow, first_alpha
from pipeline.analysis.topics import AblationRow


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _f(v, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ";".join(v) if isinstance(v, list) else v for k, v in r.items()})
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----- ablation ---------------------------------------------------------------------

def ablation_summary(rows: Sequence[AblationRow]) -> list[dict]:
    """Per (method, control, n): the means over topics."""
    keys = list(dict.fromkeys((r.method, r.control, r.n) for r in rows))
    out = []
    for method, control, n in keys:
        mine = [r for r in rows if (r.method, r.control, r.n) == (method, control, n)]
        out.append({"method": method, "control": control, "n": n,
                    "delta_ce_topic": _mean(r.delta_ce_topic for r in mine),
                    "delta_ce_other": _mean(r.delta_ce_other for r in mine),
                    "ratio": _mean(r.ratio for r in mine), "difference": _mean(r.difference for r in mine)})
    return out


def write_ablation(rows: Sequence[AblationRow], out_dir: Path, caption: str) -> list[Path]:
    out_dir = Path(out_dir)
    summary = ablation_summary(rows)
    md = [f"# Topic ablation\n\n{caption}\n",
          "Mean over topics. ΔCE (nats) on the ablated topic's predictions and on the other topics'; "
          "selectivity = ratio and difference. `random`: n random alive units (the control).\n",
          "| method | units | n | ΔCE topic | ΔCE other | ratio | difference |", "|---|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        md.append(f"| {s['method']} | {s['control']} | {s['n']} | {_f(s['delta_ce_topic'])} | {_f(s['delta_ce_other'])} "
                  f"| {_f(s['ratio'], 2)} | {_f(s['difference'])} |")
    md += ["", "## Per topic (the topic's own units)", "",
           "| method | topic | n | ΔCE topic | ΔCE other | ratio | difference | units |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.control == "topic":
            md.append(f"| {r.method} | {r.topic} | {r.n} | {_f(r.delta_ce_topic)} | {_f(r.delta_ce_other)} "
                      f"| {_f(r.ratio, 2)} | {_f(r.difference)} | {' '.join(r.units[:4])}{' …' if len(r.units) > 4 else ''} |")
    written = [write_text_atomic(out_dir / "ablation.md", "\n".join(md) + "\n"),
               write_text_atomic(out_dir / "ablation.csv", _csv([asdict(r) for r in rows])),
               write_text_atomic(out_dir / "ablation_summary.csv", _csv(summary))]
    written.append(_plot_ablation(summary, out_dir / "selectivity.png", caption))
    return written


def _plot_ablation(summary: list[dict], path: Path, caption: str) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for ax, key, title in ((axes[0], "difference", "ΔCE topic − ΔCE other (nats)"),
                           (axes[1], "ratio", "ΔCE topic / ΔCE other")):
        for m in methods:
            for control, style in (("topic", "-o"), ("random", ":x")):
                pts = [(s["n"], s[key]) for s in summary if s["method"] == m and s["control"] == control and s[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), style, color=colors[m], label=f"{m}{' (random)' if control == 'random' else ''}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("units ablated (n)")
        ax.set_title(f"selectivity: {title}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("symlog", linthresh=1)
    axes[0].legend(fontsize=7)
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path.parent, path.stem, ("png",))
    return path


# ----- steering ----------------------------------------------------------------------

def steering_frontier(rows: Sequence[SteerRow]) -> list[dict]:
    """Per (method, mode, α): concept and fluency averaged over topics."""
    keys = list(dict.fromkeys((r.method, r.mode, r.alpha) for r in rows))
    return [{"method": m, "mode": mode, "alpha": a,
             "concept": _mean(r.concept for r in rows if (r.method, r.mode, r.alpha) == (m, mode, a)),
             "fluency": _mean(r.fluency for r in rows if (r.method, r.mode, r.alpha) == (m, mode, a))}
            for m, mode, a in keys]


def write_steering(rows: Sequence[SteerRow], out_dir: Path, caption: str, target: float) -> list[Path]:
    out_dir = Path(out_dir)
    frontier = steering_frontier(rows)
    methods = list(dict.fromkeys(r.method for r in rows))
    topics = list(dict.fromkeys(r.topic for r in rows))
    md = [f"# Steering\n\n{caption}\n", "## Frontier (mean over topics)\n",
          "| method | mode | α | concept P(topic) | fluency (mean log-prob) |", "|---|---|---:|---:|---:|"]
    md += [f"| {f['method']} | {f['mode']} | {f['alpha']:g} | {_f(f['concept'], 3)} | {_f(f['fluency'], 3)} |" for f in frontier]
    md += ["", f"## First α reaching concept ≥ {target:g}\n",
           "| method | " + " | ".join(topics) + " | mean |", "|---|" + "---:|" * (len(topics) + 1)]
    for m in methods:
        first = first_alpha([r for r in rows if r.method == m], target)
        md.append(f"| {m} | " + " | ".join("–" if first[t] is None else f"{first[t]:g}" for t in [*topics, "mean"]) + " |")
    md += ["", "## Per topic\n", "| method | topic | unit | AUROC | α | concept | fluency | continuation of prompt 1 |",
           "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        text = " ".join(r.example.split()).replace("|", "/")[:90]
        md.append(f"| {r.method} | {r.topic} | {r.unit} | {r.auroc:.3f} | {r.alpha:g} | {r.concept:.3f} | {r.fluency:.3f} | {text} |")
    written = [write_text_atomic(out_dir / "steering.md", "\n".join(md) + "\n"),
               write_text_atomic(out_dir / "steering.csv", _csv([asdict(r) for r in rows])),
               write_text_atomic(out_dir / "steering_frontier.csv", _csv(frontier))]
    written.append(_plot_frontier(frontier, out_dir / "frontier.png", caption, target))
    return written


def _plot_frontier(frontier: list[dict], path: Path, caption: str, target: float) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, m in enumerate(dict.fromkeys(f["method"] for f in frontier)):
        pts = sorted((f["alpha"], f["concept"], f["fluency"]) for f in frontier if f["method"] == m)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], "-o", color=plt.get_cmap("tab10")(i % 10), label=m)
        for a, c, fl in pts:
            ax.annotate(f"{a:g}", (c, fl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(target, color="#999999", ls=":", lw=1)
    ax.set_xlabel("concept: P(topic | continuation), mean over topics")
    ax.set_ylabel("fluency: mean log-prob under the clean model")
    ax.set_title("steering frontier (labels: α)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path.parent, path.stem, ("png",))
    return path
