"""Firing-frequency density: a log10 histogram over latents, with the dead and dense ones counted.

A latent is *dead* here when it never fired in the scanned rows, *dense*
when it fired on more than 1% (or 10%) of them. The numbers go to
``density.json``; the figure (PNG + SVG) marks both thresholds and puts the
dead latents in a bar of their own left of the axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core.io import write_json_atomic
from pipeline.eval.report import save_figure

DENSE = (0.01, 0.10)
LOG_LO = -7.0  # left edge of the histogram (log10 frequency); below: shown at the edge


def density_numbers(frequency: np.ndarray, rows: int) -> dict:
    """Counts and fractions of dead / dense latents, and the histogram itself."""
    frequency = np.asarray(frequency, dtype=np.float64)
    n = int(frequency.size)
    alive = frequency[frequency > 0]
    lo = min(LOG_LO, float(np.floor(np.log10(1.0 / max(rows, 1)))))
    edges = np.arange(lo, 0.0 + 1e-9, 0.25)
    counts = np.histogram(np.clip(np.log10(alive), lo, 0.0), bins=edges)[0] if alive.size else np.zeros(len(edges) - 1)
    out = {
        "latents": n, "rows": int(rows),
        "dead": int(n - alive.size), "dead_fraction": (n - alive.size) / max(n, 1),
        "log10_frequency_edges": [round(float(e), 4) for e in edges],
        "log10_frequency_counts": [int(c) for c in counts],
        "median_log10_frequency_alive": float(np.median(np.log10(alive))) if alive.size else None,
    }
    for t in DENSE:
        dense = int((frequency > t).sum())
        out[f"dense_over_{int(t * 100)}pct"] = dense
        out[f"dense_over_{int(t * 100)}pct_fraction"] = dense / max(n, 1)
    return out


def _figure(series: Sequence[tuple[str, np.ndarray, dict]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, _, numbers in series:
        edges = np.asarray(numbers["log10_frequency_edges"])
        counts = np.asarray(numbers["log10_frequency_counts"])
        text = f"{label} (dead {numbers['dead']}, >1% {numbers['dense_over_1pct']}, >10% {numbers['dense_over_10pct']})"
        if len(series) == 1:
            ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4477aa", label=text)
        else:
            ax.stairs(counts, edges, label=text, linewidth=1.6)
    lo = min(float(np.asarray(n["log10_frequency_edges"])[0]) for _, _, n in series)
    for t, style in zip(DENSE, (":", "--")):
        ax.axvline(np.log10(t), color="#aa3377", linestyle=style, linewidth=1)
        ax.text(np.log10(t), ax.get_ylim()[1] * 0.95, f" {int(t * 100)}%", color="#aa3377", va="top", fontsize=8)
    dead = [n["dead"] for _, _, n in series]
    if any(dead):
        width = 0.5 / max(len(series), 1)
        for i, d in enumerate(dead):
            ax.bar(lo - 0.75 + i * width, d, width=width, align="edge", color="#bbbbbb", edgecolor="#666666")
        ax.text(lo - 0.5, ax.get_ylim()[1] * 0.95, "dead", ha="center", va="top", fontsize=8)
    ax.set_xlabel("log10 firing frequency (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig, plt


def write_density(out_dir: Path, series: Sequence[tuple[str, np.ndarray, dict]], title: str,
                  stem: str = "density") -> list[Path]:
    """``<stem>.png``, ``<stem>.svg`` and ``<stem>.json`` (numbers by label)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, _ = _figure(series, title)
    written = save_figure(fig, out_dir, stem, dpi=120)
    path = out_dir / f"{stem}.json"
    write_json_atomic(path, {label: numbers for label, _, numbers in series})
    return [*written, path]
