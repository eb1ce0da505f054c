"""The units an analysis selects and edits: a decomposition's latents, or the MLP's hidden units.

Every unit of a method gets one number: the units of its source layers in
layer order (a per-layer transcoder set: layer 0's latents, then layer 1's;
a CLT: each source layer's latents; neurons: each layer's hidden units).
``Units`` encodes stored MLP inputs into them and builds the splice that
edits them in the live model: ``EditedSplice`` (reconstruction error added
back) for a decomposition, ``NeuronEditSplice`` for the neuron baseline. An
edit is ``edit(source_layer, acts [rows, n]) -> acts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from pipeline.core.layers import layers_label
from pipeline.eval.methods import EvalMethod
from pipeline.eval.neuron_edit import NeuronEditSplice, hidden_units
from pipeline.eval.splice import DecompositionSplice, Edit, EditedSplice, Splice


@dataclass
class Units:
    name: str  # unique: the method's name, or neurons-L<layers>
    label: str  # legend label
    layers: tuple[int, ...]  # source layers, in unit order
    sizes: dict[int, int]  # units per source layer
    input_hook: str  # the store hook its encoder reads
    encode: Callable[[int, Tensor], Tensor]  # (layer, input rows) -> [rows, sizes[layer]]
    make_splice: Callable[[Edit], Splice]
    identity: dict = field(default_factory=dict)  # what a cached result of these units depends on

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def replace(self) -> tuple[int, ...]:
        """The layers an edited splice replaces (every layer its edits can reach)."""
        return self.layers

    def offsets(self) -> dict[int, int]:
        out, start = {}, 0
        for layer in self.layers:
            out[layer] = start
            start += self.sizes[layer]
        return out

    def locate(self, units: Sequence[int]) -> dict[int, Tensor]:
        """Global unit numbers -> {source layer: local indices}."""
        offsets = self.offsets()
        found: dict[int, list[int]] = {}
        for u in map(int, units):
            if not 0 <= u < self.total:
                raise ValueError(f"unit {u} outside 0..{self.total - 1}")
            layer = max(l for l in self.layers if offsets[l] <= u)
            found.setdefault(layer, []).append(u - offsets[layer])
        return {l: torch.tensor(v, dtype=torch.long) for l, v in found.items()}

    def describe(self, u: int) -> str:
        (layer, local), = ((l, int(i[0])) for l, i in self.locate([u]).items())
        return f"L{layer}#{local}"


def decomposition_units(method: EvalMethod) -> Units:
    """A loaded decomposition (``pipeline.eval.methods.load_checkpoints``) as units."""
    assert isinstance(method.splice, DecompositionSplice), method.name
    d = method.splice.decomposition
    return Units(method.name, method.label, tuple(d.layers), {l: d.n_latents(l) for l in d.layers}, d.input_hook,
                 d.encode_layer, lambda edit: EditedSplice(d, edit),
                 {"checkpoints": method.info.get("checkpoints"), "train": method.info.get("train")})


def neuron_units(lm, layers: Sequence[int]) -> Units:
    """The MLP hidden units of ``layers`` (the neuron baseline) as units."""
    layers = tuple(sorted(set(layers)))
    lm.check_layers(list(layers))
    return Units(f"neurons-L{layers_label(layers)}", "neurons", layers, {l: lm.d_mlp for l in layers}, "mlp_in",
                 lambda layer, x: hidden_units(lm, layer, x), lambda edit: NeuronEditSplice(layers, edit),
                 {"lm_weights_sha256": lm.weights_sha256})


def zero_edit(units: Units, chosen: Sequence[int]) -> Edit:
    """Set the ``chosen`` units to 0 at every replaced position; no unit chosen: no edit at all."""
    where = units.locate(chosen)

    def edit(layer: int, acts: Tensor) -> Tensor:
        index = where.get(layer)
        if index is None:
            return acts
        acts = acts.clone()
        acts[:, index] = 0
        return acts

    return edit
