"""What every sparse coder shares: its validated config, initialisation, the
unit-norm decoder constraint, firing counts and the Trainable hooks.

Sources for the shared choices:

- decoder rows of unit norm; the gradient component parallel to each row is
  removed before every step and rows are renormalised after it (Bricken et
  al. 2023; Gao et al. 2024). A multi-layer coder (the CLT) passes each
  latent's whole row over its target layers, so "a row" is what a latent writes;
- encoder rows start at norm ``ENCODER_INIT_SCALE`` (small first
  reconstructions: otherwise the first steps push most pre-activations
  negative, L0 collapses below k and AuxK, ReLU'd, cannot revive them);
- AuxK on dead latents for TopK/BatchTopK (Gao et al. 2024: k_aux = d/2,
  coefficient 1/32, residual-normalised);
- b_dec at the geometric median of the first batch (or the store's mean);
- scalar normalisation of input and target, applied inside and undone in
  decoding, so callers only ever see model units: a median row has norm
  sqrt(d) (``robust_scales``, from the first batch). Scaling by the mean
  squared norm instead let the ~3% massive rows of SmolLM2's layer-2 MLP
  output (E||y||^2 = 7843 against a median ||y||^2 of 312) shrink every other
  row 5x: TopK/BatchTopK/JumpReLU transcoders there then kept only 18/20/7 of
  k=32 latents positive at eval and lost to the neurons; with the median
  scale they evaluate at L0 32/34/38 and single-layer ΔCE 0.091/0.105/0.104
  against 0.123/0.124/0.153 (neurons 0.113; 100k tokens, 2304 latents).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from pipeline.core.errors import UserError
import pipeline.methods.collective as collective
from pipeline.methods.sparsity import SPARSITY, SparsitySettings

ENCODER_INIT_SCALE = 0.1  # W_enc rows start at norm 0.1 (Conerly et al. 2024 start W_dec there)
B_DEC_INITS = ("mean", "geometric_median")
ENCODER_INITS = ("linear", "random")
DECODER_INITS = ("random", "rkcnn")  # rkcnn: ``pipeline.methods.rkcnn`` (INIT=rkcnn)
RKCNN_SCORES = ("kurtosis", "variance_ratio")
# Fields added after checkpoints existed: left out of ``to_dict`` (and so of the staleness
# hash) while they hold these defaults, so every checkpoint trained before them stays current.
LATER_FIELDS = {"decoder_init": "random", "rkcnn_fraction": 0.5, "rkcnn_dims": 8, "rkcnn_score": "kurtosis"}
# Where the linear init helps (same tokens and seeds; SmolLM2, 2304 latents): TopK k=8 layer 0
# held-out FVU 0.328 -> 0.236 (200k tokens), layer 1 k=32 dead 3.2% -> 0.2% at equal FVU.
# BatchTopK gained on layer 0 (0.334 -> 0.185) but lost badly on layer 2 (FVU on the
# non-massive rows 0.51 -> 0.90, 400k tokens, with the cap-weighted fit too): its batch-wide
# selection gives the rows whose linear prediction is large, the massive ones, most of the
# batch's budget, where TopK's per-row budget is immune. JumpReLU and vanilla, whose
# thresholds and penalty set who fires, did worse with it (JumpReLU k=8 layer 2: 34% dead
# against 16%; k=32 layer 1 FVU 0.415 against 0.378). So TopK only.
LINEAR_INIT_VARIANTS = ("topk",)


@dataclass(frozen=True)
class CoderConfig:
    """Fields every coder has; ``method`` is the discriminator (fixed per subclass)."""

    method: str = ""
    variant: str = "topk"  # sparsity piece: topk | batchtopk | jumprelu | vanilla
    k: int = 32  # k (topk/batchtopk) or target L0 (jumprelu/vanilla); per source layer for a CLT
    d_in: int = 0
    d_out: int = 0
    n_latents: int = 0  # per source layer for a CLT
    input_hook: str = "mlp_in"
    target_hook: str = "mlp_out"
    normalize: bool = True
    aux_k: int = 0  # 0: d_out // 2 (Gao et al. 2024)
    # Gao et al. use 1/32 over billions of tokens; in runs of a few hundred steps the
    # dead latents must come back within the run: on SmolLM2 layer 1 (TopK k=32, 200k
    # tokens, batch 1024) 1/32 left 23% dead, 0.5 9%, 2 3%, at equal held-out FVU.
    aux_coef: float = 2.0
    seed: int = 0  # weight init
    # b_dec starts at the target's mean (store statistics) or at the geometric
    # median of the first batch, which the ~3% massive rows cannot drag away.
    b_dec_init: str = "geometric_median"
    # Weight each row's squared error by min(1, (massive_norm / ||y||)^2) (``losses.capped_mse``).
    cap_massive_rows: bool = True
    aux_capped: bool = True  # AuxK rows weighted like the main loss's (``losses.auxk_loss``)
    # "linear": a transcoder's encoder rows start at W_dec A^T, A the ridge map x -> y of the
    # first batch, with pre-activations centred (``linear_tied_encoder``); "random": unit rows;
    # "" picks by variant (``LINEAR_INIT_VARIANTS``).
    encoder_init: str = ""
    settings: SparsitySettings = field(default_factory=SparsitySettings)
    # "random": unit rows; "rkcnn": a fraction of the decoder rows (and, tied, their encoder
    # rows) from the best-scoring random subspace probes of the target (``pipeline.methods.rkcnn``).
    decoder_init: str = "random"
    rkcnn_fraction: float = 0.5  # of the latents initialised by RkCNN
    rkcnn_dims: int = 8  # m: activation dimensions per random probe
    rkcnn_score: str = "kurtosis"  # how a probe's principal direction is scored: kurtosis | variance_ratio

    METHOD = ""  # the subclass's discriminator value

    def __post_init__(self):
        if not self.method:
            object.__setattr__(self, "method", self.METHOD)
        if self.method != self.METHOD:
            raise UserError(f"a {type(self).__name__} has method={self.METHOD!r}, got {self.method!r}")
        if isinstance(self.settings, dict):
            object.__setattr__(self, "settings", SparsitySettings(**self.settings))
        if self.variant not in SPARSITY:
            raise UserError(f"unknown MODEL sparsity '{self.variant}'; choose one of {', '.join(SPARSITY)}")
        for name in ("d_in", "d_out", "n_latents"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.k < self.k_limit:
            raise UserError(f"K={self.k} is out of range: it must satisfy 0 < K < LATENTS={self.k_limit}")
        if self.b_dec_init not in B_DEC_INITS:
            raise UserError(f"b_dec_init must be one of {', '.join(B_DEC_INITS)}, got {self.b_dec_init!r}")
        if not self.encoder_init:
            object.__setattr__(self, "encoder_init", "linear" if self.variant in LINEAR_INIT_VARIANTS else "random")
        if self.encoder_init not in ENCODER_INITS:
            raise UserError(f"encoder_init must be one of {', '.join(ENCODER_INITS)}, got {self.encoder_init!r}")
        if self.aux_k < 0 or self.aux_coef < 0:
            raise UserError(f"aux_k and aux_coef must be >= 0, got {self.aux_k}, {self.aux_coef}")
        if self.decoder_init not in DECODER_INITS:
            raise UserError(f"unknown INIT {self.decoder_init!r}; choose one of {', '.join(DECODER_INITS)}")
        if not 0 < self.rkcnn_fraction <= 1 or self.rkcnn_dims < 1:  # probes wider than d_out use all of it
            raise UserError(f"rkcnn_fraction must be in (0, 1] and rkcnn_dims >= 1, got {self.rkcnn_fraction}, {self.rkcnn_dims}")
        if self.rkcnn_score not in RKCNN_SCORES:
            raise UserError(f"rkcnn_score must be one of {', '.join(RKCNN_SCORES)}, got {self.rkcnn_score!r}")

    @property
    def k_limit(self) -> int:
        """K must be below this (the trained width; a Matryoshka prefix keeps its parent's K)."""
        return self.n_latents

    @property
    def k_aux(self) -> int:
        return self.aux_k or self.d_out // 2

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}


@torch.no_grad()
def robust_scales(input_scale: Tensor, target_scale: Tensor, x: Tensor, y: Tensor, d_in: int, d_out: int) -> float:
    """Set the scales so a median row of ``x`` and of ``y`` has norm sqrt(d) (in place);
    return the factor by which the target scale changed (to carry ``b_dec`` along)."""
    before = float(target_scale)
    input_scale.fill_(d_in ** 0.5 / float(x.float().norm(dim=-1).median().clamp_min(1e-12)))
    target_scale.fill_(d_out ** 0.5 / float(y.float().norm(dim=-1).median().clamp_min(1e-12)))
    return float(target_scale) / before


@torch.no_grad()
def linear_tied_encoder(x: Tensor, y: Tensor, W_dec: Tensor, weight: Tensor | None = None,
                        ridge: float = 1e-2) -> tuple[Tensor, Tensor]:
    """The transcoder's analogue of the tied init of an SAE: encoder rows ``W_dec A^T``
    (unit norm), ``A`` the ridge regression of centred ``y`` on centred ``x``, so a latent
    starts reading the input direction that linearly predicts its own output direction;
    the bias centres the pre-activations on the batch mean. ``weight``: per-row weights of
    the fit (the loss's massive-row cap weights; unweighted, a few massive rows set A, and
    BatchTopK on SmolLM2 layer 2 then spent its batch budget on them: FVU 0.90 on the other
    rows against 0.51 with random rows). Returns (W_enc, b_enc).

    An SAE (A = I) starts tied already. Random encoder rows on uncentred inputs leave
    the latents that point away from the input mean below the top k from the first
    step: on SmolLM2 layer 0 (TopK k=8, 4608 latents, 200k tokens) 45% of latents
    were dead at the end and held-out FVU was 0.304; centring alone gave 44% / 0.271;
    this init 33% / 0.232. Layer 1, k=32, 2304 latents: dead 3.2% -> 0.2%, FVU equal."""
    w = torch.ones(len(x), device=x.device) if weight is None else weight
    w = (w / w.sum())[:, None]
    mean = (w * x).sum(0)
    xc, yc = x - mean, y - (w * y).sum(0)
    gram = xc.T @ (w * xc)
    gram.diagonal().add_(ridge * float(gram.diagonal().mean()))
    A = torch.linalg.solve(gram, xc.T @ (w * yc))  # [d_in, d_out]: x A ~ y
    W = W_dec @ A.T
    W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return W, -(W @ mean)


def unit_rows(gen: torch.Generator, n: int, d: int) -> Tensor:
    w = torch.randn(n, d, generator=gen)
    return w / w.norm(dim=1, keepdim=True)


class SparseCoder(nn.Module):
    """Shared Trainable machinery. Subclasses hold ``W_dec`` as a parameter or a
    list of them (``decoders()``), ``sparsity`` pieces, and a ``tokens_since_fired``
    buffer of shape [..., n_latents]."""

    family = ""  # recorded in checkpoints; the MethodSpec name

    def decoders(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def sparsity_pieces(self) -> list[nn.Module]:
        raise NotImplementedError

    # ----- the decoder constraint -------------------------------------------
    def after_backward(self) -> None:
        self.project_decoder_grad()

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder row."""
        for w in self.decoders():
            if w.grad is not None:
                g, row = w.grad.flatten(1), w.flatten(1)
                g -= (g * row).sum(1, keepdim=True) * row

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        for w in self.decoders():
            norms = w.flatten(1).norm(dim=1).clamp_min(1e-12)
            w /= norms.view(-1, *([1] * (w.dim() - 1)))

    # ----- firing and dead latents -------------------------------------------
    @torch.no_grad()
    def record_firing(self, fired: list[Tensor], n_tokens: int) -> None:
        """``fired``: one [n_latents] bool mask per sparsity piece (source layer)."""
        counts = self.tokens_since_fired.view(len(fired), -1)
        counts += n_tokens  # tokens of the global batch
        for row, mask in zip(counts, collective.any_rank(torch.stack(fired))):
            row[mask] = 0

    def dead_mask(self, window_tokens: int) -> Tensor:
        return self.tokens_since_fired >= window_tokens

    def sync_state(self) -> list[Tensor]:
        """Firing counts and each sparsity piece's buffers (threshold, controller)."""
        return [self.tokens_since_fired, *(b for piece in self.sparsity_pieces() for b in piece.buffers())]

    def extra_config(self) -> dict[str, float]:
        raise NotImplementedError

    # ----- inference thresholds set on training rows after training ---------------
    def calibration_preacts(self, x) -> list[Tensor]:
        """Model-unit inputs -> one [rows, n_latents] pre-activation tensor per sparsity piece."""
        raise NotImplementedError

    def start_calibration(self):
        """Calibrators for every sparsity piece, or None when the variant has no threshold to set."""
        calibs = [piece.calibrator() for piece in self.sparsity_pieces()]
        return None if any(c is None for c in calibs) else calibs

    @torch.no_grad()
    def add_calibration(self, calibs, x) -> None:
        for calib, piece, pre in zip(calibs, self.sparsity_pieces(), self.calibration_preacts(x)):
            calib.add(piece.calibration_scores(pre))

    def next_calibration_pass(self, calibs) -> None:
        for calib in calibs:
            calib.next_pass()

    @torch.no_grad()
    def finish_calibration(self, calibs) -> dict:
        shifts = []
        for p, (piece, calib) in enumerate(zip(self.sparsity_pieces(), calibs)):
            shift = piece.calibrate_inference(calib)
            if shift is not None:
                self.encoder_bias(p).add_(shift)
                shifts.append(shift)
        out = {"rows": calibs[0].rows, "exact": all(c.exact for c in calibs)}
        return out | ({"encoder_bias_shift": shifts} if shifts else {})

    def encoder_bias(self, piece: int) -> Tensor:
        """The encoder bias [n_latents] that sparsity piece ``piece`` reads."""
        raise NotImplementedError
