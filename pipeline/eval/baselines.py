"""Baselines that replace MLP outputs without a dictionary.

- zero-ablation: the MLP output is 0;
- mean-ablation: the MLP output is its mean over the training store (the
  store's per-array ``stats``), the best constant in squared error;
- neurons: the real MLP keeping only its k hidden units of largest
  |activation| per token, through the real output projection. This is the
  dictionary-free sparse decomposition every dictionary should beat at equal
  L0 (hidden units are its latents).

They are ``Splice``s like the dictionaries, so the evaluation treats them the
same way; their CEs in the same two modes (single layer, all layers) are the
zero points of "CE recovered".
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from pipeline.core.errors import UserError
from pipeline.eval.splice import Hook, Record, put_rows, rows_of, splice_hook_name


class ConstantSplice:
    """The MLP output replaced by a constant vector per layer (zero- or mean-ablation)."""

    def __init__(self, values: dict[int, Tensor]):
        self.values = dict(sorted(values.items()))
        self.layers = tuple(self.values)

    def hooks(self, lm, replace, record):
        return [(splice_hook_name(lm, layer), self._replace(layer, record)) for layer in replace]

    def _replace(self, layer: int, record: Record | None):
        def hook(y: Tensor, hook=None) -> Tensor:
            target = rows_of(y)
            recon = self.values[layer].to(target.device, target.dtype).expand_as(target)
            if record is not None:
                record(layer, target, recon, None)
            return put_rows(y, recon)

        return hook


def zero_ablation(layers: Sequence[int], d: int) -> ConstantSplice:
    return ConstantSplice({layer: torch.zeros(d) for layer in layers})


def train_means(lm, store_location: str | Path, layers: Sequence[int]) -> dict[int, Tensor]:
    """Per-layer mean of the spliced hook over a training store of this model."""
    from pipeline.data.store import HarvestStore

    hook = lm.mlp_out_hook_for_splice
    store = HarvestStore.open(store_location, layers=list(layers), hooks=[hook])
    if store.manifest.get("lm_weights_sha256") != lm.weights_sha256:
        raise UserError(
            f"the training store {store_location} was harvested from other weights than {lm.name}; "
            f"mean-ablation needs the store of the evaluated model (harvest it again)"
        )
    return {layer: torch.tensor(store.stats(layer, hook)["mean"], dtype=torch.float32) for layer in layers}


def mean_ablation(lm, store_location: str | Path, layers: Sequence[int]) -> ConstantSplice:
    return ConstantSplice(train_means(lm, store_location, layers))


def mlp_hidden_hook_name(layer: int) -> str:
    """The input of the MLP's output projection: act(gate x) * (up x), or act(W_in x)."""
    return f"blocks.{layer}.mlp.out.hook_in"


def mlp_raw_out_hook_name(layer: int) -> str:
    """The MLP's own output (before any post-MLP norm)."""
    return f"blocks.{layer}.mlp.hook_out"


def down_projection(lm, layer: int) -> nn.Module:
    """The MLP's real output projection (the bridge names it ``mlp.out`` in every architecture).

    The wrapped HF module, not the bridge's wrapper: calling the wrapper from
    inside its own input hook would fire that hook again.
    """
    return lm.bridge.blocks[layer].mlp.out.original_component


def is_gated(lm, layer: int) -> bool:
    return hasattr(lm.bridge.blocks[layer].mlp, "gate")


def weights_per_hidden_unit(lm, layer: int) -> int:
    """Weights one hidden unit touches: a row of gate and up (if gated) plus a column of down."""
    return (3 if is_gated(lm, layer) else 2) * lm.d_model


def mlp_parameters(lm, layer: int) -> int:
    return sum(p.numel() for p in lm.mlp_module(layer).parameters())


class NeuronSplice:
    """The real MLP, keeping only its k hidden units of largest |activation| per token.

    The hidden activation is read where it enters the output projection, so it
    is act(gate x) * (up x) for gated MLPs and act(W_in x) for plain ones, and
    the kept units go through the real output projection. With k = d_mlp
    every unit is kept and the output is exactly the clean one.
    """

    def __init__(self, k: int, layers: Sequence[int]):
        self.k = k
        self.layers = tuple(sorted(layers))

    def hooks(self, lm, replace, record) -> list[Hook]:
        if not 0 < self.k <= lm.d_mlp:
            raise UserError(f"neuron baseline K={self.k} must be in 1..{lm.d_mlp} (the MLP width of {lm.name})")
        hooks: list[Hook] = []
        for layer in replace:
            stash: dict[str, Tensor] = {}
            hooks.append((mlp_hidden_hook_name(layer), self._keep_top(lm, layer, stash, record is not None)))
            if record is not None:
                # Observed at the MLP's own output, where the stashed target lives;
                # for a model with a post-MLP norm (Gemma) MSE/FVU of this
                # baseline are in that pre-norm space. CE and KL are not affected.
                hooks.append((mlp_raw_out_hook_name(layer), self._observe(layer, stash, record)))
        return hooks

    def _keep_top(self, lm, layer: int, stash: dict, recording: bool):
        down = down_projection(lm, layer)

        def hook(h: Tensor, hook=None) -> Tensor:
            rows = rows_of(h)
            index = rows.abs().topk(self.k, dim=-1).indices
            kept = torch.zeros_like(rows).scatter_(-1, index, rows.gather(-1, index))
            if recording:
                stash["target"] = down(rows)  # what the full MLP would have written
                stash["acts"] = kept.abs()
            return put_rows(h, kept)

        return hook

    @staticmethod
    def _observe(layer: int, stash: dict, record: Record):
        def hook(y: Tensor, hook=None) -> None:
            record(layer, stash.pop("target"), rows_of(y), stash.pop("acts"))

        return hook
