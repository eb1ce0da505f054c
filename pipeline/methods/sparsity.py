"""Sparsity variants: how pre-activations become (few) active latents.

Each variant is a small ``nn.Module`` registered by name in ``SPARSITY``. It
owns only what is specific to it (a threshold, a penalty coefficient) and
exposes three things to the dictionary and the training loop:

- ``encode(x, W_enc, b_enc) -> Codes``: pre-activations to latent codes;
- ``penalty(codes, W_dec) -> scalar`` added to the loss (0 for TopK);
- ``update(codes)`` after each optimiser step (threshold estimate, controller).

What ``k`` means for every variant (so a K sweep and its Pareto plot compare
like with like): TopK keeps k latents per row; BatchTopK keeps k x batch
latents per batch; vanilla (L1) and JumpReLU (L0) have no hard k, so ``k`` is
their *target* L0 and the penalty coefficient follows it with a multiplicative
controller, ``log lambda += rate * clip((L0 - k) / k, -1, 1)`` after each step.
That is dual ascent on the constraint "mean L0 = k" (our choice; the JumpReLU
and L1 papers tune lambda by hand per run, which a sweep cannot).

Speed: the sparse kernels live in ``pipeline.methods.kernels``; TopK,
BatchTopK and JumpReLU produce ``SparseCodes``, vanilla (L1) ``DenseCodes``.

The variants are listed in ``SPARSITY`` explicitly, at the end of this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pipeline.methods.collective as collective
from pipeline.core.errors import UserError
from pipeline.methods.codes import SPARSE_DECODE_MAX_DENSITY, Codes, DenseCodes, SparseCodes
from pipeline.methods.calibration import L0Calibrator
from pipeline.methods.kernels import (TRAIN_MATMUL_DTYPE, JumpReLUFn, SelectedPreacts, SparsePattern, StepFn,
                                     dense_preacts, preacts)

# BatchTopK first keeps this many x k candidates per row (see BatchTopK.select).
BATCHTOPK_CANDIDATES = 4
# BatchTopK samples about this many pre-activations to bound its threshold.
BATCHTOPK_SAMPLE = 2**16

# JumpReLU log-thresholds learn this many times faster than the weights.
THRESHOLD_LR_SCALE = 20.0
# The lowest log-threshold calibration sets (a threshold of ~2e-9: every positive entry fires).
MIN_LOG_THRESHOLD = -20.0



@dataclass(frozen=True)
class SparsitySettings:
    """Variant hyper-parameters; defaults and sources in the field comments."""

    # JumpReLU: rectangle-kernel bandwidth of the straight-through estimator,
    # as a fraction of the median threshold after calibration (absolute if
    # never calibrated). Gemma Scope uses 0.001 absolute with thresholds
    # starting at 0.001, over billions of tokens; relative to the threshold
    # scale ours is wider, which gives the threshold a less noisy gradient in
    # runs ~1000x shorter, while keeping the band (and the sparse work) small.
    bandwidth: float = 0.1
    # Initial penalty coefficients for the L0 controller (vanilla: L1, jumprelu: L0).
    l1_coef_init: float = 1e-3
    l0_coef_init: float = 1e-2
    # Controller step on log(lambda) per optimiser step at 100% L0 error.
    controller_rate: float = 0.02
    # BatchTopK: EMA decay of the inference threshold estimate.
    threshold_decay: float = 0.9

    def __post_init__(self):
        for name in ("bandwidth", "l1_coef_init", "l0_coef_init", "controller_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SparsitySettings.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.threshold_decay < 1:
            raise ValueError(f"SparsitySettings.threshold_decay must be in (0, 1), got {self.threshold_decay}")


class Sparsity(nn.Module):
    name: ClassVar[str]
    uses_auxk: ClassVar[bool] = False  # dead latents get an AuxK loss

    def __init__(self, n_latents: int, k: int, settings: SparsitySettings):
        super().__init__()
        self.n_latents, self.k, self.settings = n_latents, k, settings

    def matmul_dtype(self) -> torch.dtype:
        return TRAIN_MATMUL_DTYPE if self.training else torch.float32

    def encode(self, x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Codes:
        raise NotImplementedError

    def penalty(self, codes: Codes, W_dec: Tensor) -> Tensor:
        return torch.zeros((), device=W_dec.device)

    @torch.no_grad()
    def update(self, codes: Codes) -> None:
        pass

    def extra_config(self) -> dict:
        """Scalars worth recording in the checkpoint's config.json."""
        return {}

    # Inference-threshold calibration after training (BatchTopK, JumpReLU); None: nothing to set.
    def calibrator(self) -> L0Calibrator | None:
        return None

    def calibration_scores(self, pre: Tensor) -> Tensor:
        """Per entry, a score that exceeds the calibrated threshold iff the entry is active."""
        return pre

    def calibrate_inference(self, calib: L0Calibrator) -> float | None:
        """Set the inference threshold; a variant whose only knob is the encoder bias
        returns the common shift its coder must add to ``b_enc`` (else None)."""
        raise NotImplementedError


class _SparseSelection(Sparsity):
    """Shared by TopK and BatchTopK: a no-grad bf16 matmul, a selection, sparse grads."""

    uses_auxk = True

    def select(self, pre: Tensor) -> tuple[Tensor, SparsePattern]:
        raise NotImplementedError

    def encode(self, x, W_enc, b_enc):
        pre = preacts(x, W_enc, b_enc, self.matmul_dtype())
        values, pattern = self.select(pre)
        values = SelectedPreacts.apply(values.to(W_enc.dtype), x, W_enc, b_enc, pattern)
        return SparseCodes(F.relu(values), pattern, preacts=pre)


class TopK(_SparseSelection):
    """Keep the k largest pre-activations per row (Gao et al. 2024), then ReLU."""

    name = "topk"

    def select(self, pre):
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return values.reshape(-1), SparsePattern.from_topk(indices, self.n_latents)


class BatchTopK(_SparseSelection):
    """Keep the k x batch largest pre-activations of the whole batch (Bussmann et al. 2024).

    Training selects across the batch; the estimate of a single threshold
    (EMA of the smallest positive selected activation) replaces the selection
    in eval mode, so a row's code never depends on the rest of its batch.
    """

    name = "batchtopk"

    def __init__(self, n_latents, k, settings):
        super().__init__(n_latents, k, settings)
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def select(self, pre):
        n_rows = pre.shape[0]
        if not self.training:
            mask = pre > self.threshold.clamp_min(0).to(pre.dtype)
            rows, cols = mask.nonzero(as_tuple=True)
            return pre[rows, cols], SparsePattern.from_rows(rows, cols, n_rows, self.n_latents)
        if collective.world_size() > 1:
            return self._select_across_ranks(pre)
        selected = self._select_by_threshold(pre)
        if selected is not None:
            return selected
        # Two stages, exact: each row's top CANDIDATES x k first (cheap, per row),
        # then the batch's top k x batch among those. Only if some row had all
        # its candidates selected could a row hold more; then redo it flat.
        n_sel = self.k * n_rows
        n_cand = min(self.n_latents, BATCHTOPK_CANDIDATES * self.k)
        cand_values = pre.topk(n_cand, dim=-1, sorted=False).values
        values = cand_values.reshape(-1).topk(n_sel, sorted=False).values
        if n_cand < self.n_latents and (cand_values.min(dim=1).values >= values.min()).any():
            values = pre.reshape(-1).topk(n_sel, sorted=False).values
        return self._keep_largest(pre, values.min(), n_sel)

    @staticmethod
    def _keep_largest(pre: Tensor, threshold: Tensor, n_sel: int, ties_before: int = 0) -> tuple[Tensor, SparsePattern]:
        """The entries above ``threshold``, then ties at it in row-major order, up to ``n_sel`` in all
        (``ties_before``: ties taken by earlier rows of the global batch, on lower ranks). One
        rule for every path, so a selection never depends on how a tie was broken."""
        n_rows, n_latents = pre.shape
        flat = pre.reshape(-1)
        above, ties = flat > threshold, flat == threshold
        spare = n_sel - ties_before - int(collective.sum_over_ranks(above.sum()))
        keep = above | (ties & (ties.cumsum(0) <= max(0, spare)))
        index = keep.nonzero().squeeze(1)
        return flat[index], SparsePattern.from_rows(index // n_latents, index % n_latents, n_rows, n_latents)

    def _select_by_threshold(self, pre: Tensor) -> tuple[Tensor, SparsePattern] | None:
        """The batch's k x batch largest pre-activations, without a large top-k.

        A lower bound on the selection threshold comes from a strided sample
        of the pre-activations (BATCHTOPK_SAMPLE entries, the stride coprime
        to n_latents so every latent is sampled, no RNG used), aiming at
        ~1.4x the k x batch entries; one pass keeps the entries above it (in
        row-major order, as the pattern needs, so no sort), and kthvalue on
        those finds the exact threshold. Ties at the threshold are kept in
        row-major order up to exactly k x batch. None when the bound selected
        too few (an unlucky sample): the caller then selects the slow way.
        """
        n_rows, n_latents = pre.shape
        n_sel = self.k * n_rows
        flat = pre.reshape(-1)
        stride = max(1, flat.numel() // BATCHTOPK_SAMPLE) | 1
        while math.gcd(stride, n_latents) != 1:
            stride += 2
        sample = flat[::stride]
        want = min(sample.numel(), int(1.4 * sample.numel() * n_sel / flat.numel()) + 64)
        bound = sample.topk(want, sorted=False).values.min()
        rows, cols = (pre >= bound).nonzero(as_tuple=True)
        count = rows.numel()
        if count < n_sel:
            return None
        values = pre[rows, cols]
        if count > n_sel:
            # kthvalue has no bf16 kernel; bf16 -> fp32 -> bf16 is exact.
            wide = values if values.dtype in (torch.float32, torch.float64) else values.float()
            threshold = wide.kthvalue(count - n_sel + 1).values.to(values.dtype)
            above = values > threshold
            ties = values == threshold
            keep = above | (ties & (ties.cumsum(0) <= n_sel - int(above.sum())))
            rows, cols, values = rows[keep], cols[keep], values[keep]
        return values, SparsePattern.from_rows(rows, cols, n_rows, n_latents)

    def _select_across_ranks(self, pre: Tensor) -> tuple[Tensor, SparsePattern]:
        """The k x global-batch largest pre-activations of the batch all ranks hold together
        (this rank's rows are one slice of it): what one process selects on the whole
        batch, ties at the threshold kept in rank order, then row-major order, as there."""
        n_sel = self.k * pre.shape[0] * collective.world_size()
        flat = pre.reshape(-1)
        # the global selection takes at most n_sel entries from any one rank
        candidates = collective.gather(flat.topk(min(n_sel, flat.numel()), sorted=False).values.float())
        threshold = candidates.kthvalue(candidates.numel() - n_sel + 1).values.to(pre.dtype)
        ties = collective.gather((flat == threshold).sum().view(1))
        return self._keep_largest(pre, threshold, n_sel, int(ties[: collective.rank()].sum()))

    @torch.no_grad()
    def update(self, codes):
        positive = codes.values[codes.values > 0]
        smallest = positive.min().float() if positive.numel() else torch.tensor(float("inf"), device=positive.device)
        smallest = collective.min_over_ranks(smallest)
        if not torch.isfinite(smallest):
            return
        decay = self.settings.threshold_decay
        self.threshold.copy_(smallest if self.threshold.isnan() else decay * self.threshold + (1 - decay) * smallest)

    def calibrator(self) -> L0Calibrator:
        return L0Calibrator(self.k)

    @torch.no_grad()
    def calibrate_inference(self, calib: L0Calibrator) -> None:
        """The inference threshold from training rows, so that eval L0 = k there.

        The running estimate (EMA of each batch's smallest selected value) is
        biased low: a batch's minimum over k x batch selections sits below the
        typical k-th value, so eval L0 came out 2-3x k (39-47 at k=16) in short
        runs. Calibration replaces it with the threshold at which the rows'
        mean L0 is k, which is what BatchTopK selects over one very large batch.
        """
        self.threshold.fill_(max(calib.threshold(), 0.0))

    def extra_config(self):
        return {"threshold": float(self.threshold)}


class _TargetL0(Sparsity):
    """Penalised variants: ``k`` is the target L0, the coefficient follows it."""

    coef_init_field: ClassVar[str]

    def __init__(self, n_latents, k, settings):
        super().__init__(n_latents, k, settings)
        self.register_buffer("log_coef", torch.tensor(math.log(getattr(settings, self.coef_init_field))))

    @property
    def coef(self) -> Tensor:
        return self.log_coef.exp()

    def l0_error(self, codes: Codes) -> Tensor:
        """The relative L0 error of the (global) batch, clipped to [-1, 1]."""
        return ((collective.mean_over_ranks(codes.l0()) - self.k) / self.k).clamp(-1, 1)

    @torch.no_grad()
    def update(self, codes):
        self.log_coef.add_(self.settings.controller_rate * self.l0_error(codes))

    def extra_config(self):
        out = {"penalty_coef": float(self.coef)}
        if hasattr(self, "bandwidth"):
            out["bandwidth"] = float(self.bandwidth)
        return out


class Vanilla(_TargetL0):
    """ReLU + L1. The L1 term weights each latent by its decoder row norm
    (Anthropic, April 2024 update) so shrinking a latent while growing its
    decoder row cannot cheat the penalty. Our decoders are kept at unit norm,
    so the weights are 1 here; they keep the penalty right if that changes."""

    name = "vanilla"
    coef_init_field = "l1_coef_init"

    def encode(self, x, W_enc, b_enc):
        dtype = self.matmul_dtype()
        if self.training:
            # As TopK once sparse: the ReLU's gradient is zero wherever the
            # pre-activation is <= 0, so after the no-grad matmul only the
            # positive entries carry a gradient to W_enc/b_enc (and W_dec).
            # Dense (three matmuls) while more than SPARSE_DECODE_MAX_DENSITY
            # of the entries are active, as early in training.
            pre = preacts(x, W_enc, b_enc, dtype)
            active = pre > 0
            if active.count_nonzero() <= SPARSE_DECODE_MAX_DENSITY * active.numel():
                rows, cols = active.nonzero(as_tuple=True)
                pattern = SparsePattern.from_rows(rows, cols, pre.shape[0], self.n_latents)
                values = SelectedPreacts.apply(pre[rows, cols].to(W_enc.dtype), x, W_enc, b_enc, pattern)
                return SparseCodes(F.relu(values), pattern, preacts=pre)
        return DenseCodes(F.relu(dense_preacts(x, W_enc, b_enc, dtype)), matmul_dtype=dtype)

    def penalty(self, codes, W_dec):
        norms = W_dec.norm(dim=1)
        if isinstance(codes, SparseCodes):
            return self.coef * (codes.values * norms[codes.pattern.cols]).sum() / codes.pattern.n_rows
        return self.coef * (codes.dense @ norms).mean()

    def calibrator(self) -> L0Calibrator:
        return L0Calibrator(self.k)

    @torch.no_grad()
    def calibrate_inference(self, calib: L0Calibrator) -> float:
        """The common encoder-bias shift that makes the mean L0 on training rows k.

        A ReLU latent fires iff its pre-activation is positive, so its L0 is set
        by the encoder bias; the controller moves L0 only through Adam steps that
        the schedule decays to nothing, and short runs ended 10-20% off target.
        Shifting every bias by -t (t: the level above which k entries per row lie)
        sets L0 = k and changes each active value by t, which is small when the
        controller was close."""
        return -calib.threshold()


class JumpReLU(_TargetL0):
    """Learned per-latent thresholds, L0 penalty, STE with a rectangle kernel (Gemma Scope)."""

    name = "jumprelu"
    coef_init_field = "l0_coef_init"

    def __init__(self, n_latents, k, settings):
        super().__init__(n_latents, k, settings)
        # Gemma Scope initialises thresholds at 0.001; we start there too but
        # calibrate from the first batch (``calibrate``) so short runs begin near
        # the target L0 instead of spending thousands of steps getting there.
        self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(1e-3)))
        # Adam moves a parameter by ~lr per step: at the dictionary's lr a
        # log-threshold could change by only ~x1.5 over a few hundred steps,
        # while pre-activations grow ~10x as the encoder trains. ``fit`` gives
        # parameters carrying ``lr_scale`` their own, larger learning rate.
        self.log_threshold.lr_scale = THRESHOLD_LR_SCALE
        self.register_buffer("bandwidth", torch.tensor(float(settings.bandwidth)))

    @torch.no_grad()
    def calibrate(self, pre: Tensor) -> None:
        """Set each threshold to the (1 - k/n_latents) quantile of its pre-activations."""
        rank = max(1, round(pre.shape[0] * (1 - self.k / self.n_latents)))
        quantile = pre.float().kthvalue(rank, dim=0).values.clamp_min(1e-3)
        self.log_threshold.copy_(quantile.log())
        self.bandwidth.fill_(self.settings.bandwidth * float(quantile.median()))

    def encode(self, x, W_enc, b_enc):
        threshold = self.log_threshold.exp()
        if not self.training:
            pre = dense_preacts(x, W_enc, b_enc, torch.float32)
            return DenseCodes(pre * (pre > threshold))
        # Training is sparse after the one dense no-grad matmul: only entries
        # above the lower edge of the STE band carry a gradient (active ones
        # to W_enc/b_enc, in-band ones to the threshold), so we keep just those.
        eps = float(self.bandwidth)
        pre = preacts(x, W_enc, b_enc, self.matmul_dtype())
        rows, cols = (pre > (threshold.detach() - eps / 2).to(pre.dtype)).nonzero(as_tuple=True)
        pattern = SparsePattern.from_rows(rows, cols, pre.shape[0], self.n_latents)
        z = SelectedPreacts.apply(pre[rows, cols].to(W_enc.dtype), x, W_enc, b_enc, pattern)
        t = threshold[cols]
        return SparseCodes(JumpReLUFn.apply(z, t, eps), pattern, step=StepFn.apply(z, t, eps))

    def penalty(self, codes, W_dec):
        return self.coef * codes.step.sum() / codes.pattern.n_rows

    @torch.no_grad()
    def update(self, codes):
        """Controller on the coefficient (as vanilla), plus the same signal as a
        common shift of all log-thresholds: the coefficient acts only through
        Adam steps that shrink with the cosine schedule, and short runs ended
        far from the target L0 (14 or 80 for k=32) without this direct term."""
        error = self.l0_error(codes)
        self.log_coef.add_(self.settings.controller_rate * error)
        self.log_threshold.add_(self.settings.controller_rate * error)

    def calibrator(self) -> L0Calibrator:
        return L0Calibrator(self.k)

    def calibration_scores(self, pre: Tensor) -> Tensor:
        """log(pre / threshold) where pre > 0: active iff the score is > 0, and after a common
        shift s of the log-thresholds, iff the score is > s."""
        return (pre.float().clamp_min(1e-30).log() - self.log_threshold.detach()).masked_fill(pre <= 0, float("-inf"))

    @torch.no_grad()
    def calibrate_inference(self, calib: L0Calibrator) -> None:
        """Shift every log-threshold by the same amount so the mean L0 on training rows is k.

        The L0 controller cannot reach its target in a short run (it acts through
        Adam steps that the schedule decays); one common shift keeps the learned
        relative thresholds and sets only the overall sparsity level. Where fewer than
        k pre-activations per row are positive at all (t = -inf), every threshold goes
        to the floor ``MIN_LOG_THRESHOLD`` instead: L0 is then as high as a ReLU allows."""
        t = calib.threshold()
        if math.isfinite(t):
            self.log_threshold.add_(t)
        else:
            self.log_threshold.fill_(MIN_LOG_THRESHOLD)


SPARSITY: dict[str, type[Sparsity]] = {cls.name: cls for cls in (Vanilla, TopK, BatchTopK, JumpReLU)}


def make_sparsity(variant: str, n_latents: int, k: int, settings: SparsitySettings | None = None) -> Sparsity:
    if variant not in SPARSITY:
        raise KeyError(variant)
    return SPARSITY[variant](n_latents, k, settings or SparsitySettings())


def inference_thresholds(piece: Sparsity) -> Tensor | None:
    """Per-latent thresholds t such that, outside training, a latent is active iff its
    pre-activation exceeds t and then equals it (a JumpReLU); None for vanilla (ReLU: t = 0
    with no threshold tensor) and TopK (a per-row selection, which no threshold reproduces).

    BatchTopK in eval mode keeps pre > max(threshold, 0): one threshold for every latent.
    """
    if isinstance(piece, JumpReLU):
        return piece.log_threshold.detach().exp()
    if isinstance(piece, BatchTopK):
        if torch.isnan(piece.threshold):
            raise UserError("this BatchTopK dictionary has no inference threshold yet (it was never trained); train it first")
        return piece.threshold.clamp_min(0).expand(piece.n_latents).clone()
    return None
