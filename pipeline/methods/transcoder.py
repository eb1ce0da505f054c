"""One dictionary family: a transcoder from an input hook to a target hook.

An SAE is the special case whose target is its input. The sparsity variant is
a swappable piece (``pipeline.methods.sparsity``); everything else is shared:

- decoder rows of unit norm; the gradient component parallel to each row is
  removed before every step and rows are renormalised after it (Bricken et al.
  2023; Gao et al. 2024);
- AuxK loss on dead latents for TopK/BatchTopK (Gao et al. 2024: k_aux = d/2,
  coefficient 1/32, residual-normalised);
- b_dec initialised at the target mean, from the store's statistics, or (the
  default) at the geometric median of the first batch;
- optional scalar normalisation of input and target (E||x||^2 = d each,
  from the store's ``mean_sq_norm``), applied inside ``encode``/``forward``
  and undone in ``decode``, so callers only ever see model units.

Massive activations: in SmolLM2 ~3% of MLP-output rows have norms >5x the
median and carry >90% of the variance. The training loss stays plain MSE over
all rows (evaluate splices the dictionary in, and the model relies on those
rows being right), so the normalisation scale includes them too; but FVU over
all rows then mostly measures those rows, so every metric is also reported on
the rows whose target norm is below ``massive_norm`` (5x the median target
norm, measured on the first training batch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.core.errors import UserError
from pipeline.methods.sparsity import SPARSITY, Codes, SelectedPreacts, SparseDecode, SparsePattern, SparsitySettings, make_sparsity

KINDS = ("transcoder", "sae")
MASSIVE_FACTOR = 5.0
ENCODER_INIT_SCALE = 0.1  # W_enc rows start at norm 0.1 (Conerly et al. 2024 start W_dec there)


@dataclass(frozen=True)
class DictionaryConfig:
    variant: str
    k: int
    d_in: int
    d_out: int
    n_latents: int
    kind: str = "transcoder"
    layer: int = 0
    input_hook: str = "mlp_in"
    target_hook: str = "mlp_out"
    normalize: bool = True
    aux_k: int = 0  # 0: d_out // 2 (Gao et al. 2024)
    aux_coef: float = 1 / 32  # Gao et al. 2024
    seed: int = 0  # weight init
    # b_dec starts at the target's mean (store statistics) or at the geometric
    # median of the first batch, which the ~3% massive rows cannot drag away
    # from where the other 97% of the rows are.
    b_dec_init: str = "geometric_median"
    # Weight each row's squared error by min(1, (massive_norm / ||y||)^2): a
    # massive row counts like a row at the massive threshold with the same
    # relative error, instead of drowning out the other 97% of the rows.
    cap_massive_rows: bool = True
    settings: SparsitySettings = field(default_factory=SparsitySettings)

    def __post_init__(self):
        if self.variant not in SPARSITY:
            raise UserError(f"unknown MODEL '{self.variant}'; choose one of {', '.join(SPARSITY)}")
        if self.kind not in KINDS:
            raise UserError(f"unknown KIND '{self.kind}'; choose one of {', '.join(KINDS)}")
        for name in ("d_in", "d_out", "n_latents"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.k < self.n_latents:
            raise UserError(f"K={self.k} is out of range: it must satisfy 0 < K < LATENTS={self.n_latents}")
        if self.kind == "sae" and (self.input_hook != self.target_hook or self.d_in != self.d_out):
            raise UserError("an SAE reconstructs its input: input and target hook (and d) must be the same")
        if self.b_dec_init not in ("mean", "geometric_median"):
            raise UserError(f"b_dec_init must be mean or geometric_median, got {self.b_dec_init!r}")
        if self.aux_k < 0 or self.aux_coef < 0:
            raise UserError(f"aux_k and aux_coef must be >= 0, got {self.aux_k}, {self.aux_coef}")
        if isinstance(self.settings, dict):
            object.__setattr__(self, "settings", SparsitySettings(**self.settings))

    @property
    def name(self) -> str:
        return f"{self.variant}-k{self.k}-L{self.layer}"

    def to_dict(self) -> dict:
        return asdict(self)


class Dictionary(nn.Module):
    """encode / decode / forward in model units; ``training_loss`` for ``fit``."""

    family = "dictionary"

    def __init__(self, cfg: DictionaryConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(cfg.n_latents, cfg.d_out, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if cfg.kind == "sae":
            W_enc = W_dec.clone()  # tied init (Conerly et al. 2024; Gao et al. 2024)
        else:
            W_enc = torch.randn(cfg.n_latents, cfg.d_in, generator=gen)
            W_enc /= W_enc.norm(dim=1, keepdim=True)
        # Small encoder at init: the first reconstructions are then small
        # instead of k random unit directions with O(1) activations, which
        # otherwise makes the first steps push most pre-activations negative
        # (L0 collapses well below k and AuxK, ReLU'd, cannot revive them).
        self.W_enc = nn.Parameter(W_enc * ENCODER_INIT_SCALE)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        self.sparsity = make_sparsity(cfg.variant, cfg.n_latents, cfg.k, cfg.settings)
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("target_scale", torch.tensor(1.0))
        self.register_buffer("massive_norm", torch.tensor(float("inf")))  # model units
        # Dead-latent bookkeeping: tokens since each latent last fired.
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.n_latents, dtype=torch.int64))

    # ----- set-up from data ------------------------------------------------
    @torch.no_grad()
    def init_from_stats(self, input_stats: dict, target_stats: dict) -> None:
        """Scales from the store's mean squared norms; b_dec at the target mean."""
        if self.cfg.normalize:
            self.input_scale.fill_((self.cfg.d_in / input_stats["mean_sq_norm"]) ** 0.5)
            self.target_scale.fill_((self.cfg.d_out / target_stats["mean_sq_norm"]) ** 0.5)
        mean = torch.tensor(target_stats["mean"], dtype=torch.float32)
        self.b_dec.copy_(mean * self.target_scale)

    @torch.no_grad()
    def init_from_batch(self, x: Tensor, y: Tensor) -> None:
        """Data-dependent pieces of the init: massive-row threshold, JumpReLU thresholds."""
        self.massive_norm.fill_(MASSIVE_FACTOR * y.float().norm(dim=-1).median())
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(y.float() * self.target_scale))
        calibrate = getattr(self.sparsity, "calibrate", None)
        if calibrate is not None:
            xn = x.float() * self.input_scale
            calibrate(torch.addmm(self.b_enc, xn, self.W_enc.T))

    # ----- the contract ---------------------------------------------------
    def codes(self, x: Tensor) -> Codes:
        flat = x.reshape(-1, x.shape[-1]).float() * self.input_scale
        return self.sparsity.encode(flat, self.W_enc, self.b_enc)

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations [..., n_latents] (dense) of model-unit inputs."""
        return self.codes(x).to_dense().reshape(*x.shape[:-1], self.cfg.n_latents)

    def decode(self, acts: Tensor) -> Tensor:
        """Model-unit reconstruction of the target from dense latents."""
        flat = acts.reshape(-1, self.cfg.n_latents).float()
        y = (flat @ self.W_dec + self.b_dec) / self.target_scale
        return y.reshape(*acts.shape[:-1], self.cfg.d_out)

    def forward(self, x: Tensor) -> Tensor:
        codes = self.codes(x)
        y = (codes.decode(self.W_dec) + self.b_dec) / self.target_scale
        return y.reshape(*x.shape[:-1], self.cfg.d_out)

    # ----- training -------------------------------------------------------
    def training_loss(self, x: Tensor, y: Tensor, dead: Tensor | None,
                      with_metrics: bool = True) -> tuple[Tensor, dict[str, Tensor], Codes]:
        """Loss (and metrics, which cost a few passes) on one batch; x, y in model units;
        ``dead`` [n_latents] bool."""
        xn = x.to(torch.float32, copy=True).mul_(self.input_scale)  # never scale the shared batch
        yn = y.to(torch.float32, copy=True).mul_(self.target_scale)
        codes = self.sparsity.encode(xn, self.W_enc, self.b_enc)
        y_hat = codes.decode(self.W_dec) + self.b_dec
        err = y_hat - yn
        recon = self._recon_loss(err, yn)
        penalty = self.sparsity.penalty(codes, self.W_dec)
        aux = self._auxk(xn, err.detach(), codes, dead)
        loss = recon + penalty + aux
        if not with_metrics:
            return loss, {}, codes
        with torch.no_grad():
            metrics = {"loss": loss.detach(), "recon": recon.detach(), "penalty": penalty.detach(), "aux": aux.detach(),
                       "l0": codes.l0()}
            metrics |= fvu_metrics(err, yn, self.massive_norm * self.target_scale)
            metrics["mse"] = err.pow(2).sum(-1).mean() / self.target_scale**2  # model units
        return loss, metrics, codes

    def _recon_loss(self, err: Tensor, yn: Tensor) -> Tensor:
        """Mean squared error per element, massive rows capped (see ``cap_massive_rows``)."""
        if not self.cfg.cap_massive_rows or not torch.isfinite(self.massive_norm):
            return err.pow(2).mean()
        cap = self.massive_norm * self.target_scale
        weight = (cap / yn.norm(dim=-1).clamp_min(1e-12)).clamp(max=1).pow(2)
        return (err.pow(2).sum(-1) * weight).sum() / err.numel()

    def _auxk(self, xn: Tensor, residual: Tensor, codes: Codes, dead: Tensor | None) -> Tensor:
        """Dead latents learn to explain the residual (Gao et al. 2024, AuxK)."""
        zero = torch.zeros((), device=xn.device)
        if not self.sparsity.uses_auxk or dead is None or self.cfg.aux_coef == 0 or not self.training:
            return zero
        dead_idx = dead.nonzero().squeeze(1)
        if dead_idx.numel() == 0:
            return zero
        k_aux = min(self.cfg.aux_k or self.cfg.d_out // 2, dead_idx.numel())
        values, local = codes.preacts.index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False)
        pattern = SparsePattern.from_topk(dead_idx[local], self.cfg.n_latents)
        values = SelectedPreacts.apply(values.reshape(-1).to(self.W_enc.dtype), xn, self.W_enc, self.b_enc, pattern)
        recon = SparseDecode.apply(F.relu(values), self.W_dec, pattern)
        return self.cfg.aux_coef * (recon - residual).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-12)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder row."""
        g, w = self.W_dec.grad, self.W_dec
        if g is not None:
            g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def record_firing(self, codes: Codes, n_tokens: int) -> None:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[codes.fired()] = 0

    def config_dict(self) -> dict:
        return {"family": self.family, "config": self.cfg.to_dict(), **self.sparsity.extra_config(),
                "input_scale": float(self.input_scale), "target_scale": float(self.target_scale),
                "massive_norm": float(self.massive_norm)}

    @classmethod
    def from_config_dict(cls, d: dict) -> "Dictionary":
        return cls(DictionaryConfig(**d["config"]))


@torch.no_grad()
def fvu_metrics(err: Tensor, y: Tensor, massive_norm: Tensor) -> dict[str, Tensor]:
    """FVU on all rows and on the rows whose target norm is below ``massive_norm``."""
    out = {"fvu": _fvu(err, y)}
    normal = y.norm(dim=-1) <= massive_norm
    out["fvu_normal"] = _fvu(err[normal], y[normal]) if normal.any() else torch.tensor(float("nan"))
    out["massive_frac"] = 1 - normal.float().mean()
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


def _fvu(err: Tensor, y: Tensor) -> Tensor:
    return err.pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
