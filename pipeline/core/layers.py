"""Layer lists: one parser for what users type, one label for names and paths."""

from __future__ import annotations

import re
from typing import Iterable

from pipeline.core.errors import UserError

MAX_LAYER = 1023  # no model we know of is deeper; larger numbers are typos


def parse_layers(text: str) -> list[int]:
    """'0-3' -> [0, 1, 2, 3]; '0,2,5-6' -> [0, 2, 5, 6]."""
    layers: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise UserError(f"LAYERS='{text}' is malformed; write a range or list such as 0-3 or 0,2,5-7")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi > MAX_LAYER:
            raise UserError(f"LAYERS='{text}' names layer {hi}; layers are numbered from 0 to the model's depth - 1")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def layers_label(layers: Iterable[int]) -> str:
    """(0, 1, 2, 3) -> '0-3'; (0, 2, 5) -> '0_2_5'; (2,) -> '2'.

    The one label of a layer set in names, paths and Make words (no commas
    or spaces, so it is safe in all three)."""
    layers = sorted(int(layer) for layer in layers)
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return "_".join(map(str, layers))
