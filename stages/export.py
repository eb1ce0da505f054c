"""`nnd export`: a CLT checkpoint to circuit-tracer's per-layer format."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import stage


@stage
def export(
    ckpt: Path = typer.Option(..., help="a CLT checkpoint directory (data/train/.../clt/clt-...)"),
    out: Path = typer.Option(..., help="output folder (written atomically)"),
    overwrite: bool = typer.Option(False, help="replace an existing export at OUT"),
):
    """Export a cross-layer transcoder for circuit-tracer (format: pipeline/export.py)."""
    from pipeline.export.circuit_tracer import export_circuit_tracer

    print(f"export: {export_circuit_tracer(ckpt, out, overwrite=overwrite)}")
