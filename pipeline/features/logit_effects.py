"""What a latent writes, read through the unembedding: the tokens it promotes and suppresses.

The direct path only: a latent's decoder direction (summed over every layer
it writes to, for a CLT) added to the residual stream, then the model's own
final norm and unembedding. The direction is taken through the
``Decomposition`` contract (decode a one-hot latent minus decode nothing), so
any method works, and scaled to unit RMS before the norm, as the residual
stream would carry it. The norm is the model's module applied as is, minus
what it makes of a zero vector (a LayerNorm's bias, the same for every
latent): RMSNorm's weight, Gemma's (1 + weight), LayerNorm's centring all
come from the model's code, not from a re-implementation here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.core.errors import UserError
from pipeline.methods.base import Decomposition


def final_norm(hf_model) -> torch.nn.Module:
    """The norm applied before the unembedding, found on the HF model's base."""
    base = hf_model.base_model
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            # TransformerBridge may have put its wrapper in the HF tree; the model's own norm is inside it
            return getattr(module, "original_component", None) or module
    raise UserError(f"cannot find the final norm of {type(hf_model).__name__}; logit effects need it")


def decoder_directions(decomposition: Decomposition, source: int, d_in: int, batch: int = 512) -> Tensor:
    """[n_latents, d_model]: what one unit of each latent of ``source`` adds to the residual stream
    over every layer it writes to (model units)."""
    n = decomposition.n_latents(source)
    targets = [j for j in decomposition.layers if source in decomposition.sources(j)]
    out = []
    with torch.inference_mode():
        for lo in range(0, n, batch):
            rows = min(batch, n - lo)
            one_hot = torch.zeros(rows, n)
            one_hot[torch.arange(rows), torch.arange(lo, lo + rows)] = 1.0
            x = torch.zeros(rows, d_in)
            total = 0
            for j in targets:
                zeros = {i: torch.zeros(rows, decomposition.n_latents(i)) for i in decomposition.sources(j)}
                hot = {**zeros, source: one_hot}
                total = total + decomposition.decode_layer(j, hot, x) - decomposition.decode_layer(j, zeros, x)
            out.append(total)
    return torch.cat(out)


def logit_effects(lm, directions: Tensor, top: int = 10, batch: int = 256) -> dict[str, Tensor]:
    """Top promoted / suppressed token ids and logit changes for unit-RMS directions [n, d]."""
    norm = final_norm(lm.hf_model)
    W_U = lm.hf_model.get_output_embeddings().weight.detach().float()  # [vocab, d]
    d = directions.shape[1]
    top = min(top, W_U.shape[0])
    parts: dict[str, list[Tensor]] = {"top_id": [], "top_value": [], "bottom_id": [], "bottom_value": []}
    with torch.inference_mode():
        zero = norm(torch.zeros(1, d)).float()
        for lo in range(0, directions.shape[0], batch):
            v = directions[lo:lo + batch].float()
            rms = v.pow(2).mean(-1, keepdim=True).sqrt()
            v = torch.where(rms > 0, v / rms.clamp(min=1e-12), 0.0)
            logits = (norm(v).float() - zero) @ W_U.T
            hi, hi_id = logits.topk(top, dim=-1)
            lo_v, lo_id = (-logits).topk(top, dim=-1)
            parts["top_id"].append(hi_id.to(torch.int32))
            parts["top_value"].append(hi)
            parts["bottom_id"].append(lo_id.to(torch.int32))
            parts["bottom_value"].append(-lo_v)
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}
