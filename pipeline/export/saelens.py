"""One per-layer transcoder, SAE or skip transcoder checkpoint to SAELens 6.x's folder format.

The format and what it computes: ``pipeline.methods.saelens`` (one definition,
also used to read such folders back for evaluation). Load the result with
``sae_lens.SAE.load_from_disk(folder)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from safetensors.torch import save_file

from pipeline import checkpoint
from pipeline.core.errors import UserError
from pipeline.core.io import folder_atomic
from pipeline.export.options import ExportOptions
from pipeline.methods import saelens
from pipeline.methods.transcoder import Transcoder


def export_saelens(checkpoints: Sequence[checkpoint.Checkpoint], out: str | Path,
                   options: ExportOptions = ExportOptions()) -> Path:
    """Write the one checkpoint in ``checkpoints`` at ``out`` (atomic: a temporary folder, then rename)."""
    out = Path(out)
    if len(checkpoints) != 1:
        raise UserError(f"an SAELens folder holds one dictionary; got {len(checkpoints)} checkpoints "
                        f"(export each layer to its own OUT)")
    loaded = checkpoints[0]
    if not isinstance(loaded.module, Transcoder):
        raise UserError(f"{loaded.path}: only per-layer transcoders, SAEs and skip transcoders export to SAELens")
    if out.exists() and not options.overwrite:
        raise UserError(f"{out} exists; remove it or export elsewhere")
    cfg, tensors = saelens.to_saelens(loaded.module, loaded.metadata)
    with folder_atomic(out) as tmp:
        save_file(tensors, tmp / saelens.WEIGHTS)
        (tmp / saelens.CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out
