"""RkCNN decoder initialisation (``INIT=rkcnn``): decoder rows from random subspace probes.

The idea (one of the seed projects): a sparse feature is hard to see in the
full activation space, where many features overlap, but a random handful of
``m`` coordinates sees few of them at once, and there a feature's direction
stands out as a heavy-tailed principal direction. So:

1. draw ``n_probes`` random subsets of ``m`` coordinates of the (normalised,
   centred) target rows;
2. per subset, take the principal direction of the rows restricted to it and
   score it: ``kurtosis`` of the rows' projections on it (sparse, heavy-tailed
   features score high) or ``variance_ratio`` (its share of the subset's
   variance);
3. the best-scoring subsets' directions, embedded back into the full space
   (zero off the subset) and signed so that their heavy tail is positive (a
   latent fires positively), initialise a fraction ``rkcnn_fraction`` of the
   decoder rows; the others stay random unit rows.

The coder then ties the encoder rows of those latents: an SAE's encoder row is
the decoder row; a transcoder's reads the input direction that linearly
predicts it (``coder.linear_tied_encoder``), so for a transcoder the target is
what is probed. The k-NN separation score of the proposal is not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Probes drawn per initialised latent: the best 1 in PROBES_PER_ROW is kept.
PROBES_PER_ROW = 4
# Probes scored at once (memory: rows x PROBE_BLOCK x m floats).
PROBE_BLOCK = 1024


@torch.no_grad()
def rkcnn_directions(y: Tensor, n: int, m: int, score: str, gen: torch.Generator) -> Tensor:
    """``n`` unit directions [n, d] from random ``m``-coordinate probes of the rows ``y`` [rows, d]."""
    y = y.float()
    y = y - y.mean(0)
    d = y.shape[1]
    m = min(m, d)
    n_probes = PROBES_PER_ROW * n
    subsets = torch.rand(n_probes, d, generator=gen).argsort(dim=1)[:, :m]  # [probes, m]
    scores, dirs = [], []
    for start in range(0, n_probes, PROBE_BLOCK):
        block = subsets[start:start + PROBE_BLOCK]
        s, w = _score_block(y, block.to(y.device), score)
        scores.append(s)
        dirs.append(w)
    scores_t, dirs_t = torch.cat(scores), torch.cat(dirs)
    best = scores_t.nan_to_num(float("-inf")).topk(n).indices
    out = torch.zeros(n, d, device=y.device)
    out.scatter_(1, subsets[best].to(y.device), dirs_t[best])
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _score_block(y: Tensor, block: Tensor, score: str) -> tuple[Tensor, Tensor]:
    """Scores [probes] and signed principal directions [probes, m] of one block of probes."""
    z = y[:, block]  # [rows, probes, m]
    cov = torch.einsum("rpi,rpj->pij", z, z) / len(y)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    w = evecs[..., -1]  # [probes, m]
    proj = torch.einsum("rpi,pi->rp", z, w)  # [rows, probes]
    var = proj.pow(2).mean(0).clamp_min(1e-12)
    skew = proj.pow(3).mean(0) / var.pow(1.5)
    w = w * torch.where(skew < 0, -1.0, 1.0)[:, None]  # heavy tail on the positive side
    if score == "kurtosis":
        return proj.pow(4).mean(0) / var.pow(2), w
    return evals[:, -1] / evals.sum(-1).clamp_min(1e-12), w
