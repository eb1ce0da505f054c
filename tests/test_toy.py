"""Ground truth: the toy model of superposition, written as a store, recovered by training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import checkpoint
from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.core.errors import UserError
from pipeline.data.loader import ActivationLoader, LoaderConfig
from pipeline.data.store import HarvestStore
from pipeline.data.toy import ToyConfig, load_truth, recovered_fraction, toy_rows, write_toy_store
from pipeline.methods.base import TrainJob
from pipeline.train.config import TrainConfig
from pipeline.train.jobs import train_jobs

TOY = ToyConfig(d_model=32, n_features=128, n_rows=32768, mean_active=4, seed=0)
K = 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "train-ctx129.zarr"
    return path, write_toy_store(path, TOY)


@pytest.fixture(scope="module")
def trained(toy_store, tmp_path_factory):
    """A TopK SAE and a TopK transcoder trained together in one pass over the toy store."""
    path, store = toy_store
    out = tmp_path_factory.mktemp("runs")
    members = []
    for kind, target in (("sae", "mlp_in"), ("transcoder", "mlp_out")):
        cfg = TranscoderConfig(variant="topk", k=K, d_in=32, d_out=32, n_latents=256, kind=kind,
                               input_hook="mlp_in", target_hook=target, seed=1)
        members.append(TrainJob(Transcoder(cfg), (0, "mlp_in"), (0, target), out / kind))
    train_cfg = TrainConfig(tokens=768 * 512, batch_size=512, lr=1e-2, wandb="disabled", progress=False)
    train_jobs(members, lambda: ActivationLoader(store, [(0, "mlp_in"), (0, "mlp_out")], LoaderConfig(batch_size=512)),
                  train_cfg)
    return {m.out_dir.name: checkpoint.load_module(m.out_dir) for m in members}


def test_toy_store_is_a_regular_harvest_store(toy_store):
    path, store = toy_store
    reopened = HarvestStore.open(path, layers=[0], hooks=["mlp_in", "mlp_out"])
    assert reopened.manifest["complete"] and reopened.manifest["lm"] == "toy"
    assert reopened.n_rows == 32768 - 32768 % 128 and reopened.d_model == 32
    chunk = reopened.read_chunk(0, "mlp_in", 1)
    again = toy_rows(TOY, "train", 0, 1, len(chunk))["mlp_in"]
    np.testing.assert_array_equal(chunk, again)  # every chunk is a pure function of its coordinates
    assert (chunk != 0).any() and reopened.stats(0, "mlp_in")["mean_sq_norm"] > 0
    truth = load_truth(path, 0)
    assert truth["features_in"].shape == (128, 32)
    np.testing.assert_allclose(np.linalg.norm(truth["features_out"], axis=1), 1.0)


def test_topk_sae_recovers_the_true_features(toy_store, trained):
    path, _ = toy_store
    truth = load_truth(path, 0)
    sae = trained["sae"]
    frac = recovered_fraction(truth["features_in"], sae.W_dec.detach().numpy(), min_cos=0.9)
    assert frac >= 0.9, f"only {frac:.0%} of the true features recovered at |cos| >= 0.9"


def test_transcoder_beats_dense_least_squares_of_the_same_l0(toy_store, trained):
    """Best rank-K linear map (reduced-rank regression: K dense latents per row) vs the K-sparse transcoder."""
    path, store = toy_store
    fit_rows = toy_rows(TOY, "train", 0, 0, 8192)
    test_rows = toy_rows(TOY, "eval", 0, 0, 4096)
    x, y = fit_rows["mlp_in"].astype(np.float64), fit_rows["mlp_out"].astype(np.float64)
    xm, ym = x.mean(0), y.mean(0)
    coef, *_ = np.linalg.lstsq(x - xm, y - ym, rcond=None)
    fitted = (x - xm) @ coef
    _, _, vt = np.linalg.svd(fitted, full_matrices=False)
    project = vt[:K].T @ vt[:K]  # keep the K directions of the fitted values that matter most
    xt, yt = test_rows["mlp_in"].astype(np.float64), test_rows["mlp_out"].astype(np.float64)

    def fvu(pred):
        return float(((pred - yt) ** 2).sum() / ((yt - yt.mean(0)) ** 2).sum())

    baseline = fvu(((xt - xm) @ coef) @ project + ym)
    with torch.no_grad():
        transcoder = trained["transcoder"]
        pred = transcoder(torch.from_numpy(xt).float()).double().numpy()
        l0 = float((transcoder.encode(torch.from_numpy(xt).float()) > 0).sum(1).float().mean())
    assert l0 <= K
    assert fvu(pred) < baseline, f"transcoder FVU {fvu(pred):.3f} vs rank-{K} least squares {baseline:.3f}"


def test_toy_config_is_validated():
    with pytest.raises(UserError, match="superposition"):
        ToyConfig(d_model=64, n_features=32)
