"""Edits of the MLP's hidden units: the neuron baseline's counterpart of ``EditedSplice``.

The neuron baseline's latents are the MLP's hidden units, read where they
enter the real output projection (``act(gate x) * (up x)`` for gated MLPs,
``act(W_in x)`` otherwise; see ``pipeline.eval.baselines``). Editing them
needs no error term: the MLP is its own exact decomposition, so the edited
hidden units go through the real projection and nothing else changes. An
edit that returns its input unchanged leaves the forward untouched, so the
model is the clean one bit for bit. Position 0 (BOS) is never edited.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from pipeline.eval.baselines import down_projection, mlp_hidden_hook_name
from pipeline.eval.splice import Edit, Hook, Record, put_rows, rows_of


class NeuronEditSplice:
    """The real MLPs of ``layers`` with their hidden units edited by ``edit(layer, hidden [rows, d_mlp])``."""

    def __init__(self, layers: Sequence[int], edit: Edit):
        self.layers = tuple(sorted(layers))
        self.edit = edit

    def hooks(self, lm, replace, record: Record | None) -> list[Hook]:
        return [(mlp_hidden_hook_name(layer), self._edit(layer)) for layer in replace]

    def _edit(self, layer: int):
        def hook(h: Tensor, hook=None) -> Tensor:
            rows = rows_of(h)
            edited = self.edit(layer, rows)
            return h if edited is rows else put_rows(h, edited)

        return hook


def hidden_units(lm, layer: int, mlp_in: Tensor) -> Tensor:
    """The MLP's hidden units [rows, d_mlp] for its input rows [rows, d_model] (e.g. from a harvest store)."""
    box: dict[str, Tensor] = {}

    def grab(module, inputs):
        box["h"] = inputs[0].detach()

    handle = down_projection(lm, layer).register_forward_pre_hook(grab)
    try:
        with torch.inference_mode():
            lm.mlp_module(layer)(mlp_in[None].float())
    finally:
        handle.remove()
    return box["h"][0].float()
