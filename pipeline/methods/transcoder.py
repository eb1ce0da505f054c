"""Per-layer transcoders and SAEs: one sparse coder from an input hook to a target hook.

An SAE is the transcoder whose target is its input. The sparsity variant is a
swappable piece (``pipeline.methods.sparsity``); initialisation, the decoder
constraint, AuxK and normalisation are shared (``pipeline.methods.coder``).

Massive activations: in SmolLM2 ~3% of MLP-output rows have norms >5x the
median and carry >90% of the variance. The loss keeps every row (the model
relies on them being right) but caps a massive row's error
(``losses.capped_mse``), and every metric is also reported on the rows whose
target norm is below ``massive_norm`` (5x the median target norm, measured on
the first training batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from pipeline.core.errors import UserError
from pipeline.methods.base import (MethodSpec, StepOutput, TrainJob, TrainRequest, member_seed, one_per_layer,
                                   parameter_count)
from pipeline.methods.codes import Codes
from pipeline.methods.coder import (ENCODER_INIT_SCALE, CoderConfig, SparseCoder, linear_tied_encoder,
                                   robust_scales, unit_rows)
from pipeline.methods.losses import MASSIVE_FACTOR, auxk_loss, cap_weights, capped_mse, fvu_metrics, geometric_median
from pipeline.methods.rkcnn import rkcnn_directions
from pipeline.methods.sparsity import SPARSITY, make_sparsity

KINDS = ("transcoder", "sae")
KIND_HOOKS = {"transcoder": ("mlp_in", "mlp_out"), "sae": ("mlp_out", "mlp_out")}


@dataclass(frozen=True)
class TranscoderConfig(CoderConfig):
    kind: str = "transcoder"
    layer: int = 0

    METHOD = "transcoder"

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in KINDS:
            raise UserError(f"unknown KIND '{self.kind}'; choose one of {', '.join(KINDS)}")
        if self.kind == "sae" and (self.input_hook != self.target_hook or self.d_in != self.d_out):
            raise UserError("an SAE reconstructs its input: input and target hook (and d) must be the same")

    @property
    def name(self) -> str:
        return f"{self.variant}-k{self.k}-L{self.layer}"


def init_tag(decoder_init: str) -> str:
    """What a non-default INIT adds to checkpoint and method names ("" for the default)."""
    return "" if decoder_init == "random" else f"-{decoder_init}"


class Transcoder(SparseCoder):
    """encode / decode / forward in model units; the Trainable hooks for ``fit``."""

    family = "transcoder"

    def __init__(self, cfg: TranscoderConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec = unit_rows(gen, cfg.n_latents, cfg.d_out)
        # SAEs start tied (Conerly et al. 2024; Gao et al. 2024).
        W_enc = W_dec.clone() if cfg.kind == "sae" else unit_rows(gen, cfg.n_latents, cfg.d_in)
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

    def decoders(self) -> list[nn.Parameter]:
        return [self.W_dec]

    def sparsity_pieces(self) -> list[nn.Module]:
        return [self.sparsity]

    # ----- set-up from data ------------------------------------------------
    @torch.no_grad()
    def init_from_stats(self, input_stats: dict, target_stats: dict) -> None:
        """Scales from the store's mean squared norms; b_dec at the target mean."""
        if self.cfg.normalize:
            self.input_scale.fill_((self.cfg.d_in / input_stats["mean_sq_norm"]) ** 0.5)
            self.target_scale.fill_((self.cfg.d_out / target_stats["mean_sq_norm"]) ** 0.5)
        self.b_dec.copy_(torch.tensor(target_stats["mean"], dtype=torch.float32, device=self.b_dec.device) * self.target_scale)

    @torch.no_grad()
    def init_from_batch(self, x: Tensor, y: Tensor) -> None:
        """Data-dependent pieces of the init: robust scales, massive-row threshold, b_dec, JumpReLU thresholds."""
        median = y.float().norm(dim=-1).median()
        self.massive_norm.fill_(MASSIVE_FACTOR * median)
        if self.cfg.normalize:
            self.b_dec.mul_(robust_scales(self.input_scale, self.target_scale, x, y, self.cfg.d_in, self.cfg.d_out))
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(y.float() * self.target_scale))
        if self.cfg.decoder_init == "rkcnn":
            self._init_rkcnn(x, y)
        if self.cfg.kind == "transcoder" and self.cfg.encoder_init == "linear":
            yn = y.float() * self.target_scale
            cap = self.massive_norm * self.target_scale if self.cfg.cap_massive_rows else None
            W, b = linear_tied_encoder(x.float() * self.input_scale, yn, self.W_dec, cap_weights(yn, cap))
            self.W_enc.copy_(W * ENCODER_INIT_SCALE)
            self.b_enc.copy_(b * ENCODER_INIT_SCALE)
        calibrate = getattr(self.sparsity, "calibrate", None)
        if calibrate is not None:
            calibrate(torch.addmm(self.b_enc, x.float() * self.input_scale, self.W_enc.T))

    @torch.no_grad()
    def _init_rkcnn(self, x: Tensor, y: Tensor) -> None:
        """The first ``rkcnn_fraction`` of the latents: decoder rows from RkCNN probes of the
        normalised target (``pipeline.methods.rkcnn``), encoder rows tied to them."""
        c = self.cfg
        n = max(1, round(c.rkcnn_fraction * c.n_latents))
        gen = torch.Generator().manual_seed(c.seed + 1)
        yn = y.float() * self.target_scale
        self.W_dec[:n] = rkcnn_directions(yn, n, c.rkcnn_dims, c.rkcnn_score, gen).to(self.W_dec.device)
        if c.kind == "sae":
            self.W_enc[:n] = self.W_dec[:n] * ENCODER_INIT_SCALE
        elif c.encoder_init == "random":  # "linear" re-derives every encoder row from W_dec next
            cap = self.massive_norm * self.target_scale if c.cap_massive_rows else None
            W, b = linear_tied_encoder(x.float() * self.input_scale, yn, self.W_dec[:n], cap_weights(yn, cap))
            self.W_enc[:n] = W * ENCODER_INIT_SCALE
            self.b_enc[:n] = b * ENCODER_INIT_SCALE

    # ----- inference ---------------------------------------------------------
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

    def reconstruct(self, acts: Tensor, x: Tensor | None = None) -> Tensor:
        """What replaces the target, from latents (and the input, for a skip term)."""
        return self.decode(acts)

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(self.encode(x), x)

    # ----- training -------------------------------------------------------
    def _predict(self, xn: Tensor, codes: Codes) -> Tensor:
        """Normalised prediction from normalised inputs and their codes."""
        return codes.decode(self.W_dec) + self.b_dec

    def training_step(self, x: Tensor, y: Tensor, dead: Tensor | None, with_metrics: bool = True) -> StepOutput:
        """Loss (and metrics, which cost a few passes) on one batch; x, y in model units."""
        xn = x.to(torch.float32, copy=True).mul_(self.input_scale)  # never scale the shared batch
        yn = y.to(torch.float32, copy=True).mul_(self.target_scale)
        codes = self.sparsity.encode(xn, self.W_enc, self.b_enc)
        cap = self.massive_norm * self.target_scale if self.cfg.cap_massive_rows else None
        recon, err, prefix_metrics = self._recon_loss(xn, yn, codes, cap)
        penalty = self.sparsity.penalty(codes, self.W_dec)
        aux = torch.zeros((), device=x.device)
        if self.sparsity.uses_auxk and dead is not None and self.training:
            aux = auxk_loss(codes.preacts, dead, xn, self.W_enc, self.b_enc, self.W_dec, err.detach(),
                            self.cfg.k_aux, self.cfg.aux_coef, self.sparsity.matmul_dtype(),
                            self._aux_weight(yn, cap))
        out = StepOutput(recon + penalty + aux, recon, penalty, aux, codes)
        if with_metrics:
            with torch.no_grad():
                out.metrics = {"l0": codes.l0(), **fvu_metrics(err, yn, self.massive_norm * self.target_scale),
                               "mse": err.pow(2).sum(-1).mean() / self.target_scale**2,  # model units
                               **prefix_metrics}
        return out

    def _recon_loss(self, xn: Tensor, yn: Tensor, codes: Codes, cap: Tensor | None) -> tuple[Tensor, Tensor, dict]:
        """(reconstruction loss, the whole dictionary's error, extra metrics) of one batch."""
        err = self._predict(xn, codes) - yn
        return capped_mse(err, yn, cap), err, {}

    def _aux_weight(self, yn: Tensor, cap: Tensor | None) -> Tensor | None:
        w = cap_weights(yn, cap) if self.cfg.aux_capped else None
        return None if w is None else w[:, None]

    @torch.no_grad()
    def after_step(self, out: StepOutput, n_tokens: int) -> None:
        self.normalize_decoder()
        self.sparsity.update(out.codes)
        self.record_firing([out.codes.fired()], n_tokens)

    def extra_config(self) -> dict[str, float]:
        return self.sparsity.extra_config()

    def encoder_bias(self, piece: int) -> Tensor:
        return self.b_enc

    @torch.no_grad()
    def calibration_preacts(self, x: Tensor) -> list[Tensor]:
        xn = x.reshape(-1, x.shape[-1]).float() * self.input_scale
        return [torch.addmm(self.b_enc, xn, self.W_enc.T)]

    def config_dict(self) -> dict:
        return {"family": self.family, "config": self.cfg.to_dict(), **self.extra_config(),
                "input_scale": float(self.input_scale), "target_scale": float(self.target_scale),
                "massive_norm": float(self.massive_norm)}


class LayerwiseDecomposition:
    """Per-layer transcoders (or SAEs) of one configuration, as one ``Decomposition``."""

    def __init__(self, modules: dict[int, Transcoder]):
        if not modules:
            raise UserError("no dictionaries to combine")
        self.modules = dict(sorted(modules.items()))
        self.layers = tuple(self.modules)
        hooks = {m.cfg.input_hook for m in self.modules.values()}
        if len(hooks) != 1:
            raise UserError(f"checkpoints of one configuration read different hooks {sorted(hooks)}")
        self.input_hook = hooks.pop()

    def sources(self, layer: int) -> tuple[int, ...]:
        return (layer,)

    def n_latents(self, layer: int) -> int:
        return self.modules[layer].cfg.n_latents

    def encode_layer(self, layer: int, x: Tensor) -> Tensor:
        return self.modules[layer].encode(x)

    def decode_layer(self, layer: int, acts: dict[int, Tensor], x: Tensor | None = None) -> Tensor:
        return self.modules[layer].reconstruct(acts[layer], x)


class TranscoderSpec(MethodSpec):
    """Per-layer transcoders and SAEs: MODEL=topk|batchtopk|jumprelu|vanilla, one module per layer and K."""

    name = "transcoder"
    models = {v: v for v in SPARSITY}
    order = 10
    exports = ("saelens", "circuit-tracer")
    module_class: type[Transcoder] = Transcoder
    config_class: type[TranscoderConfig] = TranscoderConfig

    def build(self, config: dict) -> nn.Module:
        return self.module_class(self.config_class(**config["config"]))

    def model_name(self, variant: str) -> str:
        """The MODEL name (and checkpoint name prefix) of this method with ``variant``."""
        return variant

    def jobs(self, request: TrainRequest) -> list[TrainJob]:
        input_hook, target_hook = KIND_HOOKS[request.kind]
        d = request.store.d_model
        jobs = []
        for layer in request.layers:
            for model in request.models:
                for k in request.ks:
                    cfg = self.config_class(variant=self.models[model], k=k, d_in=d, d_out=d,
                                            n_latents=request.n_latents, kind=request.kind, layer=layer,
                                            input_hook=input_hook, target_hook=target_hook,
                                            seed=member_seed(request.seed, model, k, layer),
                                            decoder_init=request.init, **self.extra_fields(request))
                    jobs.append(TrainJob(self.module_class(cfg), (layer, input_hook), (layer, target_hook),
                                         request.out(request.kind, f"{model}{init_tag(request.init)}-k{k}-L{layer}"),
                                         metadata={"lm": request.store.manifest["lm"]}))
        return jobs

    def extra_fields(self, request: TrainRequest) -> dict:
        """Config fields a subclass takes from the request (Matryoshka: its prefixes)."""
        return {}

    def group_key(self, module: nn.Module) -> tuple:
        c = module.cfg
        return (c.kind, c.variant, c.k, c.n_latents, c.decoder_init)

    def combine(self, modules: Sequence[nn.Module]) -> LayerwiseDecomposition:
        return LayerwiseDecomposition(one_per_layer(modules))

    def describe(self, decomposition, modules) -> dict:
        from pipeline.core.layers import layers_label

        c = modules[0].cfg
        model = self.model_name(c.variant) + init_tag(c.decoder_init)
        return {"name": f"{c.kind}-{model}-k{c.k}-n{c.n_latents}-L{layers_label(decomposition.layers)}",
                "label": f"{c.kind} {model}", "family": c.kind, "variant": c.variant, "kind": c.kind, "k": c.k,
                "params": sum(parameter_count(m) for m in modules)}
