"""Streaming statistics of one splice job: predictions (CE, ΔCE and its standard error over
windows, KL) and each replaced layer (MSE, FVU, FVU without massive rows, L0, alive/dead/dense
latents), in float64 sums."""

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


KL_CHUNK = 256  # predictions per chunk of the float64 KL sum


def kl_sum(clean_logp: Tensor, logp: Tensor) -> float:
    """Sum over predictions of KL(p || q) = sum_v p_v (log p_v - log q_v), summed in float64.

    The difference is taken element by element before summing, so the two
    large sums ``sum p log p`` and ``sum p log q`` (each with fp32 rounding
    of ~1e-3 over a 49k vocabulary at large KL) never cancel; a splice that
    changes nothing gives exactly 0.
    """
    total = 0.0
    for start in range(0, logp.shape[0], KL_CHUNK):
        lp, lq = clean_logp[start : start + KL_CHUNK], logp[start : start + KL_CHUNK]
        total += float((lp.double().exp() * (lp - lq).double()).sum())
    return total


@dataclass
class CleanBatch:
    """What every job of a batch compares against, computed once per batch."""

    targets: Tensor  # [predictions] next-token ids
    ce: Tensor  # [predictions] clean CE
    logp: Tensor  # [predictions, vocab] clean log-probabilities
    windows: int  # predictions come in this many windows of equal length

    @classmethod
    def from_hidden(cls, lm, hidden: Tensor, targets: Tensor, ce: Tensor) -> "CleanBatch":
        logp = F.log_softmax(logits(lm, hidden.reshape(-1, hidden.shape[-1])), dim=-1)
        return cls(targets, ce, logp, hidden.shape[0])


class JobStats:
    """Everything one job measures: predictions and its replaced layers.

    The standard error of ΔCE treats windows, not predictions, as the
    independent draws: predictions of one window share a context (and
    mostly a document), so their ΔCEs are correlated and a per-prediction
    s.e. would be too small. Every window has the same number of predictions,
    so the mean over windows is the mean over predictions.
    """

    def __init__(self, massive_norm: dict[int, float]):
        self.massive_norm = massive_norm
        self.layers: dict[int, LayerStats] = {}
        self.n = 0
        self.ce_sum = 0.0
        self.kl_sum = 0.0
        self.window_delta: list[Tensor] = []  # per-window mean ΔCE, float64

    def record(self, layer: int, target: Tensor, recon: Tensor, acts: Tensor | None) -> None:
        if layer not in self.layers:
            self.layers[layer] = LayerStats(self.massive_norm[layer])
        self.layers[layer].add(target, recon, acts)

    def add_predictions(self, logp: Tensor, clean: "CleanBatch") -> None:
        ce = -logp.gather(1, clean.targets[:, None]).squeeze(1).double()
        self.n += ce.numel()
        self.ce_sum += float(ce.sum())
        self.window_delta.append((ce - clean.ce.double()).reshape(clean.windows, -1).mean(1))
        self.kl_sum += kl_sum(clean.logp, logp)

    def result(self) -> dict:
        deltas = torch.cat(self.window_delta)
        n_windows = deltas.numel()
        se = float(deltas.std()) / math.sqrt(n_windows) if n_windows > 1 else 0.0
        return {
            "ce": self.ce_sum / self.n,
            "delta_ce": float(deltas.mean()),
            "delta_ce_se": se,
            "kl": self.kl_sum / self.n,
            "predictions": self.n,
            "layers": {l: s.result() for l, s in sorted(self.layers.items())},
        }
