"""The contracts between methods and the rest of the pipeline.

- ``Decomposition``: what the evaluator, splicing, dashboards and interventions
  use: per-layer ``encode_layer`` / ``decode_layer`` in model units. A set of
  per-layer transcoders and a cross-layer transcoder answer alike.
- ``Trainable``: what ``pipeline.train.loop.fit`` uses: a typed ``StepOutput``
  per batch, hooks after backward and after the optimiser step, the dead-latent
  mask, and the statistics a distributed run must all-reduce.
- ``MethodSpec``: one object per method, registered explicitly in
  ``pipeline.methods.REGISTRY``: its MODEL names, how to build its modules and
  training jobs, how its checkpoints combine into a ``Decomposition``, its
  Pareto axes, and the export formats it supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from pipeline.core.errors import UserError

Key = tuple[int, str]  # (layer, hook) of a harvest store array


@runtime_checkable
class Decomposition(Protocol):
    """A replacement for the MLP outputs of ``layers``, from latents of ``sources(layer)``."""

    layers: tuple[int, ...]  # layers whose MLP output it reconstructs
    input_hook: str  # what its latents read: "mlp_in" (transcoders, CLT) or the target itself (SAE)

    def sources(self, layer: int) -> tuple[int, ...]:
        """Layers whose latents write to ``layer`` (``(layer,)`` for per-layer methods)."""

    def n_latents(self, layer: int) -> int: ...

    def encode_layer(self, layer: int, x: Tensor) -> Tensor:
        """Dense latent activations [rows, n_latents] of source ``layer`` from its input rows."""

    def decode_layer(self, layer: int, acts: dict[int, Tensor], x: Tensor | None = None) -> Tensor:
        """Model-unit reconstruction of ``layer``'s MLP output from the latents of its
        sources (``acts``) and, for methods with a linear skip term, its input rows ``x``."""


@dataclass
class StepOutput:
    """One training step of one module: the loss to backpropagate, its parts, the codes, metrics."""

    loss: Tensor
    recon: Tensor
    penalty: Tensor
    aux: Tensor
    codes: Any  # Codes, or {layer: Codes} for a multi-layer module
    metrics: dict[str, Tensor] = field(default_factory=dict)  # filled only when asked for (costs passes)

    def log_values(self) -> dict[str, float]:
        parts = {"loss": self.loss, "recon": self.recon, "penalty": self.penalty, "aux": self.aux}
        return {k: float(v.detach()) for k, v in (parts | self.metrics).items()}


@runtime_checkable
class Trainable(Protocol):
    cfg: Any

    def init_from_stats(self, input_stats: Any, target_stats: Any) -> None: ...

    def init_from_batch(self, x: Any, y: Any) -> None: ...

    def training_step(self, x: Any, y: Any, dead: Tensor | None, with_metrics: bool = True) -> StepOutput: ...

    def after_backward(self) -> None:
        """Between backward and the optimiser (e.g. drop decoder-parallel gradients)."""

    def after_step(self, out: StepOutput, n_tokens: int) -> None:
        """After the optimiser (renormalise, threshold / controller updates, firing counts)."""

    def dead_mask(self, window_tokens: int) -> Tensor: ...

    def sync_state(self) -> list[Tensor]:
        """Buffers that every rank of a distributed run must agree on."""

    def start_calibration(self) -> Any:
        """After training: calibrators of the inference thresholds (None when there are none)."""

    def add_calibration(self, calibs: Any, x: Any) -> None: ...

    def next_calibration_pass(self, calibs: Any) -> None:
        """Between the two passes over the same calibration rows (``L0Calibrator``)."""

    def finish_calibration(self, calibs: Any) -> dict: ...

    def config_dict(self) -> dict: ...

    def extra_config(self) -> dict[str, float]: ...


@dataclass
class TrainJob:
    """One module of a training run: what it reads, where it goes."""

    module: nn.Module
    input_key: Key | tuple[Key, ...]
    target_key: Key | tuple[Key, ...]
    out_dir: Path
    name: str = ""
    metadata: dict = field(default_factory=dict)  # recorded in config.json

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.name = self.name or self.out_dir.name

    def keys(self) -> list[Key]:
        return [k for key in (self.input_key, self.target_key) for k in as_keys(key)]


def as_keys(key) -> list[Key]:
    """A (layer, hook) key, or a tuple of them (multi-layer modules), as a list."""
    return list(key) if isinstance(key[0], tuple) else [key]


def select(batch: dict, key):
    """A (layer, hook) key gives its tensor; a tuple of keys gives {layer: tensor}."""
    if isinstance(key[0], tuple):
        return {k[0]: batch[k] for k in key}
    return batch[key]


@dataclass(frozen=True)
class TrainRequest:
    """What the train stage asks for, for one method: validated, before anything is written."""

    store: Any  # pipeline.data.store.HarvestStore
    models: tuple[str, ...]  # this method's MODEL names in the request
    ks: tuple[int, ...]
    layers: tuple[int, ...]
    n_latents: int
    seed: int
    kind: str  # transcoder | sae
    out: Callable[[str, str], Path]  # (group, name) -> checkpoint folder
    init: str = "random"  # decoder initialisation (INIT): random | rkcnn
    prefixes: tuple[float, ...] = ()  # Matryoshka prefix sizes as fractions of n_latents (PREFIXES); () = default
    # layer -> the MLP's weights (``pipeline.data.models.MLPWeights``), for methods that decompose
    # the weights themselves (SPD); None where the caller has no model at hand
    mlp_weights: Callable[[int], Any] | None = None


@dataclass(frozen=True)
class ParetoAxes:
    active_components: float | None
    active_params: float | None


class MethodSpec:
    """Base class of a method's spec; subclasses set the class attributes and override what differs."""

    name: ClassVar[str]  # also the ``family`` recorded in checkpoints
    models: ClassVar[dict[str, str]] = {}  # MODEL name -> sparsity variant
    order: ClassVar[int] = 50  # legend / table order
    exports: ClassVar[tuple[str, ...]] = ()  # formats pipeline.export can write for it

    def build(self, config: dict) -> nn.Module:
        """A fresh module from a checkpoint's config.json content."""
        raise NotImplementedError

    def jobs(self, request: TrainRequest) -> list[TrainJob]:
        return []

    def group_key(self, module: nn.Module) -> tuple:
        """Checkpoints with equal keys combine into one ``Decomposition`` (per-layer sets)."""
        return (id(module),)

    def combine(self, modules: Sequence[nn.Module]) -> Decomposition:
        raise NotImplementedError

    def describe(self, decomposition: Decomposition, modules: Sequence[nn.Module]) -> dict:
        """name (unique per configuration), label (legend: the method without K), k, variant, kind."""
        raise NotImplementedError

    def pareto_axes(self, d_model: int, layers: Sequence[int], l0: dict[int, float], mode: str,
                    weights_per_unit: int | None = None) -> ParetoAxes:
        """Per-layer latents: a component per latent, an encoder and a decoder row each."""
        per = weights_per_unit or 2 * d_model
        total = sum(l0[layer] * per for layer in layers)
        return ParetoAxes(sum(l0.values()) / len(l0), total if mode == "all_layers" else total / len(layers))


def one_per_layer(modules: Sequence[nn.Module]) -> dict[int, nn.Module]:
    """Per-layer checkpoints of one configuration by ``cfg.layer``; two for one layer is an error."""
    by_layer: dict[int, nn.Module] = {}
    for m in modules:
        if m.cfg.layer in by_layer:
            raise UserError(f"two checkpoints of one configuration for layer {m.cfg.layer}; pass each once")
        by_layer[m.cfg.layer] = m
    return by_layer


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def member_seed(seed: int, *parts) -> int:
    """Init seed of one module: independent of which others train alongside it."""
    import zlib

    return zlib.crc32("/".join(map(str, (seed, *parts))).encode())


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
