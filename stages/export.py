"""`nnd export`: checkpoints to another tool's format (formats: ``pipeline.export.EXPORTERS``)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from pipeline.core import defaults
from pipeline.core.errors import UserError
from stages.common import stage


@stage
def export(
    ckpt: List[Path] = typer.Option(..., help="checkpoint directory, folder of checkpoints, or quoted glob (repeatable): "
                                              "a CLT, one SAE/transcoder (saelens), or per-layer transcoders of one "
                                              "configuration (circuit-tracer transcoder set)"),
    out: Path = typer.Option(..., help="output folder (written atomically)"),
    format: str = typer.Option("circuit-tracer", help="output format: circuit-tracer or saelens"),
    overwrite: bool = typer.Option(False, help="replace an existing export at OUT"),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs (circuit-tracer: the model folder)"),
):
    """Export checkpoints in another tool's format."""
    from pipeline import checkpoint
    from pipeline.eval.methods import checkpoint_dirs
    from pipeline.export import EXPORTERS, ExportOptions

    if format not in EXPORTERS:
        raise UserError(f"unknown FORMAT '{format}'; choose one of {', '.join(EXPORTERS)}")
    loaded = [checkpoint.load(d) for d in checkpoint_dirs(ckpt)]
    for c in loaded:
        if format not in c.spec.exports:
            raise UserError(f"a {c.spec.name} checkpoint has no {format} export"
                            + (f"; it exports to {', '.join(c.spec.exports)}" if c.spec.exports else ""))
    path = EXPORTERS[format](loaded, out, ExportOptions(overwrite=overwrite, data_dir=data_dir))
    print(f"export: {path}")
