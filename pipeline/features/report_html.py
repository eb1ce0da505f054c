"""The one HTML page of a run: ``<report dir>/index.html``, next to the tables and plots it shows.

In this order: the main comparison table of each mode, the per-layer tables,
the Pareto figures (ΔCE with ± 1 s.e. bars), each dictionary's training
curves, the density histograms of the checkpoints that have a features
file, and links to their dashboards. Images are copied next to the page
(``curves/``, ``density/``), so the report folder is self-contained apart
from the dashboard links, which point at the dashboards where they are.
Every text goes through ``html.escape``.
"""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

from pipeline.core.io import write_text_atomic
from pipeline.eval.report import (LAYER_COLUMNS, MAIN_COLUMNS, MODE_TITLES, MODES, display_name, layer_rows,
                                  load_metrics, main_rows)

CURVES = "curves.png"  # what pipeline.train.jobs writes next to each checkpoint

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1400px; padding: 0 16px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 20px; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; } .grid figure { margin: 0; width: 440px; }
figcaption { font-size: 12px; color: #555; } .muted { color: #777; }
"""


def _table(columns: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _checkpoints(metrics: list[dict]) -> list[tuple[str, Path]]:
    """(method name, checkpoint folder) of every evaluated dictionary, in table order."""
    seen, out = set(), []
    for m in metrics:
        for c in m.get("checkpoints") or []:
            if c not in seen:
                seen.add(c)
                out.append((display_name(m), Path(c)))
    return out


def build_html(eval_dir: Path, out_dir: Path, features_dir_of=None) -> Path:
    """Write ``out_dir/index.html`` from the metrics under ``eval_dir`` and what ``out_dir`` holds.

    ``features_dir_of(checkpoint) -> Path | None``: where a checkpoint's features (density,
    dashboard) are, if anywhere."""
    metrics = load_metrics(eval_dir)
    out_dir = Path(out_dir)
    m0 = metrics[0]
    parts = [f"<h1>{html.escape(m0['lm'])} on {html.escape(str(m0['data']))}: comparison</h1>",
             f'<p class="muted">ctx {m0["ctx"]}, {m0["eval_rows"]:,} eval tokens, clean CE '
             f'{m0.get("clean_ce", float("nan")):.4f} nats / token; tables also in table.md and the CSVs.</p>']
    for mode in MODES:
        rows = main_rows(metrics, mode)
        if rows:
            parts.append(f"<h2>Main table: {html.escape(MODE_TITLES[mode])}</h2>")
            parts.append(_table(MAIN_COLUMNS, rows, f"main {mode}"))
    for mode in MODES:
        rows = layer_rows(metrics, mode)
        if rows:
            parts.append(f"<h2>Per layer: {html.escape(MODE_TITLES[mode])}</h2>")
            parts.append(_table(LAYER_COLUMNS, rows, f"per-layer {mode}"))
    plots = [(f"pareto_{mode}.png", f"Pareto frontiers, {MODE_TITLES[mode]} (ΔCE ± 1 s.e.)")
             for mode in MODES if (out_dir / f"pareto_{mode}.png").exists()]
    if plots:
        parts.append("<h2>Pareto plots</h2>" + "".join(_figure(src, cap) for src, cap in plots))
    curves, densities, links = [], [], []
    for name, ckpt in _checkpoints(metrics):
        label = f"{name}: {ckpt.name}"
        if (ckpt / CURVES).exists():
            dest = out_dir / "curves" / f"{ckpt.parent.name}--{ckpt.name}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt / CURVES, dest)
            curves.append(_figure(f"curves/{dest.name}", label))
        feats = features_dir_of(ckpt) if features_dir_of else None
        if feats is not None and (feats / "density.png").exists():
            dest = out_dir / "density" / f"{ckpt.parent.name}--{ckpt.name}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(feats / "density.png", dest)
            densities.append(_figure(f"density/{dest.name}", label))
        if feats is not None and (feats / "dashboard" / "index.html").exists():
            href = os.path.relpath(feats / "dashboard" / "index.html", out_dir)
            links.append(f'<li><a href="{html.escape(href)}">{html.escape(label)}</a></li>')
    parts.append("<h2>Training curves</h2>" + (f'<div class="grid">{"".join(curves)}</div>' if curves
                                               else '<p class="muted">no training curves found</p>'))
    parts.append("<h2>Firing-frequency density</h2>" + (
        f'<div class="grid">{"".join(densities)}</div>' if densities
        else '<p class="muted">none yet: <code>make features CKPT=…</code> writes them</p>'))
    parts.append("<h2>Feature dashboards</h2>" + (
        f'<ul id="dashboards">{"".join(links)}</ul>' if links
        else '<p class="muted">none yet: <code>make dashboard CKPT=…</code> writes them</p>'))
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>report: {html.escape(m0["lm"])}'
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    path = out_dir / "index.html"
    write_text_atomic(path, page)
    return path
