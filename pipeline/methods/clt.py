"""Cross-layer transcoder (CLT): per-layer encoders, triangular decoders.

The same encoder family as ``pipeline.methods.transcoder`` (one encoder per layer,
sparsity from ``pipeline.methods.sparsity``), but a latent of source layer i writes to
the MLP outputs of every layer j >= i of the run:

    y_hat_j = b_dec[j] + sum_{i <= j} a_i . W_dec[i][:, j - i]

Layers are addressed by model layer number at the edges (``cfg.layers``,
``encode_layer``, ``decode_layer``, the dicts ``training_loss`` takes) and by
position p = 0..n-1 inside, so LAYERS=0,2,5 works as well as 0-3.

Storage: ``W_dec[p]`` is ``[n_latents, n - p, d_out]``, the per-source layout
circuit-tracer uses, so export (``pipeline.export.circuit_tracer``) is a re-scaling, not a
re-layout.

Choices, and why:

- **Normalisation.** As in ``Transcoder``: each layer's input and target get
  a fixed scalar scale (a median row of the first batch has norm sqrt(d),
  ``coder.robust_scales``), applied inside and undone in ``decode_layer``;
  every metric is in model units. (The figures below were measured when the
  scale came from E||y||^2; the argument holds for either per-layer constant.)
- **Loss: a sum of per-layer normalised MSEs**, sum_j mean((y_hat_j - y_j)^2)
  in each layer's normalised units, i.e. sum_j MSE_j / E||y_j||^2. Raw MSE
  would let the layer with the largest outputs dominate: in SmolLM2 (bbc,
  layers 0-3) E||y||^2 is 2361, 451, 7878, 382; layer 2, whose ~3% massive
  rows carry 92% of its variance, would outweigh layer 3 about 20x. Dividing by a
  fixed per-layer constant from store statistics (not by the batch's
  variance) keeps the loss a deterministic function of the batch, and makes a
  CLT whose cross-layer slices are zero have exactly the loss (and
  gradients) of the per-layer transcoders it contains. E||y||^2 rather than
  the variance: the two differ by a per-layer constant (E||y||^2 / Var = 1.26,
  1.13, 1.05, 1.03 there), and b_dec (initialised at the median) takes the mean
  from the first step. FVU is what we report.
  Within a layer the loss is still plain MSE over all rows, massive rows
  included, as for ``Transcoder`` (the model relies on them); metrics are also
  given on the non-massive rows.
- **Decoder norms: one unit norm per latent over its whole triangular row**,
  the concatenation of its n - p slices ([n - p, d_out] flattened). Per-slice
  unit norms would force every latent to write equally hard to every later
  layer; the concatenated norm lets a latent put its output where it belongs
  and keeps activations comparable across the latents of a source layer (what
  TopK selects on). The decoder-parallel gradient is removed and rows are
  renormalised on the same flattened rows, and the L1 penalty (``vanilla``)
  is weighted by the same concatenated norm (it is handed the flattened rows).
- **Initialisation.** Encoders and the same-layer slice as ``Transcoder``
  (random unit rows); cross-layer slices start at zero, so training starts from
  per-layer transcoders and grows cross-layer writes where the data asks for
  them (their gradient, a_i^T err_j, is not zero).
- **Sparsity per source layer**, one piece of ``pipeline.methods.sparsity`` each
  (TopK, BatchTopK with its own inference threshold, JumpReLU, L1); for the
  penalised variants each layer's controller targets L0 = k. ``k`` is per
  source layer throughout.
- **AuxK.** Dead latents of source layer i learn to explain the residual of the
  layers they can write to (j >= i), normalised by that residual's energy,
  with the coefficient and k_aux of ``Transcoder`` (Gao et al. 2024); one term
  per source layer, summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from pipeline.core.errors import UserError
from pipeline.core.layers import layers_label
from pipeline.methods.base import MethodSpec, ParetoAxes, StepOutput, TrainJob, TrainRequest, member_seed, parameter_count
from pipeline.methods.codes import Codes, DenseCodes
from pipeline.methods.coder import CoderConfig, SparseCoder, robust_scales, unit_rows
from pipeline.methods.losses import MASSIVE_FACTOR, auxk_loss, cap_weights, capped_mse, fvu_metrics, geometric_median
from pipeline.methods.sparsity import SPARSITY, make_sparsity

# MODEL=clt is clt-batchtopk: its inference threshold exports exactly to circuit-tracer.
DEFAULT_SPARSITY = "batchtopk"


@dataclass(frozen=True)
class CLTConfig(CoderConfig):
    layers: tuple[int, ...] = ()

    METHOD = "clt"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        super().__post_init__()
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise UserError(f"CLT layers must be distinct, increasing and >= 0, got {list(self.layers)}")

    @property
    def kind(self) -> str:
        return "clt"

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def name(self) -> str:
        return f"clt-{self.variant}-k{self.k}-L{layers_label(self.layers)}"


class CrossLayerTranscoder(SparseCoder):
    """A ``Decomposition`` and ``Trainable``: per-layer encoders, triangular decoders, model units outside."""

    family = "clt"
    input_hook = "mlp_in"

    def __init__(self, cfg: CLTConfig):
        super().__init__()
        self.cfg = cfg
        n, n_latents = cfg.n_layers, cfg.n_latents
        gen = torch.Generator().manual_seed(cfg.seed)
        encoders, decoders = [], []
        for p in range(n):
            own = unit_rows(gen, n_latents, cfg.d_out)
            enc = unit_rows(gen, n_latents, cfg.d_in)
            dec = torch.zeros(n_latents, n - p, cfg.d_out)
            dec[:, 0] = own
            encoders.append(nn.Parameter(enc))  # unscaled, unlike Transcoder: kept as trained so far
            decoders.append(nn.Parameter(dec))
        self.W_enc = nn.ParameterList(encoders)
        self.b_enc = nn.Parameter(torch.zeros(n, n_latents))
        self.W_dec = nn.ParameterList(decoders)
        self.b_dec = nn.Parameter(torch.zeros(n, cfg.d_out))
        self.sparsity = nn.ModuleList([make_sparsity(cfg.variant, n_latents, cfg.k, cfg.settings) for _ in range(n)])
        self.register_buffer("input_scale", torch.ones(n))
        self.register_buffer("target_scale", torch.ones(n))
        self.register_buffer("massive_norm", torch.full((n,), float("inf")))  # model units, per target layer
        self.register_buffer("tokens_since_fired", torch.zeros(n, n_latents, dtype=torch.int64))
        self._position = {layer: p for p, layer in enumerate(cfg.layers)}
        self.layers = cfg.layers

    def decoders(self) -> list[nn.Parameter]:
        return list(self.W_dec)

    def sparsity_pieces(self) -> list[nn.Module]:
        return list(self.sparsity)

    def position(self, layer: int) -> int:
        if layer not in self._position:
            raise UserError(f"layer {layer} is not one of this CLT's layers {list(self.cfg.layers)}")
        return self._position[layer]

    # ----- set-up from data ------------------------------------------------
    @torch.no_grad()
    def init_from_stats(self, input_stats: dict[int, dict], target_stats: dict[int, dict]) -> None:
        """Per-layer scales from the store's mean squared norms; b_dec at the target means."""
        for p, layer in enumerate(self.cfg.layers):
            if self.cfg.normalize:
                self.input_scale[p] = (self.cfg.d_in / input_stats[layer]["mean_sq_norm"]) ** 0.5
                self.target_scale[p] = (self.cfg.d_out / target_stats[layer]["mean_sq_norm"]) ** 0.5
            self.b_dec[p] = torch.tensor(target_stats[layer]["mean"], dtype=torch.float32, device=self.b_dec.device) * self.target_scale[p]

    @torch.no_grad()
    def init_from_batch(self, x: dict[int, Tensor], y: dict[int, Tensor]) -> None:
        """Robust scales, massive-row thresholds, b_dec at the geometric median, JumpReLU thresholds: per layer."""
        for p, layer in enumerate(self.cfg.layers):
            target = y[layer].float()
            self.massive_norm[p] = MASSIVE_FACTOR * target.norm(dim=-1).median()
            if self.cfg.normalize:
                self.b_dec[p].mul_(robust_scales(self.input_scale[p], self.target_scale[p], x[layer], target,
                                                 self.cfg.d_in, self.cfg.d_out))
            if self.cfg.b_dec_init == "geometric_median":
                self.b_dec[p] = geometric_median(target * self.target_scale[p])
            calibrate = getattr(self.sparsity[p], "calibrate", None)
            if calibrate is not None:
                calibrate(torch.addmm(self.b_enc[p], x[layer].float() * self.input_scale[p], self.W_enc[p].T))

    # ----- the Decomposition contract ---------------------------------------
    def sources(self, layer: int) -> tuple[int, ...]:
        q = self.position(layer)
        return self.cfg.layers[: q + 1]

    def n_latents(self, layer: int) -> int:
        return self.cfg.n_latents

    def _codes(self, p: int, x: Tensor) -> Codes:
        """Codes of source position p for model-unit rows ``x`` [rows, d_in]."""
        return self.sparsity[p].encode(x.float() * self.input_scale[p], self.W_enc[p], self.b_enc[p])

    def encode_layer(self, layer: int, x: Tensor) -> Tensor:
        """Dense latent activations [..., n_latents] of source ``layer`` from its model-unit MLP input."""
        codes = self._codes(self.position(layer), x.reshape(-1, x.shape[-1]))
        return codes.to_dense().reshape(*x.shape[:-1], self.cfg.n_latents)

    def decode_layer(self, layer: int, acts: dict[int, Tensor], x: Tensor | None = None) -> Tensor:
        """Model-unit prediction of ``layer``'s MLP output from the latents of the sources
        i <= layer present in ``acts`` (dense, [..., n_latents] each)."""
        q = self.position(layer)
        sources = sorted((self.position(i), a) for i, a in acts.items() if self.position(i) <= q)
        if not sources:
            raise ValueError(f"decode_layer({layer}) needs the latents of at least one source layer <= {layer}")
        shape = sources[0][1].shape[:-1]
        y = self.b_dec[q]
        for p, a in sources:
            # DenseCodes.decode goes sparse when the latents are (TopK, thresholds), dense otherwise.
            y = y + DenseCodes(a.reshape(-1, self.cfg.n_latents).float()).decode(self.W_dec[p][:, q - p])
        return (y / self.target_scale[q]).reshape(*shape, self.cfg.d_out)

    def forward(self, x: dict[int, Tensor]) -> dict[int, Tensor]:
        """Model-unit predictions of every layer's MLP output from every layer's MLP input."""
        shape = next(iter(x.values())).shape[:-1]
        codes = [self._codes(p, x[layer].reshape(-1, self.cfg.d_in)) for p, layer in enumerate(self.cfg.layers)]
        return {layer: (y / self.target_scale[q]).reshape(*shape, self.cfg.d_out)
                for q, (layer, y) in enumerate(zip(self.cfg.layers, self._predict(codes)))}

    def _predict(self, codes: list[Codes]) -> list[Tensor]:
        """Normalised predictions of each target position from each source's codes.

        One decode per source over its whole flattened triangular row
        ([n_latents, (n - p) * d_out]): the sparse kernels see one wide row
        instead of n - p narrow ones, and the weight gradient is one product.
        """
        n, d = self.cfg.n_layers, self.cfg.d_out
        # unbind, not indexing: its backward stacks the slices' gradients in one
        # op instead of scattering each into a zero tensor of the whole row.
        outs = [c.decode(self.W_dec[p].flatten(1)).view(-1, n - p, d).unbind(1) for p, c in enumerate(codes)]
        preds = []
        for q in range(n):
            y = outs[0][q] + self.b_dec[q]
            for p in range(1, q + 1):
                y = y + outs[p][q - p]
            preds.append(y)
        return preds

    # ----- training -------------------------------------------------------
    def training_step(self, x: dict[int, Tensor], y: dict[int, Tensor], dead: Tensor | None,
                      with_metrics: bool = True) -> StepOutput:
        """Loss (and metrics) on one batch; x, y: {layer: model-unit rows}; ``dead`` [n_layers, n_latents]."""
        layers = self.cfg.layers
        xn = [x[layer].float() * self.input_scale[p] for p, layer in enumerate(layers)]
        yn = [y[layer].float() * self.target_scale[q] for q, layer in enumerate(layers)]
        codes = [self.sparsity[p].encode(xn[p], self.W_enc[p], self.b_enc[p]) for p in range(len(layers))]
        # per target layer: MSE with massive rows capped, as a transcoder's, so a CLT with
        # zero cross-layer slices has exactly its per-layer transcoders' loss
        caps = [self.massive_norm[q] * self.target_scale[q] if self.cfg.cap_massive_rows else None
                for q in range(len(layers))]
        recon, errs = self._recon_loss(codes, yn, caps)
        penalty = torch.stack([self.sparsity[p].penalty(c, self.W_dec[p].flatten(1)) for p, c in enumerate(codes)]).sum()
        aux = self._auxk(xn, errs, codes, dead, yn, caps)
        out = StepOutput(recon + penalty + aux, recon, penalty, aux, dict(zip(layers, codes)))
        if with_metrics:
            out.metrics = self._metrics(errs, yn, codes)
        return out

    def _recon_loss(self, codes: list[Codes], yn: list[Tensor], caps: list[Tensor | None]) -> tuple[Tensor, list[Tensor]]:
        """(reconstruction loss summed over target layers, each target layer's error)."""
        errs = [pred - target for pred, target in zip(self._predict(codes), yn)]
        return torch.stack([capped_mse(err, target, cap) for err, target, cap in zip(errs, yn, caps)]).sum(), errs

    @torch.no_grad()
    def _metrics(self, errs: list[Tensor], yn: list[Tensor], codes: list[Codes]) -> dict[str, Tensor]:
        metrics: dict[str, Tensor] = {}
        per: dict[str, list[Tensor]] = {"fvu": [], "fvu_normal": [], "massive_frac": [], "mse": [], "l0": []}
        for q, layer in enumerate(self.cfg.layers):
            ts = self.target_scale[q]
            values = fvu_metrics(errs[q], yn[q], self.massive_norm[q] * ts)
            values["mse"] = errs[q].pow(2).sum(-1).mean() / ts**2  # model units
            values["l0"] = codes[q].l0()  # of source layer q
            for name, value in values.items():
                metrics[f"{name}_L{layer}"] = value
                per[name].append(value)
        # Headline numbers: means over layers, so no layer's scale dominates them (as in the loss).
        return metrics | {name: torch.stack(v).nanmean() for name, v in per.items()}

    def _auxk(self, xn: list[Tensor], errs: list[Tensor], codes: list[Codes], dead: Tensor | None,
              yn: list[Tensor], caps: list[Tensor | None]) -> Tensor:
        zero = torch.zeros((), device=xn[0].device)
        if not self.sparsity[0].uses_auxk or dead is None or not self.training:
            return zero
        terms = [zero]
        for p, c in enumerate(codes):
            if dead[p].any():
                residual = torch.cat([e.detach() for e in errs[p:]], dim=1)  # the layers source p writes to
                terms.append(auxk_loss(c.preacts, dead[p], xn[p], self.W_enc[p], self.b_enc[p],
                                       self.W_dec[p].flatten(1), residual, self.cfg.k_aux, self.cfg.aux_coef,
                                       self.sparsity[p].matmul_dtype(), self._aux_weight(yn[p:], caps[p:])))
        return torch.stack(terms).sum()

    def _aux_weight(self, yn: list[Tensor], caps: list[Tensor | None]) -> Tensor | None:
        """Each target layer's cap weights over its slice of the concatenated residual."""
        ws = [cap_weights(y, c) for y, c in zip(yn, caps)] if self.cfg.aux_capped else []
        if all(w is None for w in ws):
            return None
        return torch.cat([(torch.ones(len(y), device=y.device) if w is None else w)[:, None].expand(-1, y.shape[1])
                          for y, w in zip(yn, ws)], dim=1)

    @torch.no_grad()
    def after_step(self, out: StepOutput, n_tokens: int) -> None:
        self.normalize_decoder()
        for layer, piece in zip(self.cfg.layers, self.sparsity):
            piece.update(out.codes[layer])
        self.record_firing([out.codes[layer].fired() for layer in self.cfg.layers], n_tokens)

    def encoder_bias(self, piece: int) -> Tensor:
        return self.b_enc[piece]

    @torch.no_grad()
    def calibration_preacts(self, x: dict[int, Tensor]) -> list[Tensor]:
        return [torch.addmm(self.b_enc[p], x[layer].reshape(-1, self.cfg.d_in).float() * self.input_scale[p], self.W_enc[p].T)
                for p, layer in enumerate(self.cfg.layers)]

    def extra_config(self) -> dict[str, float]:
        return {f"{name}_L{layer}": value for layer, piece in zip(self.cfg.layers, self.sparsity)
                for name, value in piece.extra_config().items()}

    def config_dict(self) -> dict:
        return {"family": self.family, "config": self.cfg.to_dict(), **self.extra_config(),
                "input_scale": self.input_scale.tolist(), "target_scale": self.target_scale.tolist(),
                "massive_norm": self.massive_norm.tolist()}


class CLTSpec(MethodSpec):
    """MODEL=clt (BatchTopK) or clt-topk|clt-batchtopk|clt-jumprelu|clt-vanilla: one CLT over LAYERS per K."""

    name = "clt"
    models = {"clt": DEFAULT_SPARSITY, **{f"clt-{v}": v for v in SPARSITY}}
    order = 30
    exports = ("circuit-tracer",)

    def build(self, config: dict) -> nn.Module:
        return CrossLayerTranscoder(CLTConfig(**config["config"]))

    def jobs(self, request: TrainRequest) -> list[TrainJob]:
        if request.kind != "transcoder":
            raise UserError("MODEL=clt maps each layer's mlp_in to the mlp_out of that and later layers; use KIND=transcoder")
        if request.init != "random":
            raise UserError(f"INIT={request.init} is for per-layer SAEs and transcoders; a CLT starts from random rows")
        label = layers_label(request.layers)
        jobs = []
        for variant in dict.fromkeys(self.models[m] for m in request.models):  # clt and clt-batchtopk are one
            for k in request.ks:
                cfg = CLTConfig(variant=variant, k=k, d_in=request.store.d_model, d_out=request.store.d_model,
                                n_latents=request.n_latents, layers=tuple(request.layers),
                                seed=member_seed(request.seed, f"clt-{variant}", k, label))
                jobs.append(TrainJob(CrossLayerTranscoder(cfg), tuple((layer, cfg.input_hook) for layer in request.layers),
                                     tuple((layer, cfg.target_hook) for layer in request.layers),
                                     request.out("clt", cfg.name), metadata={"lm": request.store.manifest["lm"]}))
        return jobs

    def combine(self, modules: Sequence[nn.Module]) -> CrossLayerTranscoder:
        (clt,) = modules
        return clt

    def describe(self, decomposition, modules) -> dict:
        c = modules[0].cfg
        return {"name": f"clt-{c.variant}-k{c.k}-n{c.n_latents}-L{layers_label(c.layers)}", "label": f"clt {c.variant}",
                "family": "clt", "variant": c.variant, "kind": "clt", "k": c.k, "params": parameter_count(modules[0])}

    def pareto_axes(self, d_model: int, layers: Sequence[int], l0: dict[int, float], mode: str,
                    weights_per_unit: int | None = None) -> ParetoAxes:
        """A latent of source i serves the n - i layers at and after it: components sum_i l0_i (n - i) / n.
        Parameters: an encoder row and n - i decoder rows (all layers); in single-layer mode, replacing
        layer j touches the sources i <= j, one decoder row each (mean over j)."""
        layers = list(layers)
        n, d = len(layers), d_model
        components = sum(l0[layer] * (n - p) / n for p, layer in enumerate(layers))
        if mode == "all_layers":
            params = sum(l0[layer] * (d + (n - p) * d) for p, layer in enumerate(layers))
        else:
            params = sum(sum(l0[i] * 2 * d for i in layers[: q + 1]) for q in range(n)) / n
        return ParetoAxes(components, params)
