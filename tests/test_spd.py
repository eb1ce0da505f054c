"""SPD: rank-one subcomponents of each MLP matrix, causal importances, masked splice."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.models import load_lm, mlp_weights
from pipeline.eval.splice import DecompositionSplice, final_hidden, logits
from pipeline.methods.spd import MATRICES, SPDConfig, SPDLayer
from pipeline.methods.transcoder import LayerwiseDecomposition

pytestmark = pytest.mark.usefixtures("one_thread")


def _ce(lm, tokens, hooks) -> float:
    hidden = final_hidden(lm, tokens, hooks)[:, :-1].reshape(-1, lm.d_model)
    return float(torch.nn.functional.cross_entropy(logits(lm, hidden), tokens[:, 1:].reshape(-1)))


def test_full_rank_spd_with_every_subcomponent_active_is_the_mlp(data_dir):
    """C >= rank, all importances 1: the spliced model's CE is the clean CE."""
    lm = load_lm("tiny-llama", data_dir)
    layers = tuple(range(lm.n_layers))
    C = max(lm.d_model, lm.d_mlp)  # >= the rank of every matrix
    modules = {}
    for layer in layers:
        w = mlp_weights("tiny-llama", data_dir, layer)
        cfg = SPDConfig(k=1, d_in=lm.d_model, d_out=lm.d_model, n_latents=3 * C, layer=layer, d_mlp=lm.d_mlp, act=w.act)
        m = SPDLayer(cfg, {"gate": w.gate, "up": w.up, "down": w.down})
        m.threshold.fill_(float("-inf"))  # every subcomponent active
        modules[layer] = m.eval()
    tokens = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    clean = _ce(lm, tokens, [])
    spliced = _ce(lm, tokens, DecompositionSplice(LayerwiseDecomposition(modules)).hooks(lm, layers, None))
    assert spliced == pytest.approx(clean, abs=1e-4), (spliced, clean)
    assert float(modules[0].encode(torch.randn(3, lm.d_model)).mean()) == 1.0
    # a subcomponent masked out changes the output: the masks are what the splice gates
    x = torch.randn(5, lm.d_model)
    acts = modules[0].encode(x)
    acts[:, 0] = 0
    assert not torch.allclose(modules[0].reconstruct(acts, x), modules[0](x))


def planted_mlp(d=16, d_mlp=32, pieces=4):
    """A gated MLP of ``pieces`` mechanisms, each rank one in every matrix: mechanism i reads the
    input along b_i (orthonormal), drives its own hidden neuron and writes along o_i. All pieces
    have equal size, so the singular vectors (our initialisation) are an arbitrary mix of them."""
    g = torch.Generator().manual_seed(0)
    b = torch.linalg.qr(torch.randn(d, pieces, generator=g))[0].T
    h = torch.eye(d_mlp)[torch.randperm(d_mlp, generator=g)[:pieces]]
    o = torch.linalg.qr(torch.randn(d, pieces, generator=g))[0].T
    planted = {"gate": [torch.outer(h[i], b[i]) for i in range(pieces)],
               "up": [torch.outer(h[i], b[i]) for i in range(pieces)],
               "down": [torch.outer(o[i], h[i]) for i in range(pieces)]}

    def batch(n: int) -> torch.Tensor:  # one mechanism per row, at a random strength
        return b[torch.randint(pieces, (n,), generator=g)] * torch.empty(n, 1).uniform_(1, 2, generator=g)

    return planted, batch


def best_cosines(module: SPDLayer, m: str, pieces: list[torch.Tensor]) -> list[float]:
    C = module.cfg.components
    comps = torch.stack([torch.outer(module.V[m][:, c], module.U[m][c]).flatten() for c in range(C)]).detach()
    comps = comps / comps.norm(dim=1, keepdim=True)
    return [float((comps @ (p.T.flatten() / p.norm())).max()) for p in pieces]


def test_spd_recovers_a_planted_mlp_made_of_rank_one_pieces():
    torch.manual_seed(0)
    planted, batch = planted_mlp()
    cfg = SPDConfig(k=3, d_in=16, d_out=16, n_latents=12, d_mlp=32, importance_coef_init=1e-2, ci_hidden=8,
                    cap_massive_rows=False, layerwise=True)
    module = SPDLayer(cfg, {m: sum(p) for m, p in planted.items()})
    start = {m: min(best_cosines(module, m, planted[m])) for m in MATRICES}
    assert min(start.values()) < 0.7, start  # the SVD start does not hold the pieces (measured 0.43-0.47)
    x = batch(4096)
    module.init_from_stats({}, {"mean_sq_norm": float(module.true_output(x).pow(2).sum(1).mean())})
    module.init_from_batch(x, module.true_output(x))
    opt = torch.optim.Adam(module.parameters(), lr=2e-2)
    for _ in range(2500):
        x = batch(256)
        out = module.training_step(x, module.true_output(x), None, with_metrics=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        module.after_step(out, 256)
    found = {m: best_cosines(module, m, planted[m]) for m in MATRICES}
    assert all(min(c) > 0.9 for c in found.values()), found  # measured >= 0.96
    # each row needs one mechanism: its three pieces, and about nothing else, are important
    calib = module.start_calibration()
    x = batch(2048)
    module.add_calibration(calib, x)
    module.next_calibration_pass(calib)
    module.add_calibration(calib, x)
    module.finish_calibration(calib)
    acts = module.encode(x)
    assert float(acts.sum(1).mean()) == pytest.approx(3, abs=0.01)
    with torch.no_grad():
        err = (module.reconstruct(acts, x) - module.true_output(x)).pow(2).sum() / module.true_output(x).pow(2).sum()
    assert float(err) < 0.05, float(err)
