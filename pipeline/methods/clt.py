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

- **Normalisation.** As in ``Dictionary``: each layer's input and target get
  a fixed scalar scale (E||x||^2 = d, from the store's ``mean_sq_norm``),
  applied inside and undone in ``decode_layer``; every metric is in model
  units.
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
  included, as for ``Dictionary`` (the model relies on them); metrics are also
  given on the non-massive rows.
- **Decoder norms: one unit norm per latent over its whole triangular row**,
  the concatenation of its n - p slices ([n - p, d_out] flattened). Per-slice
  unit norms would force every latent to write equally hard to every later
  layer; the concatenated norm lets a latent put its output where it belongs
  and keeps activations comparable across the latents of a source layer (what
  TopK selects on). The decoder-parallel gradient is removed and rows are
  renormalised on the same flattened rows, and the L1 penalty (``vanilla``)
  is weighted by the same concatenated norm (it is handed the flattened rows).
- **Initialisation.** Encoders and the same-layer slice as ``Dictionary``
  (random unit rows); cross-layer slices start at zero, so training starts from
  per-layer transcoders and grows cross-layer writes where the data asks for
  them (their gradient, a_i^T err_j, is not zero).
- **Sparsity per source layer**, one piece of ``pipeline.methods.sparsity`` each
  (TopK, BatchTopK with its own inference threshold, JumpReLU, L1); for the
  penalised variants each layer's controller targets L0 = k. ``k`` is per
  source layer throughout.
- **AuxK.** Dead latents of source layer i learn to explain the residual of the
  layers they can write to (j >= i), normalised by that residual's energy,
  with the coefficient and k_aux of ``Dictionary`` (Gao et al. 2024); one term
  per source layer, summed.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import checkpoint
from pipeline.methods.transcoder import MASSIVE_FACTOR, fvu_metrics, geometric_median
from pipeline.core.errors import UserError
from pipeline.methods.sparsity import SPARSITY, Codes, SelectedPreacts, SparseDecode, SparsePattern, SparsitySettings, make_sparsity
from pipeline.train.loop import MEMBER_BUILDERS, Member

# MODEL=clt is clt-batchtopk: its inference threshold exports exactly to circuit-tracer (pipeline.export.circuit_tracer).
DEFAULT_SPARSITY = "batchtopk"


@dataclass(frozen=True)
class CLTConfig:
    variant: str  # sparsity piece per source layer: topk | batchtopk | jumprelu | vanilla
    k: int  # per source layer: k (topk/batchtopk) or target L0 (jumprelu/vanilla)
    d_in: int
    d_out: int
    n_latents: int  # per source layer
    layers: tuple[int, ...]
    input_hook: str = "mlp_in"
    target_hook: str = "mlp_out"
    normalize: bool = True
    aux_k: int = 0  # 0: d_out // 2 (Gao et al. 2024), per source layer
    aux_coef: float = 1 / 32  # Gao et al. 2024
    seed: int = 0
    b_dec_init: str = "geometric_median"  # or "mean"; see DictionaryConfig
    settings: SparsitySettings = field(default_factory=SparsitySettings)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        if isinstance(self.settings, dict):
            object.__setattr__(self, "settings", SparsitySettings(**self.settings))
        if self.variant not in SPARSITY:
            raise UserError(f"unknown CLT sparsity '{self.variant}'; choose one of {', '.join(SPARSITY)}")
        for name in ("d_in", "d_out", "n_latents"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.k < self.n_latents:
            raise UserError(f"K={self.k} is out of range: it must satisfy 0 < K < LATENTS={self.n_latents}")
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise UserError(f"CLT layers must be distinct, increasing and >= 0, got {list(self.layers)}")
        if self.b_dec_init not in ("mean", "geometric_median"):
            raise UserError(f"b_dec_init must be mean or geometric_median, got {self.b_dec_init!r}")
        if self.aux_k < 0 or self.aux_coef < 0:
            raise UserError(f"aux_k and aux_coef must be >= 0, got {self.aux_k}, {self.aux_coef}")

    @property
    def kind(self) -> str:
        return "clt"

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def name(self) -> str:
        return f"clt-{self.variant}-k{self.k}-L{layers_label(self.layers)}"

    def to_dict(self) -> dict:
        return asdict(self)


def layers_label(layers) -> str:
    """(0, 1, 2, 3) -> '0-3'; (0, 2, 5) -> '0_2_5' (no commas: the label is a path and a Make word)."""
    layers = list(layers)
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return "_".join(map(str, layers))


class LayerSparsity(nn.ModuleList):
    """One sparsity piece per source layer, driven as one by ``fit``."""

    def __init__(self, variant: str, layers: tuple[int, ...], n_latents: int, k: int, settings: SparsitySettings):
        super().__init__([make_sparsity(variant, n_latents, k, settings) for _ in layers])
        self.layers = layers

    @property
    def uses_auxk(self) -> bool:
        return self[0].uses_auxk

    @torch.no_grad()
    def update(self, codes: dict[int, Codes]) -> None:
        for layer, piece in zip(self.layers, self):
            piece.update(codes[layer])

    def extra_config(self) -> dict[str, float]:
        return {f"{name}_L{layer}": value for layer, piece in zip(self.layers, self)
                for name, value in piece.extra_config().items()}


class CrossLayerTranscoder(nn.Module):
    """``encode_layer`` / ``decode_layer`` / ``forward`` in model units; ``training_loss`` for ``fit``."""

    family = "clt"

    def __init__(self, cfg: CLTConfig):
        super().__init__()
        self.cfg = cfg
        n, n_latents = cfg.n_layers, cfg.n_latents
        gen = torch.Generator().manual_seed(cfg.seed)
        encoders, decoders = [], []
        for p in range(n):
            own = torch.randn(n_latents, cfg.d_out, generator=gen)
            own /= own.norm(dim=1, keepdim=True)
            enc = torch.randn(n_latents, cfg.d_in, generator=gen)
            enc /= enc.norm(dim=1, keepdim=True)
            dec = torch.zeros(n_latents, n - p, cfg.d_out)
            dec[:, 0] = own
            encoders.append(nn.Parameter(enc))
            decoders.append(nn.Parameter(dec))
        self.W_enc = nn.ParameterList(encoders)
        self.b_enc = nn.Parameter(torch.zeros(n, n_latents))
        self.W_dec = nn.ParameterList(decoders)
        self.b_dec = nn.Parameter(torch.zeros(n, cfg.d_out))
        self.sparsity = LayerSparsity(cfg.variant, cfg.layers, n_latents, cfg.k, cfg.settings)
        self.register_buffer("input_scale", torch.ones(n))
        self.register_buffer("target_scale", torch.ones(n))
        self.register_buffer("massive_norm", torch.full((n,), float("inf")))  # model units, per target layer
        self.register_buffer("tokens_since_fired", torch.zeros(n, n_latents, dtype=torch.int64))
        self._position = {layer: p for p, layer in enumerate(cfg.layers)}

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
            self.b_dec[p] = torch.tensor(target_stats[layer]["mean"], dtype=torch.float32) * self.target_scale[p]

    @torch.no_grad()
    def init_from_batch(self, x: dict[int, Tensor], y: dict[int, Tensor]) -> None:
        """Massive-row thresholds, b_dec at the geometric median, JumpReLU thresholds: per layer."""
        for p, layer in enumerate(self.cfg.layers):
            target = y[layer].float()
            self.massive_norm[p] = MASSIVE_FACTOR * target.norm(dim=-1).median()
            if self.cfg.b_dec_init == "geometric_median":
                self.b_dec[p] = geometric_median(target * self.target_scale[p])
            calibrate = getattr(self.sparsity[p], "calibrate", None)
            if calibrate is not None:
                calibrate(torch.addmm(self.b_enc[p], x[layer].float() * self.input_scale[p], self.W_enc[p].T))

    # ----- the contract ---------------------------------------------------
    def _codes(self, p: int, x: Tensor) -> Codes:
        """Codes of source position p for model-unit rows ``x`` [rows, d_in]."""
        return self.sparsity[p].encode(x.float() * self.input_scale[p], self.W_enc[p], self.b_enc[p])

    def encode_layer(self, layer: int, x: Tensor) -> Tensor:
        """Dense latent activations [..., n_latents] of source ``layer`` from its model-unit MLP input."""
        codes = self._codes(self.position(layer), x.reshape(-1, x.shape[-1]))
        return codes.to_dense().reshape(*x.shape[:-1], self.cfg.n_latents)

    def decode_layer(self, layer: int, acts: dict[int, Tensor]) -> Tensor:
        """Model-unit prediction of ``layer``'s MLP output from the latents of the sources
        i <= layer present in ``acts`` (dense, [..., n_latents] each)."""
        q = self.position(layer)
        sources = sorted((self.position(i), a) for i, a in acts.items() if self.position(i) <= q)
        if not sources:
            raise ValueError(f"decode_layer({layer}) needs the latents of at least one source layer <= {layer}")
        shape = sources[0][1].shape[:-1]
        y = self.b_dec[q]
        for p, a in sources:
            # Codes.decode goes sparse when the latents are (TopK, thresholds), dense otherwise.
            y = y + Codes(self.cfg.n_latents, dense=a.reshape(-1, self.cfg.n_latents).float()).decode(self.W_dec[p][:, q - p])
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
    def training_loss(self, x: dict[int, Tensor], y: dict[int, Tensor], dead: Tensor | None,
                      with_metrics: bool = True) -> tuple[Tensor, dict[str, Tensor], dict[int, Codes]]:
        """Loss (and metrics) on one batch; x, y: {layer: model-unit rows}; ``dead`` [n_layers, n_latents]."""
        layers = self.cfg.layers
        xn = [x[layer].float() * self.input_scale[p] for p, layer in enumerate(layers)]
        yn = [y[layer].float() * self.target_scale[q] for q, layer in enumerate(layers)]
        codes = [self.sparsity[p].encode(xn[p], self.W_enc[p], self.b_enc[p]) for p in range(len(layers))]
        errs = [pred - target for pred, target in zip(self._predict(codes), yn)]
        recon = torch.stack([err.pow(2).mean() for err in errs]).sum()
        penalty = torch.stack([self.sparsity[p].penalty(c, self.W_dec[p].flatten(1)) for p, c in enumerate(codes)]).sum()
        aux = self._auxk(xn, errs, codes, dead)
        loss = recon + penalty + aux
        by_layer = dict(zip(layers, codes))
        if not with_metrics:
            return loss, {}, by_layer
        with torch.no_grad():
            metrics = {"loss": loss.detach(), "recon": recon.detach(), "penalty": penalty.detach(), "aux": aux.detach()}
            per: dict[str, list[Tensor]] = {"fvu": [], "fvu_normal": [], "massive_frac": [], "mse": [], "l0": []}
            for q, layer in enumerate(layers):
                ts = self.target_scale[q]
                values = fvu_metrics(errs[q], yn[q], self.massive_norm[q] * ts)
                values["mse"] = errs[q].pow(2).sum(-1).mean() / ts**2  # model units
                values["l0"] = codes[q].l0()  # of source layer q
                for name, value in values.items():
                    metrics[f"{name}_L{layer}"] = value
                    per[name].append(value)
            # Headline numbers: means over layers, so no layer's scale dominates them (as in the loss).
            metrics |= {name: torch.stack(v).nanmean() for name, v in per.items()}
        return loss, metrics, by_layer

    def _auxk(self, xn: list[Tensor], errs: list[Tensor], codes: list[Codes], dead: Tensor | None) -> Tensor:
        zero = torch.zeros((), device=xn[0].device)
        if not self.sparsity.uses_auxk or dead is None or self.cfg.aux_coef == 0 or not self.training:
            return zero
        k_aux = self.cfg.aux_k or self.cfg.d_out // 2
        terms = [zero]
        for p, c in enumerate(codes):
            if dead[p].any():
                residual = torch.cat([e.detach() for e in errs[p:]], dim=1)  # the layers source p writes to
                terms.append(auxk_loss(c.preacts, dead[p], xn[p], self.W_enc[p], self.b_enc[p],
                                       self.W_dec[p].flatten(1), residual, k_aux, self.cfg.aux_coef))
        return torch.stack(terms).sum()

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each latent's (unit) triangular row."""
        for w in self.W_dec:
            if w.grad is not None:
                g, row = w.grad.flatten(1), w.flatten(1)
                g -= (g * row).sum(1, keepdim=True) * row

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        for w in self.W_dec:
            w /= w.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]

    @torch.no_grad()
    def record_firing(self, codes: dict[int, Codes], n_tokens: int) -> None:
        self.tokens_since_fired += n_tokens
        for p, layer in enumerate(self.cfg.layers):
            self.tokens_since_fired[p][codes[layer].fired()] = 0

    def config_dict(self) -> dict:
        return {"family": self.family, "config": self.cfg.to_dict(), **self.sparsity.extra_config(),
                "input_scale": self.input_scale.tolist(), "target_scale": self.target_scale.tolist(),
                "massive_norm": self.massive_norm.tolist()}

    @classmethod
    def from_config_dict(cls, d: dict) -> "CrossLayerTranscoder":
        return cls(CLTConfig(**d["config"]))


def auxk_loss(preacts: Tensor, dead: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
              residual: Tensor, k_aux: int, coef: float) -> Tensor:
    """AuxK (Gao et al. 2024): the top ``k_aux`` dead latents per row, through the
    sparse encoder/decoder paths, learn to explain ``residual``; normalised by its energy.

    ``W_dec`` is [n_latents, width of residual]; for a CLT source that is the
    flattened triangular row. (``Dictionary._auxk`` is the same computation with
    its own weights; it could call this.)
    """
    dead_idx = dead.nonzero().squeeze(1)
    values, local = preacts.index_select(1, dead_idx).topk(min(k_aux, dead_idx.numel()), dim=-1, sorted=False)
    pattern = SparsePattern.from_topk(dead_idx[local], W_dec.shape[0])
    values = SelectedPreacts.apply(values.reshape(-1).to(W_enc.dtype), x, W_enc, b_enc, pattern)
    recon = SparseDecode.apply(F.relu(values), W_dec, pattern)
    return coef * (recon - residual).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-12)


def build_members(sparsity: str, *, store, variants: list[str], ks: list[int], layers: list[int], latents: int,
                  seed: int, kind: str, out: Callable[[str, int, str], Path]) -> list[Member]:
    """The train stage's members for MODEL=clt-<sparsity>: one CLT over all LAYERS per K.

    ``out(variant, k, layer)`` is the stage's ``.../{KIND}/{variant}-k{k}-L{layer}``;
    CLTs go beside the per-layer dictionaries, in ``.../clt/clt-{sparsity}-k{k}-L{first}-{last}``
    (where ``make pareto`` looks for them).
    """
    if kind != "transcoder":
        raise UserError("MODEL=clt maps each layer's mlp_in to the mlp_out of that and later layers; use KIND=transcoder")
    if sparsity == DEFAULT_SPARSITY and "clt" in variants and f"clt-{DEFAULT_SPARSITY}" in variants:
        return []  # MODEL=clt,clt-batchtopk names one CLT twice; built once, under clt-batchtopk
    label = layers_label(layers)
    members = []
    for k in ks:
        cfg = CLTConfig(variant=sparsity, k=k, d_in=store.d_model, d_out=store.d_model, n_latents=latents,
                        layers=tuple(layers), seed=zlib.crc32(f"{seed}/clt-{sparsity}/{k}/{label}".encode()))
        per_kind = out(f"clt-{sparsity}", k, label)
        members.append(Member(CrossLayerTranscoder(cfg), tuple((layer, cfg.input_hook) for layer in layers),
                              tuple((layer, cfg.target_hook) for layer in layers), per_kind.parent.parent / "clt" / per_kind.name,
                              metadata={"lm": store.manifest["lm"]}))
    return members


checkpoint.register_family(CrossLayerTranscoder.family, CrossLayerTranscoder.from_config_dict)
for _sparsity in SPARSITY:
    MEMBER_BUILDERS[f"clt-{_sparsity}"] = functools.partial(build_members, _sparsity)
MEMBER_BUILDERS["clt"] = functools.partial(build_members, DEFAULT_SPARSITY)
