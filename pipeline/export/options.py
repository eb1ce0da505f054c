"""What every exporter takes besides its checkpoints and output folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core import defaults


@dataclass(frozen=True)
class ExportOptions:
    overwrite: bool = False  # replace an existing export at the output folder
    data_dir: Path = Path(defaults.DATA_DIR)  # where the model folder is (circuit-tracer pads to its depth)
