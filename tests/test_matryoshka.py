"""Matryoshka BatchTopK: nested prefix losses; prefixes are narrower dictionaries of their own."""

from __future__ import annotations

import pytest
import torch

from pipeline.methods.losses import capped_mse
from pipeline.methods.matryoshka import (MatryoshkaCLT, MatryoshkaCLTConfig, MatryoshkaConfig, MatryoshkaTranscoder,
                                        prefix_codes, prefix_sizes)
from pipeline.core.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prefix_sizes_are_increasing_latent_counts_ending_at_the_width():
    assert prefix_sizes((), 2304) == (288, 576, 1152, 2304)
    assert prefix_sizes((0.5,), 100) == (50, 100)
    with pytest.raises(UserError, match="increasing fractions"):
        prefix_sizes((0.5, 0.25), 100)


def test_the_loss_is_the_mean_of_the_prefix_reconstructions_and_a_prefix_is_a_dictionary():
    torch.manual_seed(0)
    cfg = MatryoshkaConfig(variant="batchtopk", k=4, d_in=16, d_out=16, n_latents=64, prefixes=(8, 32, 64),
                           cap_massive_rows=False)
    m = MatryoshkaTranscoder(cfg)
    x, y = torch.randn(512, 16), torch.randn(512, 16)
    m.init_from_batch(x, y)
    m.train()
    out = m.training_step(x, y, None)
    xn, yn = x * m.input_scale, y * m.target_scale
    codes = m.sparsity.encode(xn, m.W_enc, m.b_enc)
    want = torch.stack([capped_mse(prefix_codes(codes, p).decode(m.W_dec) + m.b_dec - yn, yn, None)
                        for p in (8, 32, 64)]).mean()
    torch.testing.assert_close(out.recon, want)
    assert {"fvu_prefix8", "fvu_prefix32"} <= set(out.metrics)
    # the first 32 latents, cut out, answer exactly as the whole dictionary with the rest silenced
    m.eval()
    m.sparsity.threshold.fill_(0.2)
    cut = m.prefix(32)
    assert (cut.cfg.n_latents, cut.cfg.prefixes, cut.cfg.k, cut.cfg.trained_latents) == (32, (8, 32), 4, 64)
    acts = m.encode(x)
    acts[:, 32:] = 0
    torch.testing.assert_close(cut(x), m.decode(acts))


def test_a_matryoshka_clt_prefix_keeps_the_first_latents_of_every_source_layer():
    torch.manual_seed(0)
    clt = MatryoshkaCLT(MatryoshkaCLTConfig(variant="batchtopk", k=3, d_in=8, d_out=8, n_latents=32, layers=(0, 1),
                                            prefixes=(8, 16, 32)))
    x = {0: torch.randn(64, 8), 1: torch.randn(64, 8)}
    clt.train()
    out = clt.training_step(x, {0: torch.randn(64, 8), 1: torch.randn(64, 8)}, None)
    out.loss.backward()
    assert all(p.grad is not None for p in clt.W_dec)
    clt.eval()
    for piece in clt.sparsity:
        piece.threshold.fill_(0.1)
    cut = clt.prefix(16)
    acts = {layer: clt.encode_layer(layer, x[layer]) for layer in (0, 1)}
    for a in acts.values():
        a[:, 16:] = 0
    torch.testing.assert_close(cut.decode_layer(1, {i: cut.encode_layer(i, x[i]) for i in (0, 1)}),
                               clt.decode_layer(1, acts))
