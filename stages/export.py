"""`nnd export`: a checkpoint to another tool's format (formats: ``pipeline.export.EXPORTERS``)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.core.errors import UserError
from stages.common import stage


@stage
def export(
    ckpt: Path = typer.Option(..., help="a checkpoint directory (e.g. data/train/.../clt/clt-...)"),
    out: Path = typer.Option(..., help="output folder (written atomically)"),
    format: str = typer.Option("circuit-tracer", help="output format: circuit-tracer"),
    overwrite: bool = typer.Option(False, help="replace an existing export at OUT"),
):
    """Export a checkpoint in another tool's format."""
    from pipeline import checkpoint
    from pipeline.export import EXPORTERS

    if format not in EXPORTERS:
        raise UserError(f"unknown FORMAT '{format}'; choose one of {', '.join(EXPORTERS)}")
    loaded = checkpoint.load(ckpt)
    if format not in loaded.spec.exports:
        raise UserError(f"a {loaded.spec.name} checkpoint has no {format} export"
                        + (f"; it exports to {', '.join(loaded.spec.exports)}" if loaded.spec.exports else ""))
    print(f"export: {EXPORTERS[format](loaded, out, overwrite=overwrite)}")
