"""What the evaluator splices: checkpoints combined into decompositions, and the baselines.

Checkpoints are loaded through ``pipeline.checkpoint.load`` (one trip: module,
config, origin, training facts), checked against the evaluated model, and
grouped by their method's spec: per-layer checkpoints of one configuration
become one ``Decomposition`` spliced over all of their layers; a CLT is one on
its own. Nothing here names a particular method.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline import checkpoint
from pipeline.core.errors import UserError
from pipeline.core.layers import layers_label
from pipeline.eval.baselines import NeuronSplice, mean_ablation, mlp_parameters, weights_per_hidden_unit, zero_ablation
from pipeline.eval.config import EvalConfig
from pipeline.eval.splice import DecompositionSplice, Splice
from pipeline.methods import REGISTRY
from pipeline.methods.base import MethodSpec


@dataclass
class EvalMethod:
    """One thing to splice and how to describe it in tables and plots."""

    name: str  # unique, used as the folder of its metrics.json
    label: str  # legend group: method without K ("transcoder topk", "neurons")
    family: str  # transcoder | sae | clt | neurons | zero | mean
    splice: Splice
    layers: tuple[int, ...]
    k: int | None = None
    n_latents: dict[int, int] = field(default_factory=dict)
    params: int = 0
    spec: MethodSpec | None = None  # None for the ablations (no latents, no Pareto axes)
    weights_per_unit: int | None = None  # neurons: weights a kept hidden unit touches
    info: dict = field(default_factory=dict)  # recorded as is (checkpoints, variant, training facts)


def neuron_method(lm, k: int, layers: Sequence[int]) -> EvalMethod:
    layers = tuple(sorted(layers))
    return EvalMethod(f"neurons-k{k}-L{layers_label(layers)}", "neurons", "neurons", NeuronSplice(k, layers), layers, k=k,
                      n_latents={l: lm.d_mlp for l in layers}, params=sum(mlp_parameters(lm, l) for l in layers),
                      spec=REGISTRY.get("neurons"), weights_per_unit=weights_per_hidden_unit(lm, layers[0]),
                      info={"method": "neurons"})


def zero_method(lm, layers: Sequence[int]) -> EvalMethod:
    layers = tuple(sorted(layers))
    return EvalMethod(f"zero-ablation-L{layers_label(layers)}", "zero-ablation", "zero",
                      zero_ablation(layers, lm.d_model), layers)


def mean_method(lm, cfg: EvalConfig, layers: Sequence[int]) -> EvalMethod:
    layers = tuple(sorted(layers))
    return EvalMethod(f"mean-ablation-L{layers_label(layers)}", "mean-ablation", "mean",
                      mean_ablation(lm, cfg.train_store, layers), layers, params=len(layers) * lm.d_model,
                      info={"means_from": str(cfg.train_store)})


def checkpoint_dirs(given: Sequence[Path]) -> list[Path]:
    """Checkpoint directories named by ``given``: each a checkpoint, a folder of them, or a glob."""
    found: list[Path] = []
    expanded = []
    for p in map(str, given):
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        expanded += matches or [p]
    for p in map(Path, expanded):
        if not p.exists():
            raise UserError(f"checkpoint {p} does not exist; train it first (make train ...) or fix CKPT")
        if checkpoint.is_checkpoint_dir(p):
            found.append(p)
            continue
        inside = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".") and checkpoint.is_checkpoint_dir(c))
        if not inside:
            raise UserError(f"{p} holds no checkpoints (no */config.json); train them first (make train ...)")
        found.extend(inside)
    return found


def checkpoint_origin(given: Sequence[Path]) -> dict:
    """lm / data / ctx of the store the first checkpoint was trained on (defaults for evaluate)."""
    meta = checkpoint.read_metadata(checkpoint_dirs(given)[0])
    return {k: v for k, v in meta.get("store_manifest", {}).items() if k in ("lm", "data", "ctx")}


def load_checkpoints(lm, given: Sequence[Path]) -> list[EvalMethod]:
    """The decompositions in ``given``, checked against ``lm``, grouped by their spec."""
    groups: dict[tuple, list[checkpoint.Checkpoint]] = {}
    for d in checkpoint_dirs(given):
        ckpt = checkpoint.load(d)
        _check(lm, ckpt)
        groups.setdefault((ckpt.spec.name, *ckpt.spec.group_key(ckpt.module)), []).append(ckpt)
    return [_method(lm, loaded) for _, loaded in sorted(groups.items(), key=lambda kv: str(kv[0]))]


def _method(lm, loaded: list[checkpoint.Checkpoint]) -> EvalMethod:
    spec = loaded[0].spec
    modules = [c.module.to(lm.device) for c in loaded]
    decomposition = spec.combine(modules)
    lm.check_layers(list(decomposition.layers))
    splice_hook = lm.mlp_out_hook_for_splice
    for c in loaded:
        target = c.module.cfg.target_hook
        if target != splice_hook or decomposition.input_hook not in ("mlp_in", splice_hook):
            raise UserError(f"checkpoint {c.path} maps {decomposition.input_hook} -> {target}, but evaluate replaces "
                            f"{splice_hook} of {lm.name}; train it with that target hook")
    about = spec.describe(decomposition, modules)
    layers = decomposition.layers
    return EvalMethod(about["name"], about["label"], about["family"], DecompositionSplice(decomposition), layers,
                      k=about["k"], n_latents={l: decomposition.n_latents(l) for l in layers}, params=about["params"],
                      spec=spec, weights_per_unit=about.get("weights_per_unit"), info={"variant": about["variant"], "kind": about["kind"], "method": spec.name,
                                       "checkpoints": [str(c.path) for c in loaded],
                                       "train": [c.train_facts for c in loaded],
                                       "train_dead_fraction": _dead_fraction(loaded),
                                       "train_dead_window_tokens": _dead_window(loaded)})


def _dead_fraction(loaded: list[checkpoint.Checkpoint]) -> float | None:
    """Dead latents over the trailing training window, pooled over the checkpoints (None if unrecorded)."""
    found = [(c.metadata.get("dead_fraction"), c.module.tokens_since_fired.numel()) for c in loaded]
    if any(f is None for f, _ in found):
        return None
    return sum(f * n for f, n in found) / sum(n for _, n in found)


def _dead_window(loaded: list[checkpoint.Checkpoint]) -> int | None:
    """The trailing training window (tokens) over which dead latents were counted; the largest if they differ."""
    windows = [c.metadata.get("dead_window_tokens") for c in loaded]
    return None if any(w is None for w in windows) else max(windows)


def _check(lm, ckpt: checkpoint.Checkpoint) -> None:
    origin = ckpt.origin
    if origin.get("lm") not in (None, lm.name) or origin.get("lm_weights_sha256") not in (None, lm.weights_sha256):
        raise UserError(
            f"checkpoint {ckpt.path} was trained on activations of LM={origin.get('lm')} "
            f"(weights {str(origin.get('lm_weights_sha256'))[:12]}), not of {lm.name} "
            f"(weights {lm.weights_sha256[:12]}); evaluate it with LM={origin.get('lm')} or retrain it"
        )
    c = ckpt.module.cfg
    if (c.d_in, c.d_out) != (lm.d_model, lm.d_model):
        raise UserError(
            f"checkpoint {ckpt.path} maps d={c.d_in} -> d={c.d_out}, but {lm.name} has d_model={lm.d_model}; "
            f"it was trained for another model: evaluate it with the LM it was trained on"
        )
