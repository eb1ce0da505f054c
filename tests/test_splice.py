"""Live splicing on the tiny model, checked against plain PyTorch hooks on the HF modules."""

from __future__ import annotations

import pytest
import torch

from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.eval.splice import DecompositionSplice, EditedSplice, final_hidden, logits
from pipeline.methods.transcoder import LayerwiseDecomposition

D = 64  # tiny-llama d_model


@pytest.fixture(scope="module")
def tokens(lm):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (3, 20), generator=gen)
    ids[:, 0] = lm.bos_token_id
    return ids


def transcoder(layer: int, seed: int, k: int = 4, n_latents: int = 96) -> Transcoder:
    module = Transcoder(TranscoderConfig(variant="topk", k=k, d_in=D, d_out=D, n_latents=n_latents, layer=layer, seed=seed))
    with torch.no_grad():
        module.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        module.W_dec.mul_(0.3)  # outputs the size of a real MLP's, so the stream stays sane
    return module.eval()


def identity_sae(layer: int) -> Transcoder:
    """A real vanilla SAE that reconstructs its input exactly: relu(x) - relu(-x) = x."""
    module = Transcoder(TranscoderConfig(variant="vanilla", k=1, d_in=D, d_out=D, n_latents=2 * D, kind="sae",
                                         layer=layer, input_hook="mlp_out", target_hook="mlp_out"))
    eye = torch.eye(D)
    with torch.no_grad():
        module.W_enc.copy_(torch.cat([eye, -eye]))
        module.W_dec.copy_(torch.cat([eye, -eye]))
        module.b_enc.zero_()
        module.b_dec.zero_()
    return module.eval()


def spliced_logits(lm, tokens, splice, replace, record=None) -> torch.Tensor:
    h = final_hidden(lm, tokens, splice.hooks(lm, replace, record))
    return logits(lm, h.reshape(-1, D)).reshape(*tokens.shape, -1)


def hf_logits(lm, tokens, replacements: dict[int, callable]) -> torch.Tensor:
    """Logits with each listed HF MLP's output replaced (positions 1..) by ``fn(mlp_input)``."""

    def hook(fn):
        def f(module, inputs, output):
            out = output.clone()
            out[:, 1:] = fn(inputs[0][:, 1:])
            return out
        return f

    handles = [lm.hf_model.model.layers[l].mlp.register_forward_hook(hook(fn)) for l, fn in replacements.items()]
    try:
        with torch.inference_mode():
            return lm.hf_model(tokens).logits.float()
    finally:
        for h in handles:
            h.remove()


def test_clean_path_reproduces_the_models_own_logits_bit_for_bit(lm, tokens):
    with torch.inference_mode():
        ref = lm.bridge(tokens)
    assert torch.equal(spliced_logits(lm, tokens, DecompositionSplice(LayerwiseDecomposition({0: identity_sae(0)})), []), ref)


def test_identity_splice_at_every_layer_is_exact(lm, tokens):
    clean = spliced_logits(lm, tokens, DecompositionSplice(LayerwiseDecomposition({0: identity_sae(0)})), [])
    layers = list(range(lm.n_layers))
    seen = []
    spliced = spliced_logits(lm, tokens, DecompositionSplice(LayerwiseDecomposition({l: identity_sae(l) for l in layers})), layers,
                             lambda layer, target, recon, acts: seen.append((layer, torch.equal(target, recon))))
    assert torch.equal(spliced, clean)
    assert seen == [(l, True) for l in layers]


def test_all_layer_transcoders_see_the_upstream_replacements(lm, tokens):
    modules = {1: transcoder(1, seed=1), 3: transcoder(3, seed=3)}
    splice = DecompositionSplice(LayerwiseDecomposition(modules))
    got = spliced_logits(lm, tokens, splice, [1, 3])
    want = hf_logits(lm, tokens, {l: m for l, m in modules.items()})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    clean = hf_logits(lm, tokens, {})
    assert (got - clean).abs().max() > 1e-2  # the replacement does change the model
    # BOS (position 0) is never replaced: its logits stay clean
    assert torch.equal(got[:, 0], spliced_logits(lm, tokens, splice, [])[:, 0])
    # layer 3 alone, fed the clean stream, differs from layer 3 after layer 1's replacement
    only_3 = spliced_logits(lm, tokens, splice, [3])
    torch.testing.assert_close(only_3, hf_logits(lm, tokens, {3: modules[3]}), rtol=1e-5, atol=1e-5)
    assert (only_3 - got).abs().max() > 1e-3


def test_record_reports_the_live_mlp_output_and_the_reconstruction(lm, tokens):
    modules = {0: transcoder(0, seed=0), 2: transcoder(2, seed=2)}
    records = {}
    spliced_logits(lm, tokens, DecompositionSplice(LayerwiseDecomposition(modules)), [0, 2],
                   lambda layer, target, recon, acts: records.setdefault(layer, (target, recon, acts)))
    # the live input of layer 2 (after layer 0 was replaced), captured independently
    captured = {}
    handle = lm.hf_model.model.layers[2].mlp.register_forward_hook(
        lambda mod, inp, out: captured.update(x=inp[0][:, 1:].reshape(-1, D), y=out[:, 1:].reshape(-1, D)))
    try:
        hf_logits(lm, tokens, {0: modules[0]})
    finally:
        handle.remove()
    target, recon, acts = records[2]
    torch.testing.assert_close(target, captured["y"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recon, modules[2](captured["x"]), rtol=1e-5, atol=1e-6)
    assert acts.shape == (tokens.shape[0] * (tokens.shape[1] - 1), 96)
    assert ((acts > 0).sum(-1) <= 4).all()


def make_clt(layers, seed: int, cross_scale: float = 0.0):
    """A real cross-layer transcoder; its cross-layer decoder slices are zero unless ``cross_scale``."""
    from pipeline.methods.clt import CLTConfig, CrossLayerTranscoder

    clt = CrossLayerTranscoder(CLTConfig(variant="topk", k=4, d_in=D, d_out=D, n_latents=96, layers=tuple(layers),
                                         seed=seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.1, generator=gen)
        for W in clt.W_dec:
            W[:, 0] *= 0.3
            W[:, 1:] = cross_scale * torch.randn(W[:, 1:].shape, generator=gen)
    return clt.eval()


def clt_as_transcoders(clt) -> dict[int, Transcoder]:
    """Per-layer transcoders with the CLT's encoders and same-layer decoders."""
    out = {}
    for p, layer in enumerate(clt.cfg.layers):
        t = transcoder(layer, seed=0)
        with torch.no_grad():
            t.W_enc.copy_(clt.W_enc[p])
            t.b_enc.copy_(clt.b_enc[p])
            t.W_dec.copy_(clt.W_dec[p][:, 0])
            t.b_dec.copy_(clt.b_dec[p])
            t.input_scale.copy_(clt.input_scale[p])
            t.target_scale.copy_(clt.target_scale[p])
        out[layer] = t
    return out


def test_clt_with_zero_cross_decoders_equals_per_layer_transcoders(lm, tokens):
    clt = make_clt([0, 1, 2], seed=10)
    per_layer = DecompositionSplice(LayerwiseDecomposition(clt_as_transcoders(clt)))
    for replace in ([0, 1, 2], [2]):
        torch.testing.assert_close(spliced_logits(lm, tokens, DecompositionSplice(clt), replace),
                                   spliced_logits(lm, tokens, per_layer, replace), rtol=1e-6, atol=1e-6)


def test_clt_is_spliced_live_with_cross_layer_contributions(lm, tokens):
    layers = [0, 1, 2]
    clt = make_clt(layers, seed=20, cross_scale=0.05)
    got = spliced_logits(lm, tokens, DecompositionSplice(clt), layers)
    # by hand: HF hooks, each MLP replaced from the live inputs of it and the layers before it
    live: dict[int, torch.Tensor] = {}

    def replace(j):
        def f(x):
            live[j] = x
            return clt.decode_layer(j, {i: clt.encode_layer(i, xi) for i, xi in live.items() if i <= j})
        return f

    want = hf_logits(lm, tokens, {j: replace(j) for j in layers})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - spliced_logits(lm, tokens, DecompositionSplice(LayerwiseDecomposition(clt_as_transcoders(clt))), layers)).abs().max() > 1e-3

    # single-layer mode at layer 2: the sources 0 and 1 see the clean stream, so the
    # reconstruction is the CLT's own forward on clean MLP inputs
    clean_inputs = {}
    handles = [lm.hf_model.model.layers[i].mlp.register_forward_hook(
        lambda mod, inp, out, i=i: clean_inputs.update({i: inp[0][:, 1:].reshape(-1, D)})) for i in layers]
    try:
        hf_logits(lm, tokens, {})
    finally:
        for h in handles:
            h.remove()
    records = {}
    spliced_logits(lm, tokens, DecompositionSplice(clt), [2], lambda layer, target, recon, acts: records.update({layer: recon}))
    assert list(records) == [2]
    with torch.no_grad():
        torch.testing.assert_close(records[2], clt(clean_inputs)[2], rtol=1e-5, atol=1e-6)


# ----- edits with the error added back ------------------------------------------------

def _clean_logits(lm, tokens):
    return logits(lm, final_hidden(lm, tokens, []).reshape(-1, D)).reshape(*tokens.shape, -1)


@pytest.mark.parametrize("which", ["per-layer", "clt"])
def test_an_edit_that_changes_nothing_is_the_clean_model_to_the_last_bit(lm, tokens, which):
    layers = [0, 1, 2]
    dec = make_clt(layers, seed=30) if which == "clt" else LayerwiseDecomposition({l: transcoder(l, seed=l) for l in layers})
    clean = _clean_logits(lm, tokens)
    for edit in (lambda i, a: a, lambda i, a: a.clone()):  # no edit; an edit to the same values
        got = spliced_logits(lm, tokens, EditedSplice(dec, edit), layers)
        assert torch.equal(got, clean)


def test_an_ablation_moves_only_what_the_ablated_latents_wrote(lm, tokens):
    t = transcoder(1, seed=3)
    dec = LayerwiseDecomposition({1: t})
    rec = {}
    spliced_logits(lm, tokens, EditedSplice(dec, lambda i, a: a), [1],
                   lambda layer, target, out, acts: rec.update(target=target, acts=acts))
    fired = (rec["acts"] > 0).sum(0)
    latent = int(fired.argmax())
    assert fired[latent] > 0

    def ablate(i, a):
        a = a.clone()
        a[:, latent] = 0
        return a

    got = {}
    spliced_logits(lm, tokens, EditedSplice(dec, ablate), [1], lambda layer, target, out, acts: got.update(out=out, target=target))
    # at layer 1 the stream upstream is clean, so the real output is the clean one and the
    # change is exactly the ablated latent's decoder row times its activation
    with torch.no_grad():
        want = rec["target"] - rec["acts"][:, latent:latent + 1] * t.W_dec[latent] / t.target_scale
    torch.testing.assert_close(got["out"], want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(spliced_logits(lm, tokens, EditedSplice(dec, ablate), [1]), _clean_logits(lm, tokens))
