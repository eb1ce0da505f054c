"""Live splicing: replace MLP outputs inside the running model.

A ``Splice`` turns "replace the MLP output of these layers" into forward hooks
on the TransformerBridge. Each hook fires in the live forward, so with several
layers replaced every layer sees the residual stream that the upstream
replacements produced:

- transcoder: the hook at the MLP input stashes the live input; the hook at the
  MLP output swaps the real output for ``decode(encode(input))``;
- SAE: the MLP output is swapped for its own reconstruction;
- cross-layer transcoder: at every source layer i the live MLP input is encoded
  when the forward passes it; at a replaced layer j the output is the sum of
  decoder contributions from the latents of all source layers i <= j;
- baselines (``pipeline.eval.baselines``): zero, a fixed mean, or the MLP with
  only its top-k hidden units.

Which hook is swapped is ``lm.mlp_out_hook_for_splice`` (the model spec
decides), and a dictionary must have been trained with that hook as target.
For Llama-style models ``mlp_out`` is the MLP's own output. Gemma applies a
post-feed-forward norm after the MLP: with ``mlp_out`` the reconstruction
replaces MLP + norm (what the block adds to the residual stream); with
``mlp_out_raw`` it replaces the raw MLP output and the real norm is applied
to it. Both are supported here; the neuron baseline always edits the hidden
units, so the real norm (if any) follows it either way.

Position 0 (BOS) is never replaced. Stores never hold it, so no dictionary
has seen it, and it is the attention sink: replacing it would measure the
sink rather than the dictionary. Every hook hands ``record`` the rows it
replaced (positions 1..), flattened to [rows, d], for the metrics.

``final_hidden`` stops the forward at the unembedding input (a hook raises),
and ``logits`` applies the unembedding: clean and spliced runs both go
through this one path, so a splice that changes nothing gives bit-identical
logits.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

from pipeline.core.errors import UserError

FIRST_REPLACED = 1  # position 0 is BOS, never replaced
UNEMBED_IN = "unembed.hook_in"

Hook = tuple[str, Callable]
# record(layer, target, recon, acts): the real MLP output the model would have
# produced from the live input, what replaced it, and the latent activations
# (None where there are none); rows of replaced positions, [rows, d] / [rows, n].
Record = Callable[[int, Tensor, Tensor, Tensor | None], None]


class Splice(Protocol):
    """Something that can replace the MLP output of some of ``layers``."""

    layers: tuple[int, ...]

    def hooks(self, lm, replace: Sequence[int], record: Record | None) -> list[Hook]: ...


def rows_of(t: Tensor) -> Tensor:
    """[batch, pos, d] -> replaced positions as [rows, d]."""
    return t[:, FIRST_REPLACED:].reshape(-1, t.shape[-1])


def put_rows(original: Tensor, rows: Tensor) -> Tensor:
    """``original`` with positions 1.. taken from ``rows`` ([rows, d])."""
    batch, pos, d = original.shape
    replaced = rows.to(original.dtype).reshape(batch, pos - FIRST_REPLACED, d)
    return torch.cat([original[:, :FIRST_REPLACED], replaced], dim=1)


def splice_hook_name(lm, layer: int) -> str:
    return lm.hook_name(layer, lm.mlp_out_hook_for_splice)


# ----- dictionaries -----------------------------------------------------------

class DictionarySplice:
    """Per-layer SAEs or transcoders, one module per layer."""

    def __init__(self, modules: dict[int, nn.Module]):
        if not modules:
            raise UserError("no dictionaries to splice")
        self.modules = dict(sorted(modules.items()))
        self.layers = tuple(self.modules)

    def hooks(self, lm, replace, record):
        hooks: list[Hook] = []
        for layer in replace:
            module = self.modules[layer]
            stash: dict[str, Tensor] = {}
            if module.cfg.kind == "transcoder":
                hooks.append((lm.hook_name(layer, "mlp_in"), _stash_into(stash)))
            hooks.append((splice_hook_name(lm, layer), self._replace(layer, module, stash, record)))
        return hooks

    @staticmethod
    def _replace(layer: int, module: nn.Module, stash: dict, record: Record | None):
        def hook(y: Tensor, hook=None) -> Tensor:
            x = stash.pop("x") if module.cfg.kind == "transcoder" else rows_of(y)
            acts = module.encode(x.float())
            recon = module.decode(acts)
            if record is not None:
                record(layer, rows_of(y), recon, acts)
            return put_rows(y, recon)

        return hook


def _stash_into(stash: dict):
    def hook(x: Tensor, hook=None) -> None:
        stash["x"] = rows_of(x)

    return hook


class CLTSplice:
    """A cross-layer transcoder, spliced live.

    Sources are encoded from the live MLP input as the forward reaches them;
    in single-layer mode (``replace=[j]``) the sources below j see a clean
    stream, so their latents are the clean ones, as they should be.
    """

    def __init__(self, clt: nn.Module):
        self.clt = clt
        self.layers = tuple(clt.cfg.layers)

    def hooks(self, lm, replace, record):
        acts: dict[int, Tensor] = {}
        hooks: list[Hook] = []
        for i in (i for i in self.layers if i <= max(replace)):
            hooks.append((lm.hook_name(i, "mlp_in"), self._encode(i, acts)))
        for j in replace:
            hooks.append((splice_hook_name(lm, j), self._replace(j, acts, record)))
        return hooks

    def _encode(self, i: int, acts: dict):
        def hook(x: Tensor, hook=None) -> None:
            acts[i] = self.clt.encode_layer(i, rows_of(x).float())

        return hook

    def _replace(self, j: int, acts: dict, record: Record | None):
        def hook(y: Tensor, hook=None) -> Tensor:
            recon = self.clt.decode_layer(j, {i: a for i, a in acts.items() if i <= j})
            if record is not None:
                record(j, rows_of(y), recon, acts.get(j))
            return put_rows(y, recon)

        return hook


# ----- running --------------------------------------------------------------------

class _Stop(Exception):
    pass


def final_hidden(lm, tokens: Tensor, hooks: list[Hook]) -> Tensor:
    """Run ``tokens`` with ``hooks`` up to the unembedding; its input [batch, pos, d]."""
    box: dict[str, Tensor] = {}

    def grab(h: Tensor, hook=None):
        box["h"] = h
        raise _Stop

    try:
        with torch.inference_mode():
            lm.bridge.run_with_hooks(tokens, fwd_hooks=[*hooks, (UNEMBED_IN, grab)])
    except _Stop:
        pass
    return box["h"]


def logits(lm, hidden: Tensor) -> Tensor:
    """Unembed final hidden states [rows, d] -> fp32 logits [rows, vocab]."""
    with torch.inference_mode():
        out = lm.bridge.unembed(hidden.contiguous()).float()
        cap = getattr(lm.hf_model.config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
    return out
