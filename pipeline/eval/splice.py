"""Live splicing: replace MLP outputs inside the running model.

A ``Splice`` turns "replace the MLP output of these layers" into forward hooks
on the TransformerBridge. Each hook fires in the live forward, so with several
layers replaced every layer sees the residual stream that the upstream
replacements produced:

- any ``Decomposition`` (``DecompositionSplice``): at every source layer i the
  live MLP input is encoded when the forward passes it (an SAE encodes the
  output it replaces); at a replaced layer j the output is decoded from the
  latents of its sources (j itself for per-layer methods, every i <= j for a
  cross-layer transcoder);
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

from pipeline.data.models import StopForward
from pipeline.methods.base import Decomposition

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


# ----- decompositions -------------------------------------------------------------

class DecompositionSplice:
    """Any ``Decomposition`` (per-layer transcoders or SAEs, a CLT, ...), spliced live.

    Sources are encoded from the live input as the forward reaches them (at
    ``mlp_in``, or inside the replacing hook for a decomposition that reads
    its own target, an SAE); at a replaced layer j the output is decoded from
    the latents of ``sources(j)``. In single-layer mode (``replace=[j]``) the
    sources below j see a clean stream, so their latents are the clean ones.
    """

    def __init__(self, decomposition: Decomposition):
        self.decomposition = decomposition
        self.layers = tuple(decomposition.layers)

    def hooks(self, lm, replace, record):
        d = self.decomposition
        acts: dict[int, Tensor] = {}
        inputs: dict[int, Tensor] = {}
        reads_output = d.input_hook != "mlp_in"
        hooks: list[Hook] = []
        if not reads_output:
            for i in sorted({i for j in replace for i in d.sources(j)}):
                hooks.append((lm.hook_name(i, "mlp_in"), self._encode(i, acts, inputs)))
        for j in replace:
            hooks.append((splice_hook_name(lm, j), self._replace(j, acts, inputs, record, reads_output)))
        return hooks

    def _encode(self, i: int, acts: dict, inputs: dict):
        def hook(x: Tensor, hook=None) -> None:
            inputs[i] = rows_of(x).float()
            acts[i] = self.decomposition.encode_layer(i, inputs[i])

        return hook

    def _replace(self, j: int, acts: dict, inputs: dict, record: Record | None, reads_output: bool):
        def hook(y: Tensor, hook=None) -> Tensor:
            if reads_output:
                inputs[j] = rows_of(y).float()
                acts[j] = self.decomposition.encode_layer(j, inputs[j])
            return self._output(j, y, acts, inputs, record)

        return hook

    def _output(self, j: int, y: Tensor, acts: dict, inputs: dict, record: Record | None) -> Tensor:
        """What layer j's MLP output becomes, given the latents of its sources."""
        d = self.decomposition
        recon = d.decode_layer(j, {i: acts[i] for i in d.sources(j)}, inputs.get(j))
        if record is not None:
            record(j, rows_of(y), recon, acts.get(j))
        return put_rows(y, recon)


# ----- edits with the error added back -----------------------------------------------

# edit(source_layer, acts [rows, n_latents]) -> edited acts (a new tensor, or ``acts`` itself:
# no edit). Rows are the replaced positions (1..) of the batch, flattened batch-major.
Edit = Callable[[int, Tensor], Tensor]


class EditedSplice(DecompositionSplice):
    """A decomposition spliced with its reconstruction error added back, its latents edited.

    At a replaced layer j the model keeps its real MLP output ``y`` and adds
    what the edit changes: ``y + decode(edited latents) - decode(latents)``,
    so only the edited latents move anything. With no edit (``edit`` returns
    its input, or the edited latents equal the original ones) both decodes
    are the same computation on the same numbers, their difference is exactly
    zero, and the forward is the clean model's bit for bit. An edit at source
    layer i acts on every layer i writes to (a CLT's later layers too).
    Interventions, topic ablations and steering build on this one class.
    """

    def __init__(self, decomposition: Decomposition, edit: Edit):
        super().__init__(decomposition)
        self.edit = edit

    def _output(self, j: int, y: Tensor, acts: dict, inputs: dict, record: Record | None) -> Tensor:
        d = self.decomposition
        sources = d.sources(j)
        edited = {i: self.edit(i, acts[i]) for i in sources}
        real = rows_of(y).float()
        if all(edited[i] is acts[i] for i in sources):
            if record is not None:
                record(j, real, real, acts.get(j))
            return y
        delta = d.decode_layer(j, edited, inputs.get(j)) - d.decode_layer(j, {i: acts[i] for i in sources}, inputs.get(j))
        out = real + delta
        if record is not None:
            record(j, real, out, edited.get(j))
        return put_rows(y, out)


# ----- running --------------------------------------------------------------------

def final_hidden(lm, tokens: Tensor, hooks: list[Hook]) -> Tensor:
    """Run ``tokens`` with ``hooks`` up to the unembedding; its input [batch, pos, d]."""
    box: dict[str, Tensor] = {}

    def grab(h: Tensor, hook=None):
        box["h"] = h
        raise StopForward

    try:
        with torch.inference_mode():
            lm.bridge.run_with_hooks(tokens, fwd_hooks=[*hooks, (UNEMBED_IN, grab)])
    except StopForward:
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
