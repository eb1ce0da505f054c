"""The feature dashboard and the run report, opened from disk in a real headless Chromium.

Chromium is Debian's package, installed by `make browser` (a prerequisite of
`make test`); these tests skip, saying why, only where it is not installed.
Pages are read with ``--dump-dom`` after the page's scripts ran
(``--virtual-time-budget`` lets the on-demand card scripts load) and drawn
with ``--screenshot``.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.features.dashboard import _r, build_dashboard
from pipeline.features.examples import read_features
from test_features import CFG, model, root, tc_ckpt, tc_features  # noqa: F401  (fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: `make browser` installs Debian's (needs root)")


def chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-dev-shm-usage",
                           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def dom(tmp_path: Path, page: Path, fragment: str = "") -> str:
    return chromium(tmp_path, "--dump-dom", page.resolve().as_uri() + (f"#{fragment}" if fragment else ""))


def screenshot(tmp_path: Path, page: Path, fragment: str, out: Path) -> Path:
    chromium(tmp_path, f"--screenshot={out}", "--window-size=1400,1000",
             page.resolve().as_uri() + (f"#{fragment}" if fragment else ""))
    assert out.stat().st_size > 10_000  # a drawn page, not a blank one
    return out


def rows(page_dom: str) -> list[str]:
    return re.findall(r'<tr class="latent[^"]*" data-latent="([^"]+)"', page_dom)


@pytest.fixture(scope="module")
def board(tc_features, tmp_path_factory) -> Path:
    return build_dashboard(tc_features, tc_features.parent / "dashboard")


def test_the_dashboard_index_pages_sorts_and_searches(board, tc_features, tmp_path):
    t, meta = read_features(tc_features)
    first = dom(tmp_path, board)
    assert '<span id="count">96 latents</span>' in first and "page 1 of 2" in first
    assert len(rows(first)) == 50
    assert rows(first)[0] == f"1/{first_of(t['L1.frequency'])}"  # default: densest first
    everything = dom(tmp_path, board, "per=1000&sort=max")
    assert len(rows(everything)) == 96
    assert rows(everything)[0] == f"1/{first_of(t['L1.max_act'])}"

    latent = int(t["L1.frequency"].argmax())  # one that fired
    token = meta["tokens"][str(int(t["L1.top_ctx_tok"][latent, 0, CFG.left]))]
    searched = dom(tmp_path, board, "per=1000&q=" + _fragment(token))
    found = rows(searched)
    assert f"1/{latent}" in found and 0 < len(found) <= 96
    assert f'<span id="count">{len(found)} latents</span>' in searched


def first_of(values) -> int:
    """The latent the index lists first, sorting descending by the 3-digit values it ships (ties: lowest index)."""
    shown = [_r(v) for v in values]
    return shown.index(max(shown))


def _fragment(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def test_a_card_loads_on_demand_with_its_top_context_highlighted(board, tc_features, tmp_path):
    t, meta = read_features(tc_features)
    latent = int(t["L1.frequency"].argmax())
    page = dom(tmp_path, board, f"card={latent}")
    assert f"<h2>latent {latent}</h2>" in page
    top = page.split('id="top-contexts"', 1)[1]
    hot = re.search(r'<span class="tok hot"[^>]*>(.*?)</span>', top, re.S).group(1)
    want = meta["tokens"][str(int(t["L1.top_ctx_tok"][latent, 0, CFG.left]))].replace("\n", "⏎")
    assert html.unescape(hot) == want
    first_act = re.search(r'<span class="act">([^<]*)</span>', top).group(1)
    assert float(first_act) == pytest.approx(float(t["L1.top_act"][latent, 0]), rel=6e-3)
    assert 'id="quantile-contexts"' in page and "promotes" in page and "<svg" in page
    screenshot(tmp_path, board, f"card={latent}", tmp_path / "dashboard.png")


def test_the_run_report_page_shows_tables_plots_curves_density_and_dashboards(root, model, tc_ckpt, board, tmp_path):
    from pipeline.eval.config import EvalConfig
    from pipeline.eval.methods import load_checkpoints
    from pipeline.eval.report import build_report
    from pipeline.eval.run import evaluate_and_write
    from pipeline.features.extract import target_for
    from pipeline.features.report_html import build_html

    shutil.copyfile(target_for(tc_ckpt, root).out_dir / "density.png", tc_ckpt / "curves.png")  # stands in for training's
    cfg = EvalConfig(lm="tiny-llama", data="bbc", ctx=32, eval_tokens=62, data_dir=root)
    evaluate_and_write(model, cfg, load_checkpoints(model, [tc_ckpt]))
    report_dir = cfg.out_dir / "report"
    build_report(cfg.out_dir, report_dir)
    page_path = build_html(cfg.out_dir, report_dir, lambda c: target_for(c, root).out_dir)
    page = dom(tmp_path, page_path)
    assert page.index("Main table") < page.index("Per layer") < page.index("Pareto plots") \
        < page.index("Training curves") < page.index("Firing-frequency density") < page.index("Feature dashboards")
    assert len(re.findall(r'<table class="main ', page)) == 2 and len(re.findall(r'<table class="per-layer ', page)) == 2
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert (report_dir / html.unescape(src)).stat().st_size > 1000, src
    assert {"pareto_all_layers.png", "pareto_single_layer.png"} <= set(re.findall(r'<img src="([^"]+)"', page))
    assert any(s.startswith("curves/") for s in re.findall(r'<img src="([^"]+)"', page))
    assert any(s.startswith("density/") for s in re.findall(r'<img src="([^"]+)"', page))
    (href,) = re.findall(r'<ul id="dashboards"><li><a href="([^"]+)"', page)
    assert (report_dir / html.unescape(href)).resolve() == board.resolve()
    screenshot(tmp_path, page_path, "", tmp_path / "report.png")
