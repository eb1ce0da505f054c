"""One progress bar for every stage (tqdm on stderr, off when not wanted)."""

from __future__ import annotations

import sys


def progress_bar(total: int, enabled: bool, desc: str = "", unit: str = "tok", initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, unit_scale=unit == "tok", desc=desc or None,
                disable=not enabled or total == 0, dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
