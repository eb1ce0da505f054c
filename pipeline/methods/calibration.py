"""Inference thresholds set after training, on training rows, so that the mean L0 is k."""

from __future__ import annotations

import torch
from torch import Tensor

# A row keeps this many x k of its largest scores (as BatchTopK's candidates).
CANDIDATES_PER_K = 4


class L0Calibrator:
    """The threshold t with mean over rows of #{scores > t} = k, over many batches, exactly.

    An entry is active at inference iff its score exceeds t, so t is the
    (k * rows + 1)-th largest score overall. A row can hold more than
    ``CANDIDATES_PER_K`` x k of those only in rare cases (``exact`` says
    whether it happened), so each batch keeps only its rows' top candidates:
    O(rows x k) memory.
    """

    def __init__(self, k: int):
        self.k, self.rows, self.exact = k, 0, True
        self.parts: list[Tensor] = []
        self.row_min: list[Tensor] = []

    @torch.no_grad()
    def add(self, scores: Tensor) -> None:
        n_cand = min(scores.shape[1], CANDIDATES_PER_K * self.k + 1)
        top = scores.float().topk(n_cand, dim=-1, sorted=False).values
        self.parts.append(top.reshape(-1))
        self.row_min.append(top.min(dim=1).values)
        self.rows += scores.shape[0]

    def threshold(self) -> float:
        values = torch.cat(self.parts)
        t = values.topk(min(values.numel(), self.k * self.rows + 1), sorted=False).values.min()
        self.exact = bool((torch.cat(self.row_min) <= t).all())
        return float(t)
