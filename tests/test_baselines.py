"""Baselines on the tiny model: neurons, zero- and mean-ablation, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.eval.baselines import NeuronSplice, mean_ablation, mlp_parameters, train_means, weights_per_hidden_unit, zero_ablation
from pipeline.core.errors import UserError
from pipeline.data.harvest import HarvestConfig, harvest
from pipeline.data.store import HarvestStore

from test_splice import D, hf_logits, spliced_logits


@pytest.fixture(scope="module")
def tokens(lm):
    ids = torch.randint(3, 259, (3, 20), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = lm.bos_token_id
    return ids


def test_neurons_with_every_unit_kept_is_the_clean_model(lm, tokens):
    layers = list(range(lm.n_layers))
    records = []
    got = spliced_logits(lm, tokens, NeuronSplice(lm.d_mlp, layers), layers,
                         lambda layer, target, recon, acts: records.append((target, recon, acts)))
    assert torch.equal(got, hf_logits(lm, tokens, {}))
    assert all(torch.equal(t, r) for t, r, _ in records)
    assert all(((a > 0).sum(-1) == lm.d_mlp).all() for _, _, a in records)


def test_neurons_keep_the_top_k_gated_hidden_units_through_the_real_down_projection(lm, tokens):
    k = 5
    mlp = lm.hf_model.model.layers[1].mlp
    gate, up, down = (getattr(mlp, n).weight.detach() for n in ("gate_proj", "up_proj", "down_proj"))

    def by_hand(x):
        hidden = F.silu(x @ gate.T) * (x @ up.T)  # act(gate x) * (up x)
        threshold = hidden.abs().topk(k, dim=-1).values[..., -1:]
        return (hidden * (hidden.abs() >= threshold)) @ down.T

    records = []
    got = spliced_logits(lm, tokens, NeuronSplice(k, [1]), [1], lambda *r: records.append(r))
    torch.testing.assert_close(got, hf_logits(lm, tokens, {1: by_hand}), rtol=1e-5, atol=1e-5)
    (layer, target, recon, acts), = records
    assert layer == 1 and ((acts > 0).sum(-1) == k).all()
    assert (recon - target).pow(2).sum() > 0
    assert weights_per_hidden_unit(lm, 1) == 3 * D
    assert mlp_parameters(lm, 1) == 3 * D * lm.d_mlp


def test_neuron_k_out_of_range_is_a_user_error(lm, tokens):
    with pytest.raises(UserError, match="MLP width"):
        NeuronSplice(lm.d_mlp + 1, [0]).hooks(lm, [0], None)


def test_zero_and_mean_ablation_replace_the_output_with_a_constant(lm, tokens, models_root, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(models_root / "models", target_is_directory=True)
    cfg = HarvestConfig(lm="tiny-llama", data="bbc", ctx=32, chunk_rows=256, layers=(0, 2), tokens=600, data_dir=data_dir)
    harvest(cfg, progress=False)
    means = train_means(lm, cfg.location, [0, 2])
    np.testing.assert_allclose(means[2].numpy(), HarvestStore.open(cfg.location).stats(2, "mlp_out")["mean"], rtol=1e-6)

    got = spliced_logits(lm, tokens, mean_ablation(lm, cfg.location, [0, 2]), [0, 2])
    want = hf_logits(lm, tokens, {l: (lambda x, m=means[l]: m.expand(*x.shape[:-1], D)) for l in (0, 2)})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    got = spliced_logits(lm, tokens, zero_ablation([0, 2], D), [2])
    torch.testing.assert_close(got, hf_logits(lm, tokens, {2: lambda x: torch.zeros_like(x)}), rtol=1e-5, atol=1e-5)

    with pytest.raises(UserError, match="not fully harvested"):
        train_means(lm, cfg.location, [1])
