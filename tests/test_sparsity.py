"""Sparsity variants: selection rules, inference threshold, STE gradients, sparse autograd."""

from __future__ import annotations

import math

import pytest
import torch

import pipeline.methods.sparsity as sp
from pipeline.methods import kernels
from pipeline.methods.codes import DenseCodes, SparseCodes
from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.core.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fp64(monkeypatch):
    """Exact arithmetic for gradient comparisons (training matmuls are bf16 otherwise)."""
    monkeypatch.setattr(sp, "TRAIN_MATMUL_DTYPE", torch.float64)


def weights(n_latents=32, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_latents, d, generator=g, dtype=torch.float64),
            torch.randn(n_latents, generator=g, dtype=torch.float64) * 0.1)


def test_registry_has_the_four_variants():
    assert set(sp.SPARSITY) == {"vanilla", "topk", "batchtopk", "jumprelu"}
    with pytest.raises(KeyError):
        sp.make_sparsity("nope", 16, 4)


def test_topk_keeps_the_k_largest_per_row(fp64):
    W, b = weights()
    x = torch.randn(10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    topk = sp.make_sparsity("topk", 32, 5).train()
    acts = topk.encode(x, W, b).to_dense()
    pre = x @ W.T + b
    expected = torch.zeros_like(pre).scatter(1, pre.topk(5, dim=1).indices, pre.topk(5, dim=1).values).relu()
    torch.testing.assert_close(acts, expected)
    assert ((acts > 0).sum(1) <= 5).all()


@pytest.mark.parametrize("seed", range(5))
def test_batchtopk_selects_k_times_batch_and_eval_is_batch_independent(fp64, seed):
    W, b = weights()
    x = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    btk = sp.make_sparsity("batchtopk", 32, 4).train()
    codes = btk.encode(x, W, b)
    assert codes.pattern.nnz == 4 * 64
    counts = (codes.to_dense() != 0).sum(1)
    assert counts.max() > counts.min()  # rows get different numbers of latents
    btk.update(codes)
    assert math.isfinite(float(btk.threshold)) and float(btk.threshold) > 0
    btk.eval()
    alone = btk.encode(x[:1], W, b).to_dense()
    in_batch = btk.encode(x, W, b).to_dense()[:1]
    torch.testing.assert_close(alone, in_batch)
    pre = x[:1] @ W.T + b
    torch.testing.assert_close(alone, pre * (pre > btk.threshold), rtol=1e-5, atol=1e-5)  # eval matmuls are fp32


def test_jumprelu_ste_gradients(fp64):
    settings = sp.SparsitySettings(bandwidth=0.5)
    jr = sp.make_sparsity("jumprelu", 4, 2, settings).double().train()
    with torch.no_grad():
        jr.log_threshold.copy_(torch.log(torch.tensor([1.0, 1.0, 1.0, 1.0])))
    W = torch.eye(4, dtype=torch.float64)
    b = torch.zeros(4, dtype=torch.float64)
    x = torch.tensor([[0.9, 1.2, 0.3, 2.0]], dtype=torch.float64, requires_grad=True)
    codes = jr.encode(x, W, b)
    torch.testing.assert_close(codes.to_dense().detach(), torch.tensor([[0.0, 1.2, 0.0, 2.0]], dtype=torch.float64))
    codes.to_dense().sum().backward(retain_graph=True)
    # d/dt of z*H(z-t) = -(t/eps) K((z-t)/eps): latents 0 (z=0.9) and 1 (z=1.2) are in the band
    expected_t = torch.tensor([-(1 / 0.5), -(1 / 0.5), 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(jr.log_threshold.grad, expected_t * 1.0)  # d t / d log t = t = 1
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=torch.float64))
    jr.log_threshold.grad = None
    penalty = jr.penalty(codes, torch.ones(4, 3, dtype=torch.float64))
    penalty.backward()
    coef = float(jr.coef)
    torch.testing.assert_close(jr.log_threshold.grad, torch.tensor([-coef / 0.5, -coef / 0.5, 0, 0], dtype=torch.float64))


def test_target_l0_controller_moves_the_coefficient_towards_k():
    for variant in ("vanilla", "jumprelu"):
        s = sp.make_sparsity(variant, 16, 4)
        before = float(s.coef)
        s.update(DenseCodes(torch.ones(3, 16)))  # L0 16 > k 4: penalise more
        assert float(s.coef) > before
        s2 = sp.make_sparsity(variant, 16, 4)
        s2.update(DenseCodes(torch.zeros(3, 16)))  # L0 0 < k: penalise less
        assert float(s2.coef) < before
    jr = sp.make_sparsity("jumprelu", 16, 4)
    before = jr.log_threshold.detach().clone()
    jr.update(DenseCodes(torch.ones(3, 16)))
    assert (jr.log_threshold > before).all()  # JumpReLU also raises its thresholds directly


def test_vanilla_l1_is_weighted_by_decoder_norms():
    s = sp.make_sparsity("vanilla", 3, 1)
    codes = DenseCodes(torch.tensor([[1.0, 2.0, 0.0]]))
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    base = float(s.penalty(codes, W_dec))
    W_dec[1] *= 3
    assert float(s.penalty(codes, W_dec)) == pytest.approx(base + float(s.coef) * 2 * 2)


@pytest.mark.parametrize("aux_path", ["dense", "sparse"])
@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_sparse_gradients_equal_dense_autograd(fp64, variant, aux_path, monkeypatch):
    """SelectedPreacts/SparseDecode (and AuxK, both its paths) give the gradients of the dense formulation."""
    monkeypatch.setattr(kernels, "AUXK_DENSE_MIN_DENSITY", 0.0 if aux_path == "dense" else 2.0)
    cfg = TranscoderConfig(variant=variant, k=4, d_in=8, d_out=6, n_latents=32, aux_k=3)
    d = Transcoder(cfg).double().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 8, generator=g, dtype=torch.float64)
    y = torch.randn(10, 6, generator=g, dtype=torch.float64)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[5:20] = True
    out = d.training_step(x, y, dead)
    loss, codes = out.loss, out.codes
    sparse_grads = torch.autograd.grad(loss, list(d.parameters()))

    pre = x @ d.W_enc.T + d.b_enc
    active = codes.to_dense().detach() != 0
    err = (torch.relu(pre) * active) @ d.W_dec + d.b_dec - y
    dead_idx = dead.nonzero().squeeze(1)
    aux_mask = torch.zeros_like(active).scatter(1, dead_idx[pre.detach()[:, dead_idx].topk(3, dim=1).indices], True)
    aux_recon = (torch.relu(pre) * aux_mask) @ d.W_dec
    residual = err.detach()
    dense_loss = err.pow(2).mean() + cfg.aux_coef * (aux_recon - residual).pow(2).sum() / residual.pow(2).sum()
    dense_grads = torch.autograd.grad(dense_loss, list(d.parameters()))
    assert float(loss) == pytest.approx(float(dense_loss), rel=1e-6)
    for (name, _), a, b in zip(d.named_parameters(), sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="bandwidth"):
        sp.SparsitySettings(bandwidth=0)
    with pytest.raises(UserError, match="K=0"):
        TranscoderConfig(variant="topk", k=0, d_in=4, d_out=4, n_latents=8)


def test_mostly_zero_dense_codes_decode_sparsely_with_the_same_gradients():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(40, 100, generator=g, dtype=torch.float64).relu() * (torch.rand(40, 100, generator=g) < 0.03)
    acts.requires_grad_()
    W_dec = torch.randn(100, 6, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(40, 6, generator=g, dtype=torch.float64)
    sparse_out = DenseCodes(acts).decode(W_dec)
    ga, gw = torch.autograd.grad(sparse_out, [acts, W_dec], grad)
    dense_out = acts @ W_dec
    da, dw = torch.autograd.grad(dense_out, [acts, W_dec], grad)
    torch.testing.assert_close(sparse_out, dense_out)
    torch.testing.assert_close(gw, dw)
    nonzero = acts.detach() != 0
    torch.testing.assert_close(ga[nonzero], da[nonzero])  # zero latents carry no gradient through a ReLU-like code


def test_jumprelu_sparse_training_path_equals_the_dense_formulation(fp64):
    """Training keeps only entries above the band's lower edge; gradients must match the dense JumpReLU."""
    g = torch.Generator().manual_seed(3)
    W, b = weights(n_latents=64, d=8, seed=3)
    W.requires_grad_(), b.requires_grad_()
    W_dec = torch.randn(64, 5, generator=g, dtype=torch.float64)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randn(30, 5, generator=g, dtype=torch.float64)
    jr = sp.make_sparsity("jumprelu", 64, 4, sp.SparsitySettings(bandwidth=1.0)).double().train()
    with torch.no_grad():
        jr.log_threshold.copy_(torch.rand(64, generator=g, dtype=torch.float64))
    codes = jr.encode(x, W, b)
    assert isinstance(codes, SparseCodes)
    loss = (codes.decode(W_dec) - y).pow(2).sum() + jr.penalty(codes, W_dec)
    sparse = torch.autograd.grad(loss, [jr.log_threshold, W, b])

    t = jr.log_threshold.exp()
    pre = x @ W.T + b
    acts = kernels.JumpReLUFn.apply(pre, t, 1.0)
    dense_loss = (acts @ W_dec - y).pow(2).sum() + jr.coef * kernels.StepFn.apply(pre, t, 1.0).sum() / 30
    dense = torch.autograd.grad(dense_loss, [jr.log_threshold, W, b])
    assert float(loss) == pytest.approx(float(dense_loss))
    assert dense[0].abs().sum() > 0
    for a, b_ in zip(sparse, dense):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("massive_row", [False, True])
def test_batchtopk_two_stage_selection_is_exact(massive_row):
    g = torch.Generator().manual_seed(7)
    pre = torch.randn(50, 200, generator=g)
    if massive_row:  # one row deserves far more than 4k latents: the fallback must take over
        pre[3] += 100
    btk = sp.make_sparsity("batchtopk", 200, 5).train()
    values, pattern = btk.select(pre)
    got = torch.zeros_like(pre)
    got[pattern.rows(), pattern.cols] = values
    exact_values, flat = pre.reshape(-1).topk(5 * 50)
    want = torch.zeros(50 * 200).index_put_((flat,), exact_values).view(50, 200)
    torch.testing.assert_close(got, want)
    assert (pattern.rows().diff() >= 0).all()
    if massive_row:
        assert (got[3] != 0).sum() > 4 * 5


def test_vanilla_sparse_training_path_equals_the_dense_formulation(fp64):
    """Once few pre-activations are positive, vanilla trains on the sparse path with the dense gradients."""
    g = torch.Generator().manual_seed(4)
    W, b = weights(n_latents=400, d=8, seed=4)
    b = (b - 6.0).requires_grad_()  # ~1% of the entries positive: below SPARSE_DECODE_MAX_DENSITY
    W.requires_grad_()
    W_dec = torch.randn(400, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    y = torch.randn(60, 5, generator=g, dtype=torch.float64)
    van = sp.make_sparsity("vanilla", 400, 4).double().train()
    codes = van.encode(x, W, b)
    assert isinstance(codes, SparseCodes) and 0 < codes.pattern.nnz < 0.05 * 60 * 400
    loss = (codes.decode(W_dec) - y).pow(2).sum() + van.penalty(codes, W_dec)
    sparse = torch.autograd.grad(loss, [W, b, W_dec])

    acts = torch.relu(x @ W.T + b)
    dense_loss = (acts @ W_dec - y).pow(2).sum() + van.penalty(DenseCodes(acts), W_dec)
    dense = torch.autograd.grad(dense_loss, [W, b, W_dec])
    assert float(loss) == pytest.approx(float(dense_loss))
    for a, b_ in zip(sparse, dense):
        torch.testing.assert_close(a, b_)
    b.data += 6.0  # half the entries positive: the dense path
    assert isinstance(van.encode(x, W, b), DenseCodes)


def test_batchtopk_threshold_selection_handles_ties_and_falls_back(monkeypatch):
    """bf16 pre-activations tie a lot: exactly k x batch are kept, the same set as a flat top-k
    up to which of the tied entries are kept; an unlucky sample falls back to the exact two-stage path."""
    g = torch.Generator().manual_seed(8)
    pre = torch.randn(256, 512, generator=g).to(torch.bfloat16)
    btk = sp.make_sparsity("batchtopk", 512, 8).train()
    values, pattern = btk.select(pre)
    assert values.numel() == 8 * 256 and (pattern.rows().diff() >= 0).all()
    want = pre.reshape(-1).float().topk(8 * 256).values
    torch.testing.assert_close(values.float().sort().values, want.sort().values, rtol=0, atol=0)
    torch.testing.assert_close(pre[pattern.rows(), pattern.cols], values, rtol=0, atol=0)

    monkeypatch.setattr(sp, "BATCHTOPK_SAMPLE", 100)
    pre = torch.randn(50, 200, generator=g)
    pre.view(-1)[::101] += 1000  # the sample sees only huge values: its bound selects too few
    btk = sp.make_sparsity("batchtopk", 200, 8).train()
    assert btk._select_by_threshold(pre) is None
    values, pattern = btk.select(pre)
    got = torch.zeros_like(pre)
    got[pattern.rows(), pattern.cols] = values
    exact_values, flat = pre.reshape(-1).topk(8 * 50)
    torch.testing.assert_close(got, torch.zeros(50 * 200).index_put_((flat,), exact_values).view(50, 200))
