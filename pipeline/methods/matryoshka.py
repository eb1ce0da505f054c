"""Matryoshka BatchTopK: nested prefixes of one dictionary, each a reconstruction on its own
(Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning multi-level features with Matryoshka
sparse autoencoders"; Nabeshima 2024).

One BatchTopK selection over the whole dictionary; the loss is the mean, over the prefix
sizes m_1 < m_2 < ... < m_n = n_latents, of the reconstruction loss of the latents with
index < m_i alone (the same capped MSE as a plain transcoder's). The first latents must
then explain as much as they can by themselves, so general features settle early and a
prefix is a narrower dictionary that works without the rest: ``prefix(m)`` cuts it, and
the cut module is saved, loaded and evaluated like any checkpoint (``nnd prefix``).

- ``MODEL=matryoshka``: per-layer transcoders (``KIND=sae``: SAEs), BatchTopK;
  ``matryoshka-topk``: the same with TopK.
- ``MODEL=matryoshka-clt``: a cross-layer transcoder whose every source layer's latents
  are nested the same way (the prefix keeps the first m latents of each source layer).
- ``PREFIXES``: the prefix sizes as fractions of LATENTS (default 1/8, 1/4, 1/2, 1);
  the whole dictionary is always the last.

The mean over prefixes (not the sum of the paper) keeps the loss on the scale of a
plain transcoder's, so the learning rate and gradient clipping mean the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from pipeline.core.errors import UserError
from pipeline.core.layers import layers_label
from pipeline.methods.base import MethodSpec, TrainJob, TrainRequest
from pipeline.methods.clt import CLTConfig, CLTSpec, CrossLayerTranscoder
from pipeline.methods.codes import Codes, DenseCodes, SparseCodes
from pipeline.methods.losses import capped_mse, fvu
from pipeline.methods.transcoder import Transcoder, TranscoderConfig, TranscoderSpec

DEFAULT_PREFIXES = (0.125, 0.25, 0.5, 1.0)
# Per-latent tensors a prefix keeps the first m rows of (everything else is copied whole).
PER_LATENT = ("W_enc", "b_enc", "W_dec", "tokens_since_fired", "sparsity.log_threshold")


def prefix_sizes(fractions: tuple[float, ...], n_latents: int) -> tuple[int, ...]:
    """Latent counts of the prefixes: increasing, distinct, the whole dictionary last."""
    fractions = tuple(float(f) for f in (fractions or DEFAULT_PREFIXES))
    if any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(set(fractions)):
        raise UserError(f"PREFIXES={','.join(map(str, fractions))} must be increasing fractions of LATENTS in (0, 1]")
    sizes = sorted({max(1, round(f * n_latents)) for f in fractions} | {n_latents})
    return tuple(sizes)


def _check_prefixes(prefixes: tuple[int, ...], n_latents: int) -> None:
    if not prefixes or list(prefixes) != sorted(set(prefixes)) or prefixes[0] < 1 or prefixes[-1] != n_latents:
        raise UserError(f"Matryoshka prefixes {list(prefixes)} must increase to n_latents={n_latents}")


def prefix_codes(codes: Codes, m: int) -> Codes:
    """The codes of the first ``m`` latents (the others set to zero; gradients flow to the kept ones)."""
    if isinstance(codes, SparseCodes):
        keep = (codes.pattern.cols < m).to(codes.values.dtype)
        return SparseCodes(codes.values * keep, codes.pattern)
    keep = (torch.arange(codes.n_latents, device=codes.dense.device) < m).to(codes.dense.dtype)
    return DenseCodes(codes.dense * keep, codes.matmul_dtype)


def cut_state(module: nn.Module, m: int) -> dict[str, Tensor]:
    """``module``'s state with every per-latent tensor cut to its first ``m`` latents: rows of
    the weights, the last axis of a CLT's [n_layers, n_latents] biases and firing counts."""
    out = {}
    for name, t in module.state_dict().items():
        base = ".".join(part for part in name.split(".") if not part.isdigit())
        if base in PER_LATENT:
            layer_major = base in ("b_enc", "tokens_since_fired") and t.dim() == 2
            t = t[..., :m] if layer_major else t[:m]
        out[name] = t.clone()
    return out


def cut_prefix(module: nn.Module, m: int) -> nn.Module:
    """A Matryoshka module's first ``m`` latents (per source layer) as a module of the same class."""
    c = module.cfg
    if not 0 < m <= c.n_latents:
        raise UserError(f"a prefix of {m} latents is not within this dictionary's {c.n_latents}")
    cfg = replace(c, n_latents=m, prefixes=tuple(p for p in c.prefixes if p < m) + (m,),
                  trained_latents=c.trained_latents or c.n_latents)
    cut = type(module)(cfg)
    cut.load_state_dict(cut_state(module, m))
    return cut.train(module.training)


@runtime_checkable
class Nested(Protocol):
    """A dictionary whose first ``m`` latents form a narrower dictionary of their own."""

    def prefix(self, m: int) -> nn.Module: ...


# ----- per-layer transcoders and SAEs -------------------------------------------------------

class Prefixed:
    """What both Matryoshka configs add to their base: prefix sizes checked at construction and,
    for a cut prefix, its parent's K (``prefixes`` and ``trained_latents`` are their fields)."""

    def __post_init__(self):
        object.__setattr__(self, "prefixes", tuple(int(p) for p in self.prefixes) or prefix_sizes((), self.n_latents))
        super().__post_init__()
        _check_prefixes(self.prefixes, self.n_latents)

    @property
    def k_limit(self) -> int:
        return self.trained_latents or self.n_latents


@dataclass(frozen=True)
class MatryoshkaConfig(Prefixed, TranscoderConfig):
    prefixes: tuple[int, ...] = ()  # latent counts; () = DEFAULT_PREFIXES of n_latents
    trained_latents: int = 0  # a cut prefix: the width it was trained at (0: not cut)

    METHOD = "matryoshka"



class MatryoshkaTranscoder(Transcoder):
    family = "matryoshka"

    def _recon_loss(self, xn: Tensor, yn: Tensor, codes: Codes, cap: Tensor | None) -> tuple[Tensor, Tensor, dict]:
        errs = [prefix_codes(codes, m).decode(self.W_dec) + self.b_dec - yn for m in self.cfg.prefixes[:-1]]
        err = self._predict(xn, codes) - yn
        losses = [capped_mse(e, yn, cap) for e in (*errs, err)]
        with torch.no_grad():
            metrics = {f"fvu_prefix{m}": fvu(e, yn) for m, e in zip(self.cfg.prefixes, errs)}
        return torch.stack(losses).mean(), err, metrics

    def prefix(self, m: int) -> "MatryoshkaTranscoder":
        """The dictionary of the first ``m`` latents, as a module of its own (same thresholds)."""
        return cut_prefix(self, m)


class MatryoshkaSpec(TranscoderSpec):
    name = "matryoshka"
    models = {"matryoshka": "batchtopk", "matryoshka-topk": "topk"}
    order = 20
    module_class = MatryoshkaTranscoder
    config_class = MatryoshkaConfig

    def model_name(self, variant: str) -> str:
        return "matryoshka" if variant == "batchtopk" else f"matryoshka-{variant}"

    def extra_fields(self, request: TrainRequest) -> dict:
        return {"prefixes": prefix_sizes(request.prefixes, request.n_latents)}

    def group_key(self, module: nn.Module) -> tuple:
        return (*super().group_key(module), module.cfg.trained_latents)

    def describe(self, decomposition, modules) -> dict:
        about = super().describe(decomposition, modules)
        c = modules[0].cfg
        if c.trained_latents:  # a cut prefix: its own line on the Pareto plot
            about["label"] += f" [:{c.n_latents} of {c.trained_latents}]"
        return about


# ----- the cross-layer transcoder ------------------------------------------------------------

@dataclass(frozen=True)
class MatryoshkaCLTConfig(Prefixed, CLTConfig):
    prefixes: tuple[int, ...] = ()  # latent counts per source layer
    trained_latents: int = 0

    METHOD = "matryoshka-clt"


    @property
    def name(self) -> str:
        return f"matryoshka-clt-{self.variant}-k{self.k}-L{layers_label(self.layers)}"


class MatryoshkaCLT(CrossLayerTranscoder):
    family = "matryoshka-clt"

    def _recon_loss(self, codes: list[Codes], yn: list[Tensor], caps: list[Tensor | None]) -> tuple[Tensor, list[Tensor]]:
        total, errs = super()._recon_loss(codes, yn, caps)
        for m in self.cfg.prefixes[:-1]:
            part, _ = super()._recon_loss([prefix_codes(c, m) for c in codes], yn, caps)
            total = total + part
        return total / len(self.cfg.prefixes), errs

    def prefix(self, m: int) -> "MatryoshkaCLT":
        """The first ``m`` latents of every source layer, as a CLT of its own."""
        return cut_prefix(self, m)


class MatryoshkaCLTSpec(CLTSpec):
    name = "matryoshka-clt"
    models = {"matryoshka-clt": "batchtopk"}
    order = 35
    exports = ()

    def build(self, config: dict) -> nn.Module:
        return MatryoshkaCLT(MatryoshkaCLTConfig(**config["config"]))

    def jobs(self, request: TrainRequest) -> list[TrainJob]:
        if request.kind != "transcoder":
            raise UserError("MODEL=matryoshka-clt maps mlp_in to the mlp_out of each and later layers; use KIND=transcoder")
        if request.init != "random":
            raise UserError(f"INIT={request.init} is for per-layer SAEs and transcoders; a CLT starts from random rows")
        jobs = []
        for job in super().jobs(request):
            cfg = MatryoshkaCLTConfig(**{**job.module.cfg.to_dict(), "method": "matryoshka-clt",
                                         "prefixes": prefix_sizes(request.prefixes, request.n_latents)})
            jobs.append(TrainJob(MatryoshkaCLT(cfg), job.input_key, job.target_key, request.out("clt", cfg.name),
                                 metadata=job.metadata))
        return jobs

    def group_key(self, module: nn.Module) -> tuple:
        return (id(module),)

    def describe(self, decomposition, modules) -> dict:
        about = super().describe(decomposition, modules)
        c = modules[0].cfg
        label = "matryoshka-clt" + (f" [:{c.n_latents} of {c.trained_latents}]" if c.trained_latents else "")
        return about | {"name": f"matryoshka-{about['name']}", "label": label, "family": "clt"}
