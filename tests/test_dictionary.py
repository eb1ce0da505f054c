"""The dictionary family: units, decoder constraint, init, metrics, config validation, checkpoints."""

from __future__ import annotations

import pytest
import torch

from pipeline import checkpoint
from pipeline.methods.losses import auxk_loss, cap_weights, capped_mse, fvu_metrics
from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.core.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def make(variant="topk", kind="transcoder", **kw) -> Transcoder:
    cfg = dict(variant=variant, k=3, d_in=8, d_out=8 if kind == "sae" else 6, n_latents=24, kind=kind)
    if kind == "sae":
        cfg |= dict(input_hook="mlp_out", target_hook="mlp_out")
    return Transcoder(TranscoderConfig(**(cfg | kw)))


def stats(d: int, mean_sq_norm: float, mean: float = 0.0) -> dict:
    return {"mean": [mean] * d, "mean_sq_norm": mean_sq_norm, "var_total": mean_sq_norm - d * mean**2, "n": 100}


@pytest.mark.parametrize("variant", ["vanilla", "topk", "batchtopk", "jumprelu"])
def test_normalisation_is_undone_so_outputs_are_in_model_units(variant):
    d = make(variant)
    d.init_from_stats(stats(8, 400.0), stats(6, 9.0, mean=0.5))
    assert float(d.input_scale) == pytest.approx((8 / 400.0) ** 0.5)
    assert float(d.target_scale) == pytest.approx((6 / 9.0) ** 0.5)
    d.eval()
    x = torch.randn(5, 7, 8) * 7
    y = d(x)
    assert y.shape == (5, 7, 6)
    torch.testing.assert_close(y, d.decode(d.encode(x)), rtol=1e-5, atol=1e-5)
    # b_dec sits at the target mean: no latents -> the mean, in model units
    torch.testing.assert_close(d.decode(torch.zeros(24)), torch.full((6,), 0.5))
    # by hand: normalise, encode, decode, un-normalise
    with torch.no_grad():
        acts = d.encode(x)
        manual = (acts @ d.W_dec + d.b_dec) / d.target_scale
    torch.testing.assert_close(y, manual, rtol=1e-5, atol=1e-5)


def test_decoder_gradient_projection_and_unit_norm():
    d = make()
    d.W_dec.grad = torch.randn_like(d.W_dec)
    d.project_decoder_grad()
    parallel = (d.W_dec.grad * d.W_dec).sum(1)
    assert parallel.abs().max() < 1e-5
    with torch.no_grad():
        d.W_dec.mul_(3.0)
    d.normalize_decoder()
    torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(24))


def test_sae_init_ties_encoder_to_decoder_and_requires_same_hooks():
    sae = make(kind="sae")
    torch.testing.assert_close(sae.W_enc, sae.W_dec * 0.1)  # tied, encoder scaled down
    with pytest.raises(UserError, match="SAE"):
        TranscoderConfig(variant="topk", k=2, d_in=8, d_out=8, n_latents=16, kind="sae", input_hook="mlp_in",
                         target_hook="mlp_out")


def test_fvu_reported_with_and_without_massive_rows():
    y = torch.ones(10, 4)
    y[:, 0] = torch.arange(10.0)
    y[3] = 100.0  # one massive row
    err = torch.zeros(10, 4)
    err[3] = 5.0  # only the massive row is wrong
    m = fvu_metrics(err, y, torch.tensor(50.0))
    assert float(m["fvu"]) > 0
    assert float(m["fvu_normal"]) == 0.0
    assert float(m["massive_frac"]) == pytest.approx(0.1)


@pytest.mark.parametrize("bad, match", [
    (dict(k=24), "0 < K < LATENTS"), (dict(k=0), "0 < K"), (dict(k=-3), "0 < K"),
    (dict(variant="relu2"), "unknown MODEL"), (dict(kind="clt-ish"), "unknown KIND"), (dict(n_latents=0), "n_latents"),
])
def test_config_errors_name_the_field(bad, match):
    base = dict(variant="topk", k=3, d_in=8, d_out=6, n_latents=24)
    with pytest.raises(UserError, match=match):
        TranscoderConfig(**(base | bad))


@pytest.mark.parametrize("variant", ["vanilla", "topk", "batchtopk", "jumprelu"])
def test_checkpoint_round_trip(tmp_path, variant):
    d = make(variant)
    d.init_from_stats(stats(8, 30.0), stats(6, 3.0, mean=0.1))
    d.train()
    x = torch.randn(64, 8)
    d.init_from_batch(x, torch.randn(64, 6))
    codes = d.training_step(x, torch.randn(64, 6), None).codes
    d.sparsity.update(codes)  # batchtopk gets its threshold
    d.eval()
    checkpoint.save(d, tmp_path / "ck", {"note": "test"})
    loaded = checkpoint.load_module(tmp_path / "ck")
    assert type(loaded) is Transcoder and not loaded.training
    torch.testing.assert_close(loaded(x), d(x))
    config = checkpoint.read_config(tmp_path / "ck")
    assert config["config"]["variant"] == variant and config["metadata"] == {"note": "test"}
    assert config["input_scale"] == pytest.approx(float(d.input_scale))
    if variant == "batchtopk":
        assert config["threshold"] > 0


def test_load_refuses_unfinished_checkpoint(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="not a finished checkpoint"):
        checkpoint.load_module(tmp_path / "half")


def test_bf16_training_matmul_is_close_to_fp32():
    """Training runs its encoder matmul in bf16; the selected code must stay close to fp32's."""
    torch.manual_seed(0)
    d = Transcoder(TranscoderConfig(variant="topk", k=8, d_in=64, d_out=64, n_latents=256))
    x = torch.randn(512, 64)
    y = torch.randn(512, 64)
    d.train()
    out = d.training_step(x, y, None)
    loss_bf16, codes_bf16 = out.loss, out.codes
    d.eval()
    out = d.training_step(x, y, None)
    loss_fp32, codes_fp32 = out.loss, out.codes
    assert float(loss_bf16) == pytest.approx(float(loss_fp32), rel=2e-2)
    same = (codes_bf16.to_dense() > 0) == (codes_fp32.to_dense() > 0)
    assert same.float().mean() > 0.99


def test_geometric_median_init_ignores_massive_rows():
    from pipeline.methods.losses import geometric_median

    g = torch.Generator().manual_seed(0)
    normal = torch.randn(970, 6, generator=g) * 0.1 + 1.0
    massive = torch.zeros(30, 6)
    massive[:, 0] = 1000.0
    points = torch.cat([normal, massive])
    gm = geometric_median(points)
    assert (gm - 1.0).abs().max() < 0.1  # where the 97% are
    assert points.mean(0)[0] > 25  # the mean is dragged away
    d = make(d_in=6, d_out=6)
    d.init_from_stats(stats(6, float(points.pow(2).sum(1).mean())), stats(6, float(points.pow(2).sum(1).mean())))
    d.init_from_batch(points, points)
    torch.testing.assert_close(d.b_dec / d.target_scale, gm, rtol=1e-4, atol=1e-4)


def test_massive_rows_are_capped_in_the_loss():
    d = make(d_in=4, d_out=4, cap_massive_rows=True)
    d.massive_norm.fill_(10.0)
    y = torch.tensor([[1.0, 0, 0, 0], [1000.0, 0, 0, 0]])
    err = torch.tensor([[0.5, 0, 0, 0], [100.0, 0, 0, 0]])  # both 50% / 10% relative errors
    capped = float(capped_mse(err, y, d.massive_norm * d.target_scale))
    # the massive row counts like a row of norm 10 with the same 10% error: 1.0 instead of 10^4
    assert capped == pytest.approx((0.25 + 1.0) / 8)
    plain = make(d_in=4, d_out=4, cap_massive_rows=False)
    plain.massive_norm.fill_(10.0)
    assert float(capped_mse(err, y, None)) == pytest.approx((0.25 + 1e4) / 8)


@pytest.mark.parametrize("variant", ["batchtopk", "jumprelu", "vanilla"])
def test_calibration_sets_eval_l0_to_k_on_the_calibration_rows(variant):
    """After training, the inference threshold (BatchTopK), the common log-threshold shift
    (JumpReLU) or the common encoder-bias shift (vanilla) is set so that mean L0 = k exactly."""
    torch.manual_seed(0)
    d = make(variant=variant, k=5, d_in=12, d_out=12, n_latents=96)
    with torch.no_grad():
        d.b_enc.normal_(0, 0.3)
        d.W_enc.normal_(0, 1.0)
    x = torch.randn(2000, 12)
    x[::20] *= 8  # 5% of rows far larger: at the threshold they hold many more than 4k active entries
    if variant == "jumprelu":  # other rows: thresholds set from x itself would tie with its entries
        d.init_from_batch(torch.randn(500, 12), torch.randn(500, 12))
    d.eval()
    calibs = d.start_calibration()
    for second in (False, True):
        if second:
            d.next_calibration_pass(calibs)
        for part in x.split(500):
            d.add_calibration(calibs, part)
    info = d.finish_calibration(calibs)
    heavy = float((d.encode(x[::20]) != 0).float().sum(1).mean())
    assert heavy > 4 * 5 + 1, heavy  # rows a one-pass top-4k calibration would have truncated
    assert info["rows"] == 2000 and info["exact"]
    l0 = float((d.encode(x) != 0).float().sum(1).mean())
    assert l0 == pytest.approx(5.0, abs=1e-3), l0
    assert ("encoder_bias_shift" in info) == (variant == "vanilla")


def test_topk_has_nothing_to_calibrate():
    assert make(variant="topk").start_calibration() is None


def test_auxk_weights_massive_rows_like_the_main_loss():
    """AuxK with the cap weights: a massive row counts as a row at the cap, so it cannot own
    the dead latents; with every weight 1 it is the plain AuxK."""
    torch.manual_seed(0)
    n, d_in, d_out, rows = 24, 8, 6, 64
    W_enc, b_enc, W_dec = torch.randn(n, d_in), torch.zeros(n), torch.randn(n, d_out)
    x = torch.randn(rows, d_in)
    pre = x @ W_enc.T
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    residual = torch.randn(rows, d_out)
    residual[0] *= 100  # one massive row: almost all of the energy
    plain = auxk_loss(pre, dead, x, W_enc, b_enc, W_dec, residual, 4, 1.0, torch.float32)
    ones = auxk_loss(pre, dead, x, W_enc, b_enc, W_dec, residual, 4, 1.0, torch.float32, torch.ones(rows, 1))
    assert torch.allclose(plain, ones)
    w = cap_weights(residual, torch.tensor(5.0 * float(residual.norm(dim=-1).median())))
    assert w[0] < 0.01 and (w[1:] > 0.99).all()  # the massive row counts as a row at the cap
    # rows are weighted, not resampled: weight 0 on the massive row is AuxK on the other rows
    drop = torch.ones(rows, 1)
    drop[0] = 0
    without = auxk_loss(pre[1:], dead, x[1:], W_enc, b_enc, W_dec, residual[1:], 4, 1.0, torch.float32)
    assert torch.allclose(auxk_loss(pre, dead, x, W_enc, b_enc, W_dec, residual, 4, 1.0, torch.float32, drop), without)
    capped = auxk_loss(pre, dead, x, W_enc, b_enc, W_dec, residual, 4, 1.0, torch.float32, w[:, None])
    assert abs(float(capped - without)) < abs(float(plain - without))
