"""RkCNN decoder initialisation: random subspace probes find sparse feature directions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.data.toy import ToyConfig, ground_truth, toy_rows
from pipeline.methods.coder import LATER_FIELDS
from pipeline.methods.rkcnn import rkcnn_directions
from pipeline.methods.transcoder import Transcoder, TranscoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _best_cos(rows: torch.Tensor, truth: np.ndarray) -> torch.Tensor:
    t = torch.tensor(truth, dtype=torch.float32)
    return (rows @ t.T).max(dim=1).values


def _kurtosis(y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    proj = (y - y.mean(0)) @ rows.T
    return proj.pow(4).mean(0) / proj.pow(2).mean(0).pow(2)


def test_rkcnn_directions_point_at_true_features_of_the_toy_model():
    cfg = ToyConfig(d_model=32, n_features=128, mean_active=3.0)
    y = torch.tensor(toy_rows(cfg, "train", 0, 0, 4096)["mlp_out"], dtype=torch.float32)
    truth = ground_truth(cfg, 0)["features_out"]
    gen = torch.Generator().manual_seed(0)
    found = rkcnn_directions(y, 64, 4, "kurtosis", gen)
    assert torch.allclose(found.norm(dim=1), torch.ones(64))
    random_rows = torch.randn(64, 32, generator=gen)
    random_rows /= random_rows.norm(dim=1, keepdim=True)
    # a probe sees only m coordinates, so its direction matches a feature partly: measured mean best
    # cosine 0.51 against 0.45 for random unit rows; and the selection picks heavy-tailed directions
    assert float(_best_cos(found, truth).mean()) > float(_best_cos(random_rows, truth).mean()) + 0.03
    assert float(_kurtosis(y, found).median()) > 1.05 * float(_kurtosis(y, random_rows).median())  # 4.44 vs 4.08
    # signed so the heavy tail is positive: the features fire positively along them
    proj = (y - y.mean(0)) @ found.T
    assert float((proj.pow(3).mean(0) > 0).float().mean()) == 1.0


def test_rkcnn_init_sets_a_fraction_of_the_decoder_and_ties_the_sae_encoder():
    cfg = TranscoderConfig(variant="topk", k=4, d_in=32, d_out=32, n_latents=64, kind="sae", input_hook="mlp_out",
                           decoder_init="rkcnn", rkcnn_fraction=0.25)
    sae = Transcoder(cfg)
    before = sae.W_dec.detach().clone()
    y = torch.tensor(toy_rows(ToyConfig(d_model=32, n_features=128), "train", 0, 0, 2048)["mlp_out"], dtype=torch.float32)
    sae.init_from_batch(y, y)
    assert not torch.allclose(sae.W_dec[:16], before[:16]) and torch.equal(sae.W_dec[16:], before[16:])
    torch.testing.assert_close(sae.W_enc[:16] / sae.W_enc[:16].norm(dim=1, keepdim=True), sae.W_dec[:16])
    # the default leaves configs (and so every existing checkpoint's training hash) as they were
    assert not set(LATER_FIELDS) & set(TranscoderConfig(d_in=4, d_out=4, n_latents=8, k=2).to_dict())
    assert cfg.to_dict()["decoder_init"] == "rkcnn"
    with pytest.raises(UserError, match="unknown INIT"):
        TranscoderConfig(d_in=4, d_out=4, n_latents=8, k=2, decoder_init="kmeans")
