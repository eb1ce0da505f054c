"""Streaming statistics of one splice job: predictions (CE, ΔCE, KL) and each replaced layer
(MSE, FVU, FVU without massive rows, L0, alive/dead/dense latents), in float64 sums."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.eval.splice import logits

class LayerStats:
    """Streaming reconstruction and sparsity statistics of one replaced layer (float64 sums)."""

    def __init__(self, massive_norm: float):
        self.massive_norm = massive_norm
        self.rows = 0
        self.sse = 0.0
        self.sum_y = 0.0
        self.sum_sq = 0.0
        self.normal = {"rows": 0, "sse": 0.0, "sum_y": 0.0, "sum_sq": 0.0}
        self.active = 0
        self.act_sum = 0.0
        self.fires: Tensor | None = None

    def add(self, target: Tensor, recon: Tensor, acts: Tensor | None) -> None:
        y = target.double()
        sq_err = (recon.double() - y).pow(2).sum(-1)
        self.rows += y.shape[0]
        self.sse += float(sq_err.sum())
        self.sum_y = self.sum_y + y.sum(0)
        self.sum_sq += float(y.pow(2).sum())
        normal = y.norm(dim=-1) <= self.massive_norm
        yn = y[normal]
        self.normal["rows"] += int(normal.sum())
        self.normal["sse"] += float(sq_err[normal].sum())
        self.normal["sum_y"] = self.normal["sum_y"] + yn.sum(0)
        self.normal["sum_sq"] += float(yn.pow(2).sum())
        if acts is not None:
            counts = (acts != 0).sum(0)
            self.fires = counts if self.fires is None else self.fires + counts
            self.active += int(counts.sum())
            self.act_sum += float(acts.abs().sum())  # inactive latents add 0; neuron activations are signed

    @staticmethod
    def _fvu(rows: int, sse: float, sum_y, sum_sq: float) -> float | None:
        if rows == 0:
            return None
        variance = sum_sq - float((sum_y * sum_y).sum()) / rows
        return sse / variance if variance > 0 else None

    def result(self) -> dict:
        out = {
            "rows": self.rows,
            "mse": self.sse / self.rows,
            "fvu": self._fvu(self.rows, self.sse, self.sum_y, self.sum_sq),
            "fvu_normal": self._fvu(self.normal["rows"], self.normal["sse"], self.normal["sum_y"], self.normal["sum_sq"]),
            "massive_frac": 1 - self.normal["rows"] / self.rows,
        }
        if self.fires is not None:
            n_latents = self.fires.numel()
            freq = self.fires.double() / self.rows
            alive = int((self.fires > 0).sum())
            out |= {
                "latents": n_latents,
                "l0": self.active / self.rows,
                "alive": alive,
                "dead_pct": 100.0 * (1 - alive / n_latents),
                "dense_1pct": int((freq > 0.01).sum()),
                "dense_10pct": int((freq > 0.10).sum()),
                "mean_act": self.act_sum / self.active if self.active else None,
            }
        return out


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of two [rows, n] tensors, without an [rows, n] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


@dataclass
class CleanBatch:
    """What every job of a batch compares against, computed once per batch.

    KL(p || q) = sum p log p - sum p log q: the first term (``neg_entropy``)
    is shared; both are the same row-wise dot product, so a splice that
    changes nothing gives exactly 0.
    """

    targets: Tensor  # [predictions] next-token ids
    ce: Tensor  # [predictions] clean CE
    p: Tensor  # [predictions, vocab] clean probabilities
    neg_entropy: Tensor  # [predictions] sum p log p

    @classmethod
    def from_hidden(cls, lm, hidden: Tensor, targets: Tensor, ce: Tensor) -> "CleanBatch":
        logp = F.log_softmax(logits(lm, hidden.reshape(-1, hidden.shape[-1])), dim=-1)
        p = logp.exp()
        return cls(targets, ce, p, rowdot(p, logp))


class JobStats:
    """Everything one job measures: predictions and its replaced layers."""

    def __init__(self, massive_norm: dict[int, float]):
        self.massive_norm = massive_norm
        self.layers: dict[int, LayerStats] = {}
        self.n = 0
        self.ce_sum = 0.0
        self.delta_sum = 0.0
        self.delta_sq = 0.0
        self.kl_sum = 0.0

    def record(self, layer: int, target: Tensor, recon: Tensor, acts: Tensor | None) -> None:
        if layer not in self.layers:
            self.layers[layer] = LayerStats(self.massive_norm[layer])
        self.layers[layer].add(target, recon, acts)

    def add_predictions(self, logp: Tensor, clean: "CleanBatch") -> None:
        ce = -logp.gather(1, clean.targets[:, None]).squeeze(1).double()
        delta = ce - clean.ce.double()
        self.n += ce.numel()
        self.ce_sum += float(ce.sum())
        self.delta_sum += float(delta.sum())
        self.delta_sq += float(delta.pow(2).sum())
        self.kl_sum += float((clean.neg_entropy - rowdot(clean.p, logp)).double().sum())

    def result(self) -> dict:
        mean_delta = self.delta_sum / self.n
        var = max(self.delta_sq / self.n - mean_delta**2, 0.0)
        return {
            "ce": self.ce_sum / self.n,
            "delta_ce": mean_delta,
            "delta_ce_se": math.sqrt(var / max(self.n - 1, 1)),
            "kl": self.kl_sum / self.n,
            "predictions": self.n,
            "layers": {l: s.result() for l, s in sorted(self.layers.items())},
        }
