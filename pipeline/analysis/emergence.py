"""Feature emergence over training: matched decoder directions across snapshots, and a map of the final ones.

Snapshots (``pipeline.train.snapshots``, taken every ``snapshot_tokens``) are
loaded into the checkpoint's own module and combined by its spec into a
``Decomposition``, so any method works; a latent's direction is what one unit of
it writes (``features.logit_effects.decoder_directions``), unit-normalised.

**Matching.** Between consecutive states the alive latents (fired within the
snapshot interval, ``Trainable.dead_mask``) are matched one-to-one by greedy
maximum-cosine matching: repeatedly pair every row and column that are each
other's best remaining partner (the greedy matching, reached in a few vectorised
rounds; scipy's optimal assignment is not a dependency and a pure-Python Hungarian
on 2304 x 2304 is too slow on CPU). A pair counts as the same feature when its
cosine is at least ``threshold``. Alive latents of the later state left unmatched
are **born**, those of the earlier state **died**.

**Map.** The final decoder directions in 2-D (UMAP when ``umap-learn`` is
installed, else PCA), coloured by log10 firing frequency from the features file,
and k-means clusters (cosine, seeded) listed with the tokens their latents fire on.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.checkpoint import Checkpoint
from pipeline.core.errors import UserError
from pipeline.core.progress import progress_bar
from pipeline.features.logit_effects import decoder_directions
from pipeline.train.snapshots import list_snapshots, load_snapshot


def greedy_match(cos: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Rows and columns of a one-to-one matching of ``cos`` [n, m]: mutual best pairs, round after round, each
    pair at least ``threshold``. Equal to matching the pairs greedily in descending cosine (ties aside)."""
    cos = cos.clone().float()
    rows, cols = [], []
    while True:
        best_col = cos.argmax(1)
        best_row = cos.argmax(0)
        r = torch.arange(cos.shape[0])
        value = cos[r, best_col]
        mutual = (best_row[best_col] == r) & (value >= threshold) & torch.isfinite(value)
        if not mutual.any():
            break
        mr, mc = r[mutual], best_col[mutual]
        rows.append(mr)
        cols.append(mc)
        cos[mr, :] = -math.inf
        cos[:, mc] = -math.inf
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(rows), torch.cat(cols)


def unit_rows(d: Tensor) -> Tensor:
    return d / d.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def compare(a: Tensor, alive_a: Tensor, b: Tensor, alive_b: Tensor, threshold: float) -> dict:
    """Matched / born / died between direction sets ``a`` and ``b`` [n, d], alive masks [n]."""
    ia, ib = alive_a.nonzero().flatten(), alive_b.nonzero().flatten()
    cos = unit_rows(a[ia]) @ unit_rows(b[ib]).T
    r, c = greedy_match(cos, threshold)
    return {"alive_before": int(len(ia)), "alive_after": int(len(ib)), "matched": int(len(r)),
            "born": int(len(ib) - len(r)), "died": int(len(ia) - len(r)),
            "mean_matched_cosine": float(cos[r, c].mean()) if len(r) else None}


def _state(ckpt: Checkpoint, weights: dict | None, source: int, window: int, d_model: int) -> tuple[Tensor, Tensor]:
    """Decoder directions [n, d] of ``source`` and its alive mask, with ``weights`` loaded (None: the final ones)."""
    module = ckpt.spec.build(ckpt.config)
    module.load_state_dict(weights if weights is not None else ckpt.module.state_dict())
    module.eval()
    decomposition = ckpt.spec.combine([module])
    return decoder_directions(decomposition, source, d_model), ~module.dead_mask(window)


def trajectory(ckpt: Checkpoint, source: int, threshold: float, d_model: int, progress: bool = True) -> list[dict]:
    """One row per consecutive pair of states (snapshots, then the final checkpoint)."""
    snaps = list_snapshots(ckpt.path)
    if not snaps:
        raise UserError(f"{ckpt.path} has no training snapshots; train it with SNAPSHOT_TOKENS=<tokens> "
                        f"(nnd train --snapshot-tokens)")
    final_tokens = int(ckpt.config.get("metadata", {}).get("tokens", 0)) or snaps[-1][0] + 1
    states = [(t, f) for t, f in snaps] + [(final_tokens, None)]
    out = []
    bar = progress_bar(len(states), progress, desc="snapshots", unit="state")
    prev = None
    for i, (tokens, f) in enumerate(states):
        window = tokens - (states[i - 1][0] if i else 0)
        dirs, alive = _state(ckpt, load_snapshot(f) if f is not None else None, source, max(1, window), d_model)
        if prev is not None:
            out.append({"tokens_before": prev[0], "tokens": tokens, **compare(prev[1], prev[2], dirs, alive, threshold)})
        prev = (tokens, dirs, alive)
        bar.update(1)
    bar.close()
    return out


# ----- the map of the final directions ---------------------------------------------------------

def project_2d(directions: Tensor, seed: int) -> tuple[np.ndarray, str]:
    """2-D coordinates of unit directions: UMAP (cosine) when umap-learn is installed, else PCA."""
    x = unit_rows(directions.float())
    try:
        import umap  # optional
    except ImportError:
        centred = x - x.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        return (centred @ v[:2].T).numpy(), "PCA (umap-learn is not installed)"
    return umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(x.numpy()), "UMAP"


def kmeans(directions: Tensor, k: int, seed: int, iters: int = 50) -> Tensor:
    """Spherical k-means (cosine) of unit directions [n, d]; k-means++ seeding from ``seed``. Labels [n]."""
    x = unit_rows(directions.float())
    gen = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(len(x), (1,), generator=gen)].squeeze(0)]
    for _ in range(1, k):
        dist = (1 - torch.stack(centres) @ x.T).clamp(min=0).min(0).values
        centres.append(x[torch.multinomial(dist + 1e-12, 1, generator=gen)].squeeze(0))
    c = torch.stack(centres)
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        labels = (x @ c.T).argmax(1)
        new = torch.zeros_like(c).index_add_(0, labels, x)
        empty = new.norm(dim=-1) == 0
        new[empty] = c[empty]
        new = unit_rows(new)
        if torch.allclose(new, c):
            break
        c = new
    return labels


def cluster_tokens(labels: Tensor, top_tok: Tensor, center: int, frequency: Tensor, vocab: dict, top: int = 8) -> list[dict]:
    """Per cluster: size, mean log10 frequency, and the tokens its latents' top contexts fire on most."""
    out = []
    for c in range(int(labels.max()) + 1):
        members = (labels == c).nonzero().flatten()
        ids = top_tok[members][:, :, center].flatten().tolist()
        counts = Counter(i for i in ids if i >= 0)
        f = frequency[members]
        alive = f[f > 0]
        out.append({"cluster": c, "latents": int(len(members)),
                    "mean_log10_frequency": float(alive.log10().mean()) if len(alive) else None,
                    "top_tokens": [[vocab.get(str(t), str(t)), n] for t, n in counts.most_common(top)],
                    "example_latents": members[:8].tolist()})
    return out
