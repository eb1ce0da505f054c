"""`nnd verify`: check a harvest store chunk by chunk (size, checksum, finiteness, manifest)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from pipeline.core import paths
from pipeline.data.integrity import repair_command
from stages.common import stage


@stage
def verify(
    lm: str = typer.Option("smollm2-135m", help="model the store was harvested from"),
    data: str = typer.Option("bbc", help="corpus of the store"),
    ctx: int = typer.Option(128, help="context length of the store"),
    split: str = typer.Option("train", help="train or eval"),
    data_dir: Path = typer.Option(Path("data"), help="root of all stage outputs"),
    store: str = typer.Option(None, help="store location (path or fsspec URL) instead of the default under DATA_DIR"),
):
    """Verify every chunk of a harvest store; exit 1 and name each damaged one (repair: nnd harvest --repair)."""
    from pipeline.data.verify import verify as run_verify

    location = store or str(paths.store(data_dir, lm, data, split, ctx))
    report = run_verify(location)
    for p in report.problems:
        print(f"damaged: {p.line()}")
    pending = f", {report.chunks_pending} not harvested yet" if report.chunks_pending else ""
    if report.ok:
        print(f"verify: {location} is intact ({report.chunks_checked} layer-chunks checked{pending})")
        return
    print(f"error: {location} has {len(report.problems)} problem{'s' if len(report.problems) > 1 else ''}; "
          f"repair with `{repair_command(location)}`", file=sys.stderr)
    raise typer.Exit(1)
