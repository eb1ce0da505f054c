"""The activation tail: where the massive MLP-output rows are, and how much of each method's error they carry.

A row (one token's MLP output at one layer) is **massive** when its norm
exceeds the evaluation's threshold (``pipeline.eval.reference``:
``MASSIVE_FACTOR`` x the median norm of that layer's clean rows). On the
held-out eval windows, per layer:

- ``describe_massive``: the fraction of rows that are massive, their share of
  the variance, their tokens, positions and the dimensions that carry them;
- per method (single-layer splice of that layer), the FVU split
  ``fvu = fvu_massive + fvu_ordinary`` (each the class's squared error over
  the one total variance, so the two sum to the total exactly), and the ΔCE
  split: ΔCE with only the massive rows replaced, with only the ordinary ones,
  and their interaction (total - both), so the three sum to the total;
- reconstruction error by row-norm bucket (relative squared error per bucket).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.progress import progress_bar
from pipeline.eval.reference import Reference, batches
from pipeline.eval.splice import DecompositionSplice, Record, final_hidden, logits, put_rows, rows_of, splice_hook_name

N_BUCKETS = 12


class PartialSplice(DecompositionSplice):
    """A decomposition spliced on one class of rows only (massive or ordinary); the other rows keep the
    real MLP output."""

    def __init__(self, decomposition, threshold: dict[int, float], massive: bool):
        super().__init__(decomposition)
        self.threshold, self.massive = threshold, massive

    def _output(self, j: int, y: Tensor, acts: dict, inputs: dict, record: Record | None) -> Tensor:
        d = self.decomposition
        real = rows_of(y).float()
        recon = d.decode_layer(j, {i: acts[i] for i in d.sources(j)}, inputs.get(j))
        chosen = (real.norm(dim=-1) > self.threshold[j]) == self.massive
        out = torch.where(chosen[:, None], recon, real)
        if record is not None:
            record(j, real, out, acts.get(j))
        return put_rows(y, out)


def fvu_split(y: Tensor, recon: Tensor, massive: Tensor) -> dict:
    """FVU of rows ``y`` [N, d] by ``recon``, split by the boolean ``massive`` [N]; the parts sum to the total."""
    y, recon = y.double(), recon.double()
    total_var = (y - y.mean(0)).pow(2).sum()
    err = (y - recon).pow(2).sum(-1)
    var_rows = (y - y.mean(0)).pow(2).sum(-1)
    m = massive.bool()
    out = {"fvu": float(err.sum() / total_var), "fvu_massive": float(err[m].sum() / total_var),
           "fvu_ordinary": float(err[~m].sum() / total_var), "massive_rows": float(m.double().mean()),
           "massive_variance_share": float(var_rows[m].sum() / total_var)}
    out["fvu_within_massive"] = float(err[m].sum() / var_rows[m].sum()) if m.any() else math.nan
    out["fvu_within_ordinary"] = float(err[~m].sum() / var_rows[~m].sum()) if (~m).any() else math.nan
    return out


def bucket_errors(y: Tensor, recon: Tensor, edges: np.ndarray) -> list[dict]:
    """Relative squared error sum|y - recon|^2 / sum|y|^2 per bucket of row norm (``edges``)."""
    norm = y.norm(dim=-1).numpy()
    err = (y - recon).pow(2).sum(-1).double().numpy()
    power = y.pow(2).sum(-1).double().numpy()
    idx = np.clip(np.searchsorted(edges, norm, side="right") - 1, 0, len(edges) - 2)
    out = []
    for b in range(len(edges) - 1):
        sel = idx == b
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "rows": int(sel.sum()),
                    "relative_error": float(err[sel].sum() / power[sel].sum()) if sel.any() else None})
    return out


@dataclass
class CleanRows:
    """The clean MLP-output rows of one layer on the eval windows (positions 1.., batch-major)."""

    y: Tensor  # [N, d]
    tokens: Tensor  # [N] token id at each row
    positions: Tensor  # [N] position in its window (1..)


def clean_rows(lm, ref: Reference, layer: int) -> CleanRows:
    ys = []

    def grab(y, hook=None):
        ys.append(rows_of(y).float())

    for batch in batches(ref.tokens):
        final_hidden(lm, batch, [(splice_hook_name(lm, layer), grab)])
    n_seq, ctx = ref.tokens.shape
    positions = torch.arange(1, ctx).repeat(n_seq)
    return CleanRows(torch.cat(ys), ref.tokens[:, 1:].reshape(-1), positions)


def describe_massive(rows: CleanRows, threshold: float, tokenizer, top: int = 12) -> dict:
    norm = rows.y.norm(dim=-1)
    m = norm > threshold
    var = (rows.y - rows.y.mean(0)).pow(2)
    out = {"threshold": threshold, "rows": int(len(norm)), "massive": int(m.sum()),
           "massive_fraction": float(m.double().mean()),
           "massive_variance_share": float(var[m].sum() / var.sum())}
    if not m.any():
        return out | {"tokens": [], "positions": [], "dims": []}
    tok_counts = Counter(rows.tokens[m].tolist())
    all_counts = Counter(rows.tokens.tolist())
    out["tokens"] = [{"token": tokenizer.decode([t]), "id": t, "massive": c, "of_occurrences": all_counts[t]}
                     for t, c in tok_counts.most_common(top)]
    pos_counts = Counter(rows.positions[m].tolist())
    out["positions"] = [{"position": p, "massive": c} for p, c in pos_counts.most_common(top)]
    power = rows.y[m].pow(2).sum(0)
    share, dims = (power / power.sum()).topk(min(top, power.numel()))
    out["dims"] = [{"dim": int(d), "share_of_massive_power": float(s),
                    "mean_massive": float(rows.y[m, d].mean()), "mean_ordinary": float(rows.y[~m, d].mean())}
                   for d, s in zip(dims, share)]
    return out


@dataclass
class SpliceResult:
    ce: float  # mean CE of the eval predictions under the splice
    y: Tensor | None = None
    recon: Tensor | None = None


def run_splice(lm, ref: Reference, splice, layer: int, keep_rows: bool) -> SpliceResult:
    """Mean CE of the eval predictions with ``splice`` on ``layer`` (and the replaced rows, if asked)."""
    ys, recons, ce_sum, count = [], [], 0.0, 0

    def record(j, target, recon, acts):
        if keep_rows:
            ys.append(target.float())
            recons.append(recon.float())

    for batch in batches(ref.tokens):
        h = final_hidden(lm, batch, splice.hooks(lm, [layer], record))[:, 1:-1]
        logp = F.log_softmax(logits(lm, h.reshape(-1, h.shape[-1])), dim=-1)
        ce = -logp.gather(1, batch[:, 2:].reshape(-1, 1))
        ce_sum += float(ce.double().sum())
        count += ce.numel()
    return SpliceResult(ce_sum / count, torch.cat(ys) if ys else None, torch.cat(recons) if recons else None)


@dataclass
class TailResult:
    layer: int
    method: str
    fvu: dict
    dce: dict
    buckets: list = field(default_factory=list)


def tail_of(lm, ref: Reference, decomposition, name: str, layer: int, edges: np.ndarray) -> TailResult:
    threshold = ref.massive_norm
    clean_ce = float(ref.ce.double().mean())
    full = run_splice(lm, ref, DecompositionSplice(decomposition), layer, keep_rows=True)
    only_massive = run_splice(lm, ref, PartialSplice(decomposition, threshold, True), layer, False)
    only_ordinary = run_splice(lm, ref, PartialSplice(decomposition, threshold, False), layer, False)
    massive = full.y.norm(dim=-1) > threshold[layer]
    total = full.ce - clean_ce
    dm, do = only_massive.ce - clean_ce, only_ordinary.ce - clean_ce
    dce = {"clean_ce": clean_ce, "dce": total, "dce_massive_only": dm, "dce_ordinary_only": do,
           "dce_interaction": total - dm - do}
    return TailResult(layer, name, fvu_split(full.y, full.recon, massive), dce, bucket_errors(full.y, full.recon, edges))


def norm_edges(rows: CleanRows, n: int = N_BUCKETS) -> np.ndarray:
    """Log-spaced edges from the smallest to the largest clean row norm."""
    norm = rows.y.norm(dim=-1)
    lo, hi = float(norm.min().clamp(min=1e-6)), float(norm.max())
    return np.geomspace(lo, hi * (1 + 1e-9), n + 1)


def run(lm, ref: Reference, methods: list, layers: list[int], progress: bool = True) -> dict:
    """``methods``: [(name, decomposition)]. Per layer: the massive rows described, and each method's splits."""
    out = {"massive_factor": ref.info.get("massive_factor"), "layers": {}}
    jobs = [(l, n, d) for l in layers for n, d in methods if l in d.layers]
    bar = progress_bar(len(jobs) + len(layers), progress, desc="tail", unit="splice")
    for layer in layers:
        rows = clean_rows(lm, ref, layer)
        edges = norm_edges(rows)
        entry = {"massive": describe_massive(rows, ref.massive_norm[layer], lm.tokenizer), "methods": {}}
        bar.update(1)
        for l, name, d in jobs:
            if l == layer:
                r = tail_of(lm, ref, d, name, layer, edges)
                entry["methods"][name] = {"fvu": r.fvu, "dce": r.dce, "buckets": r.buckets}
                bar.update(1)
        out["layers"][str(layer)] = entry
    bar.close()
    return out
