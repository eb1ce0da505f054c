"""Faithfulness: does a replacement behave like the MLP it stands for, beyond matching its outputs?

**Jacobian cosine.** At real MLP inputs x (store rows of ``mlp_in``), the
replacement of layer j as a function of its own input, f_j(x) =
decode_j(latents of x, the other sources' latents held at their values), and
the true MLP g_j(x) have d_out x d_in Jacobians A and B. Their cosine
<A, B>_F / (|A|_F |B|_F) is computed per token and averaged:

- ``probes=0``: exactly, from d_out backward passes (output basis vectors);
- ``probes=P``: estimated from P random Gaussian output directions u
  (E[u u^T] = I, so sum_p <A^T u_p, B^T u_p> estimates <A, B>_F and likewise
  the norms; the ratio of the estimates is reported, slightly biased for small P).

**Feature-effect agreement.** For a latent firing at a position of a held-out
window: (a) ablate it in the replacement (``EditedSplice``: error added back,
only that latent changes, at that position) and (b) remove its decoder
direction from the true MLP output there (the projection of each written
layer's real output on that layer's decoder direction). Agreement is how often
the token whose log-probability rises most at that position is the same under
(a) and (b); the correlation of the two log-probability changes is reported too.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.progress import progress_bar
from pipeline.eval.baselines import down_projection
from pipeline.eval.splice import EditedSplice, final_hidden, logits, put_rows, rows_of, splice_hook_name
from pipeline.methods.base import Decomposition


def _vjps(fn, x: Tensor, probes: Tensor) -> Tensor:
    """[P, N, d_in]: rows of J(x_n)^T u_p for each probe u_p [P, d_out] (rows independent)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        out = []
        for p in range(probes.shape[0]):
            (g,) = torch.autograd.grad(y, x, probes[p].expand_as(y), retain_graph=p + 1 < probes.shape[0])
            out.append(g)
    return torch.stack(out)


def jacobian_cosine(replacement, mlp, x: Tensor, d_out: int, probes: int, seed: int = 0) -> Tensor:
    """Per-row cosine [N] of the Jacobians of ``replacement`` and ``mlp`` at rows ``x`` [N, d_in]."""
    if probes:
        u = torch.randn(probes, d_out, generator=torch.Generator().manual_seed(seed))
    else:
        u = torch.eye(d_out)
    a, b = _vjps(replacement, x, u), _vjps(mlp, x, u)
    dot = (a * b).sum((0, 2))
    return dot / (a.pow(2).sum((0, 2)).sqrt() * b.pow(2).sum((0, 2)).sqrt()).clamp(min=1e-30)


def replacement_fn(decomposition: Decomposition, layer: int, inputs: dict[int, Tensor]):
    """f(x): the replacement of ``layer`` as a function of its own input rows, other sources fixed."""
    with torch.no_grad():
        fixed = {i: decomposition.encode_layer(i, inputs[i]) for i in decomposition.sources(layer) if i != layer}

    def f(x: Tensor) -> Tensor:
        acts = {**fixed, layer: decomposition.encode_layer(layer, x)}
        return decomposition.decode_layer(layer, acts, x)

    return f


def jacobian_layer(lm, decomposition: Decomposition, layer: int, inputs: dict[int, Tensor], probes: int,
                   seed: int, chunk: int = 256) -> dict:
    """Mean (and s.e.) Jacobian cosine of one layer over the rows of ``inputs`` (every source's mlp_in rows)."""
    return _mean_cosine(lm, layer, inputs, lambda part: replacement_fn(decomposition, layer, part), probes, seed, chunk)


def neuron_replacement(lm, layer: int, k: int):
    """The neuron baseline as a differentiable function: the real MLP keeping its k hidden units of largest
    |activation| per row (as ``eval.baselines.NeuronSplice``), through a pre-hook on its output projection."""
    down, mlp = down_projection(lm, layer), lm.mlp_module(layer)

    def keep(module, inputs):
        h = inputs[0]
        index = h.abs().topk(k, dim=-1).indices
        return (torch.zeros_like(h).scatter(-1, index, h.gather(-1, index)),)

    def f(x: Tensor) -> Tensor:
        handle = down.register_forward_pre_hook(keep)
        try:
            return mlp(x)
        finally:
            handle.remove()

    return f


def neuron_jacobian_layer(lm, layer: int, k: int, x: Tensor, probes: int, seed: int, chunk: int = 256) -> dict:
    return _mean_cosine(lm, layer, {layer: x}, lambda part: neuron_replacement(lm, layer, k), probes, seed, chunk)


def _mean_cosine(lm, layer: int, inputs: dict[int, Tensor], make_fn, probes: int, seed: int, chunk: int) -> dict:
    mlp = lm.mlp_module(layer)
    cos = []
    n = inputs[layer].shape[0]
    for lo in range(0, n, chunk):
        part = {i: v[lo:lo + chunk] for i, v in inputs.items()}
        cos.append(jacobian_cosine(make_fn(part), mlp, part[layer], lm.d_model, probes, seed + lo).detach())
    c = torch.cat(cos).double()
    return {"mean": float(c.mean()), "se": float(c.std() / math.sqrt(len(c))) if len(c) > 1 else math.nan,
            "tokens": int(len(c)), "mode": "exact (all output directions)" if probes == 0 else
            f"estimated from {probes} random output directions"}


# ----- feature effects ---------------------------------------------------------------------------

def written_directions(decomposition: Decomposition, source: int, latent: int, d_in: int) -> dict[int, Tensor]:
    """{layer: what one unit of the latent adds to that layer's output} for each layer it writes to."""
    out = {}
    with torch.inference_mode():
        for j in decomposition.layers:
            if source not in decomposition.sources(j):
                continue
            zeros = {i: torch.zeros(1, decomposition.n_latents(i)) for i in decomposition.sources(j)}
            hot = {**zeros, source: zeros[source].clone()}
            hot[source][0, latent] = 1.0
            x = torch.zeros(1, d_in)
            out[j] = (decomposition.decode_layer(j, hot, x) - decomposition.decode_layer(j, zeros, x))[0]
    return out


def _one_latent_edit(source: int, latent: int, row: int):
    def edit(layer: int, acts: Tensor) -> Tensor:
        if layer != source:
            return acts
        acts = acts.clone()
        acts[row, latent] = 0
        return acts

    return edit


def _remove_direction(directions: dict[int, Tensor], row: int):
    hooks = []
    for j, d in directions.items():
        unit = d / d.norm().clamp(min=1e-12)

        def hook(y, hook=None, unit=unit):
            rows = rows_of(y).float().clone()
            rows[row] = rows[row] - (rows[row] @ unit) * unit
            return put_rows(y, rows)

        hooks.append((j, hook))
    return hooks


def effect_agreement(lm, decomposition: Decomposition, tokens: Tensor, n: int, seed: int, progress: bool) -> dict:
    """Over ``n`` (window, position, latent) draws from held-out ``tokens`` [n_seq, ctx]: how often the top
    next-token log-prob increase agrees between ablating the latent and removing its direction from the MLP."""
    rng = random.Random(seed)
    sources = sorted({i for j in decomposition.layers for i in decomposition.sources(j)})
    agree, corr = [], []
    bar = progress_bar(n, progress, desc="feature effects", unit="latent")
    for _ in range(n):
        seq = tokens[rng.randrange(tokens.shape[0])][None]
        source = rng.choice(sources)
        acts = _clean_acts(lm, decomposition, seq, source)
        row = rng.randrange(acts.shape[0] - 1)  # the last row predicts nothing in the window
        fired = acts[row].nonzero().flatten()
        if fired.numel() == 0:
            bar.update(1)
            continue
        latent = int(fired[acts[row, fired].argmax()])
        clean = _logprobs(lm, seq, [], row)
        splice = EditedSplice(decomposition, _one_latent_edit(source, latent, row))
        ablated = _logprobs(lm, seq, splice.hooks(lm, list(decomposition.layers), None), row)
        dirs = written_directions(decomposition, source, latent, lm.d_model)
        removed = _logprobs(lm, seq, [(splice_hook_name(lm, j), h) for j, h in _remove_direction(dirs, row)], row)
        da, dr = ablated - clean, removed - clean
        agree.append(float(da.argmax() == dr.argmax()))
        corr.append(float(torch.corrcoef(torch.stack([da, dr]))[0, 1]))
        bar.update(1)
    bar.close()
    a, c = np.array(agree), np.array([x for x in corr if math.isfinite(x)])
    return {"draws": len(agree), "top_increase_agreement": float(a.mean()) if len(a) else None,
            "se": float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None,
            "logprob_change_correlation": float(c.mean()) if len(c) else None}


def _clean_acts(lm, decomposition: Decomposition, seq: Tensor, source: int) -> Tensor:
    box = {}

    def grab(x, hook=None):
        box["x"] = rows_of(x).float()

    hook = lm.hook_name(source, decomposition.input_hook if decomposition.input_hook == "mlp_in" else "mlp_out")
    final_hidden(lm, seq, [(hook, grab)])
    with torch.inference_mode():
        return decomposition.encode_layer(source, box["x"])


def _logprobs(lm, seq: Tensor, hooks: list, row: int) -> Tensor:
    """Next-token log-probs at replaced row ``row`` (position row + 1)."""
    h = final_hidden(lm, seq, hooks)[0, row + 1]
    return F.log_softmax(logits(lm, h[None]), dim=-1)[0]


def run(lm, decomposition: Decomposition, store, eval_tokens: Tensor, rows: int, probes: int, effects: int,
        seed: int = 0, progress: bool = True, neuron_k: int | None = None) -> dict:
    """Per layer: Jacobian cosine at ``rows`` store rows (the last ones) of the replacement, and of the neuron
    baseline at ``neuron_k`` hidden units when given; then the feature-effect agreement."""
    sources = sorted({i for j in decomposition.layers for i in decomposition.sources(j)})
    start = max(0, store.n_rows - rows)
    chunk0 = start // store.chunk_rows
    inputs = {}
    for i in sorted(set(sources) | set(decomposition.layers)):
        x = np.concatenate([store.read_chunk(i, "mlp_in", c) for c in range(chunk0, store.n_chunks)])
        inputs[i] = torch.from_numpy(np.ascontiguousarray(x[start - chunk0 * store.chunk_rows:][:rows])).float()
    out = {"layers": {}}
    bar = progress_bar(len(decomposition.layers), progress, desc="jacobian", unit="layer")
    for j in decomposition.layers:
        out["layers"][str(j)] = {"jacobian_cosine": jacobian_layer(lm, decomposition, j, inputs, probes, seed)}
        if neuron_k:
            out["layers"][str(j)]["neurons_jacobian_cosine"] = neuron_jacobian_layer(lm, j, neuron_k, inputs[j],
                                                                                     probes, seed)
        bar.update(1)
    bar.close()
    out["feature_effects"] = effect_agreement(lm, decomposition, eval_tokens, effects, seed, progress)
    return out
