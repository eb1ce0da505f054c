"""Losses and reconstruction metrics shared by every coder.

- ``capped_mse``: mean squared error per element, a massive row's error capped
  at what a row at the massive threshold with the same relative error would
  contribute (SmolLM2: ~3% of MLP-output rows carry >90% of the variance, and
  would otherwise drown out the other 97%);
- ``auxk_loss``: the one AuxK (Gao et al. 2024) for dictionaries and CLT sources;
- ``fvu_metrics``: FVU on all rows and on rows below the massive threshold;
- ``geometric_median``: Weiszfeld's algorithm, for the decoder bias at init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import pipeline.methods.kernels as kernels
import pipeline.methods.collective as collective
from pipeline.methods.kernels import TRAIN_MATMUL_DTYPE

# A row is "massive" when its target norm exceeds this multiple of the median norm.
MASSIVE_FACTOR = 5.0


def cap_weights(y: Tensor, cap: Tensor | None) -> Tensor | None:
    """Per-row loss weights min(1, (cap / ||y||)^2); None when nothing is capped."""
    if cap is None or not torch.isfinite(cap):
        return None
    return (cap / y.norm(dim=-1).clamp_min(1e-12)).clamp(max=1).pow(2)


def capped_mse(err: Tensor, y: Tensor, cap: Tensor | None) -> Tensor:
    """Mean squared error per element; rows with ||y|| > cap weighted by (cap / ||y||)^2."""
    weight = cap_weights(y, cap)
    if weight is None:
        return err.pow(2).mean()
    return (err.pow(2).sum(-1) * weight).sum() / err.numel()


def auxk_loss(preacts: Tensor, dead: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
              residual: Tensor, k_aux: int, coef: float, dtype: torch.dtype = TRAIN_MATMUL_DTYPE,
              weight: Tensor | None = None) -> Tensor:
    """AuxK (Gao et al. 2024): the top ``k_aux`` dead latents per row learn to
    explain ``residual``; normalised by its energy.

    ``preacts`` are the no-grad pre-activations of the main path; ``W_dec`` is
    [n_latents, width of residual] (for a CLT source, the flattened triangular
    row). Same loss and selection either way; the dense block over the dead
    columns (``DeadLatentsDecode``, matmuls in ``dtype``) when the selection
    fills at least kernels.AUXK_DENSE_MIN_DENSITY of it, CSR products (fp32) otherwise.
    ``weight`` (broadcast to ``residual``: the main loss's massive-row cap
    weights, ``cap_weights``) keeps a few massive rows from owning the dead latents: unweighted, their
    residuals are most of the energy, the dead latents learn them and stay
    dead on every other row.
    (AuxK on a quarter of the rows was tried: 17.8% dead vs 14.2% after 200
    steps on SmolLM2 layer 3; so every row takes part.)
    """
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() == 0 or coef == 0:
        return torch.zeros((), device=x.device)
    dead_pre = preacts.index_select(1, dead_idx)
    k_aux = min(k_aux, dead_idx.numel())
    values, local = dead_pre.topk(k_aux, dim=-1, sorted=False)
    if k_aux >= kernels.AUXK_DENSE_MIN_DENSITY * dead_idx.numel():
        acts = torch.zeros(dead_pre.shape, dtype=W_enc.dtype, device=dead_pre.device)
        acts.scatter_(1, local, values.to(W_enc.dtype).relu_())
        recon = kernels.DeadLatentsDecode.apply(acts, x, W_enc, b_enc, W_dec, dead_idx, dtype)
    else:
        pattern = kernels.SparsePattern.from_topk(dead_idx[local], W_dec.shape[0])
        values = kernels.SelectedPreacts.apply(values.reshape(-1).to(W_enc.dtype), x, W_enc, b_enc, pattern)
        recon = kernels.SparseDecode.apply(F.relu(values), W_dec, pattern)
    miss, energy = (recon - residual).pow(2), residual.pow(2)
    if weight is not None:
        miss, energy = miss * weight, energy * weight
    # a distributed run normalises by the energy of the global batch (the mean over ranks of each
    # rank's sum: DDP's gradient average then gives exactly the one-process loss)
    return coef * miss.sum() / collective.mean_over_ranks(energy.sum().detach()).clamp_min(1e-12)


def fvu(err: Tensor, y: Tensor) -> Tensor:
    """Fraction of variance unexplained over the rows (of every rank of a distributed run)."""
    if collective.world_size() == 1:
        return err.pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
    n = collective.sum_over_ranks(torch.tensor(float(y.shape[0]), device=y.device))
    mean = collective.sum_over_ranks(y.sum(0)) / n.clamp_min(1)
    return collective.sum_over_ranks(err.pow(2).sum()) / \
        collective.sum_over_ranks((y - mean).pow(2).sum()).clamp_min(1e-12)


@torch.no_grad()
def fvu_metrics(err: Tensor, y: Tensor, massive_norm: Tensor) -> dict[str, Tensor]:
    """FVU on all rows and on the rows whose target norm is below ``massive_norm``."""
    out = {"fvu": fvu(err, y)}
    normal = y.norm(dim=-1) <= massive_norm
    any_normal = collective.any_rank(normal.any().view(1))[0]
    out["fvu_normal"] = fvu(err[normal], y[normal]) if any_normal else torch.tensor(float("nan"))
    out["massive_frac"] = 1 - collective.mean_over_ranks(normal.float().mean())
    return out


@torch.no_grad()
def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    median = points.median(dim=0).values
    for _ in range(iters):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * median.norm().clamp_min(1e-8):
            return new
        median = new
    return median
