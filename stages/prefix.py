"""`nnd prefix`: cut a Matryoshka checkpoint to its first WIDTH latents, a narrower dictionary
that `nnd evaluate` (and the report) then treat like any other checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.core.errors import UserError
from pipeline.core.io import check_writable
from stages.common import parse_ints, stage


@stage
def prefix(
    ckpt: list[Path] = typer.Option(..., help="Matryoshka checkpoint directories (MODEL=matryoshka*), repeatable"),
    width: str = typer.Option(..., help="prefix widths in latents (per source layer for a CLT), comma list"),
):
    """Write <ckpt>-w<width> next to each checkpoint: its first WIDTH latents, same thresholds."""
    from pipeline import checkpoint
    from pipeline.methods.matryoshka import Nested

    widths = parse_ints(width, "WIDTH")
    for path in ckpt:
        loaded = checkpoint.load(path)
        if not isinstance(loaded.module, Nested):
            raise UserError(f"{path} is a {loaded.spec.name} checkpoint; only Matryoshka dictionaries have prefixes "
                            f"(MODEL=matryoshka, matryoshka-topk, matryoshka-clt)")
        for m in widths:
            cut = loaded.module.prefix(m)
            out = path.with_name(f"{path.name}-w{m}")
            check_writable(out.parent, 2 * sum(t.numel() * 4 for t in cut.state_dict().values()), what=str(out))
            meta = {**loaded.metadata, "prefix_of": str(path), "prefix_width": m}
            if "dead_window_tokens" in meta:  # the prefix's own dead latents, over the same window
                meta["dead_fraction"] = float((cut.tokens_since_fired >= meta["dead_window_tokens"]).float().mean())
            checkpoint.save(cut, out, meta)
            print(f"prefix: {out} ({m} of {loaded.module.cfg.n_latents} latents)")
