"""Inference thresholds set after training, on training rows, so that the mean L0 is k."""

from __future__ import annotations

import torch
from torch import Tensor

# In the first pass a row keeps this many x k of its largest scores (as BatchTopK's candidates).
CANDIDATES_PER_K = 4


class L0Calibrator:
    """The threshold t with mean over rows of #{scores > t} = k, in two passes over the same rows, exactly.

    An entry is active at inference iff its score exceeds t, so t is the
    (k * rows + 1)-th largest score overall. Pass 1 keeps each row's top
    ``CANDIDATES_PER_K`` x k scores (O(rows x k) memory) and takes the
    threshold t1 of those candidates. A row with more entries above the true t
    than candidates (SmolLM2 layer 2: rows right after BOS reach L0 ~60 at
    k = 8) loses entries there, so t1 can only be too low: t1 <= t. Pass 2
    keeps every score above t1, which holds every entry above t, and the true
    threshold is the (k * rows + 1)-th largest of them. Taking t1 as the
    answer (one pass) left vanilla k=8 on SmolLM2 layer 2 at L0 11.9 instead
    of 8 on training rows.
    """

    def __init__(self, k: int):
        self.k, self.rows, self.exact = k, 0, False
        self.parts: list[Tensor] = []
        self.floor: float | None = None  # t1, once pass 1 is over

    @torch.no_grad()
    def add(self, scores: Tensor) -> None:
        scores = scores.float()
        if self.floor is None:
            n_cand = min(scores.shape[1], CANDIDATES_PER_K * self.k + 1)
            self.parts.append(scores.topk(n_cand, dim=-1, sorted=False).values.reshape(-1))
            self.rows += scores.shape[0]
        else:
            self.parts.append(scores[scores > self.floor])
            self.rows_second += scores.shape[0]

    def _kth(self) -> float:
        values = torch.cat(self.parts)
        n = self.k * self.rows + 1
        if values.numel() < n:  # pass 2 with ties at t1: nothing lower than t1 keeps L0 <= k
            return self.floor
        return float(values.topk(n, sorted=False).values.min())

    def next_pass(self) -> None:
        """End pass 1; feed the same rows again, then call ``threshold``."""
        self.floor = self._kth()
        self.parts, self.rows_second = [], 0

    def threshold(self) -> float:
        if self.floor is None:
            raise RuntimeError("L0Calibrator.threshold needs two passes over the rows (call next_pass between them)")
        if self.rows_second != self.rows:
            raise RuntimeError(f"pass 2 saw {self.rows_second} rows, pass 1 {self.rows}: feed the same rows twice")
        t = self._kth()
        self.exact = True
        return t
