"""Interpretability scores and diagnostics (issue 12): the judge on the bundled model, its OpenAI-compatible
server as a real subprocess, Jacobian cosine, the tail split, snapshot matching and training snapshots."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from pipeline.analysis import autointerp as ai
from pipeline.analysis.emergence import compare, greedy_match, kmeans
from pipeline.analysis.faithfulness import jacobian_layer
from pipeline.analysis.judge import TOP_LOGPROBS, LocalJudge, OpenAIJudge, answer_row
from pipeline.analysis.tail import bucket_errors, fvu_split

# ----- the judge on the bundled model -------------------------------------------------------------

WORDS = {
    "government": ["The government said taxes would rise", "Critics of the government met on Monday",
                   "The new government plan was announced", "He blamed the government for the delay"],
    "album": ["Her new album sold well", "The band recorded an album in Paris", "The album topped the charts",
              "Fans waited for the album for years"],
    "match": ["The match ended in a draw", "They lost the match in extra time", "The final match was played in Rome",
              "Tickets for the match sold out"],
    "weather": ["The weather was cold all week", "Bad weather delayed the flights", "The weather improved by noon",
                "Forecasters expect warmer weather"],
}
NEUTRAL = ["Shares in the firm rose sharply", "The film won three awards", "She moved to London last year",
           "Prices fell for the third month", "The school opened a new library", "Doctors warned about the risks",
           "The company hired new staff", "Police arrested two men"]


def _context(tok, text: str, word: str | None) -> ai.Context:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ai.Context(ids, [1.0 if word and tok.decode([i]).strip() == word else 0.0 for i in ids])


@pytest.fixture(scope="module")
def chat_model(models_root):
    from pipeline.analysis.judge_server import load_chat_model
    from pipeline.data.models import ensure_model

    ensure_model("smollm2-135m", models_root)
    torch.set_num_threads(1)
    return load_chat_model("smollm2-135m", models_root)


@pytest.mark.slow
def test_detection_scores_a_token_identity_latent_near_one_and_a_shuffled_explanation_near_chance(chat_model):
    tok = chat_model.tok
    judge = LocalJudge(chat_model.model, tok, name="smollm2-135m")  # few-shot text, the offline default
    latents = [ai.Latent(f'token "{w}"', [], [_context(tok, t, w) for t in texts],
                         [_context(tok, t, None) for t in NEUTRAL[i::2]], f'"{w}"')
               for i, (w, texts) in enumerate(WORDS.items())]
    assert all(sum(c.acts) == 1 for l in latents for c in l.pos)  # the word is one token, fired once
    true = ai.detection(judge, tok, latents, [l.known for l in latents])
    order = ai.derangement(len(latents), 0)
    shuffled = ai.detection(judge, tok, latents, [latents[o].known for o in order])
    true_auroc = np.mean([s.auroc for s in true])
    shuffled_auroc = np.mean([s.auroc for s in shuffled])
    assert true_auroc >= 0.9, [s.auroc for s in true]
    assert 0.2 <= shuffled_auroc <= 0.75, [s.auroc for s in shuffled]
    check = ai.verdict(ai.SetResult("tokens", [l.name for l in latents], [], true, true),
                       ai.SetResult("tokens-shuffled", [l.name for l in latents], [], shuffled, shuffled))
    assert check["judge_discriminates"], check


@pytest.mark.slow
def test_the_openai_client_against_the_real_local_server(chat_model, smol_data_dir):
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "judge-server", "--port", "0",
                             "--data-dir", str(smol_data_dir)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert "serving smollm2-135m at http://" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = line.split(" at ")[1].split()[0]
        client = OpenAIJudge(base, "smollm2-135m")
        local = LocalJudge(chat_model.model, chat_model.tok, render="chat")
        prompts = [[{"role": "user", "content": "Is Paris in France? Answer Yes or No."}],
                   [{"role": "user", "content": "Is the sun cold? Answer Yes or No."}]]
        remote_lp = client.answer_logprobs(prompts, ["Yes", "No"])
        # the same computation in process: this model's top 20 next tokens, read by the client's own rule
        local_lp = []
        for _, lp in local._next_logprob_batches(prompts):
            for row in lp:
                values, ids = row.topk(TOP_LOGPROBS)
                top = [{"token": chat_model.tok.decode([int(i)]), "logprob": float(v)} for v, i in zip(values, ids)]
                local_lp.append(answer_row(top, ["Yes", "No"]))
        assert torch.allclose(remote_lp, torch.tensor(local_lp), atol=1e-3), (remote_lp, local_lp)
        assert (remote_lp.exp().sum(1) > 0.3).all()  # Yes and No are most of the mass: real answers were read
        text = client.complete([[{"role": "user", "content": "Say hello."}]], 8)[0]
        assert isinstance(text, str) and text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_answer_row_reads_spellings_and_floors_unlisted_answers():
    top = [{"token": " Yes", "logprob": -0.5}, {"token": "yes", "logprob": -2.0}, {"token": "Maybe", "logprob": -3.0}]
    yes, no = answer_row(top, ["Yes", "No"])
    assert yes == pytest.approx(float(torch.tensor([-0.5, -2.0]).logsumexp(0)))
    assert no < -3.0


# ----- faithfulness ---------------------------------------------------------------------------------

class MLPAsDecomposition:
    """An exact replacement: latents are the MLP input itself, decoded by the MLP."""

    input_hook = "mlp_in"

    def __init__(self, lm, layer: int, scale: float = 1.0):
        self.lm, self.layers, self.scale = lm, (layer,), scale

    def sources(self, layer):
        return (layer,)

    def n_latents(self, layer):
        return self.lm.d_model

    def encode_layer(self, layer, x):
        return x

    def decode_layer(self, layer, acts, x=None):
        return self.scale * self.lm.mlp_module(layer)(acts[layer])


@pytest.mark.parametrize("probes", [0, 16])
def test_jacobian_cosine_of_an_identity_replacement_is_one(lm, probes):
    torch.manual_seed(0)
    x = torch.randn(24, lm.d_model)
    r = jacobian_layer(lm, MLPAsDecomposition(lm, 1, scale=3.0), 1, {1: x}, probes, seed=0)
    assert r["mean"] == pytest.approx(1.0, abs=1e-5)
    assert ("exact" in r["mode"]) == (probes == 0)


def test_jacobian_cosine_of_another_layers_mlp_is_below_one(lm):
    class Wrong(MLPAsDecomposition):
        def decode_layer(self, layer, acts, x=None):
            return self.lm.mlp_module(0)(acts[layer])

    x = torch.randn(24, lm.d_model)
    assert jacobian_layer(lm, Wrong(lm, 1), 1, {1: x}, 0, seed=0)["mean"] < 0.9


def test_the_neuron_baseline_keeping_every_unit_has_the_mlps_jacobian(lm):
    from pipeline.analysis.faithfulness import neuron_jacobian_layer

    x = torch.randn(24, lm.d_model)
    assert neuron_jacobian_layer(lm, 2, lm.d_mlp, x, 0, seed=0)["mean"] == pytest.approx(1.0, abs=1e-5)
    assert neuron_jacobian_layer(lm, 2, 2, x, 0, seed=0)["mean"] < 0.95


# ----- the tail -----------------------------------------------------------------------------------

def test_the_tail_split_sums_to_the_total_fvu():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(500, 16, generator=g)
    y[:15] *= 30  # 3% massive rows
    recon = y + 0.3 * torch.randn(500, 16, generator=g)
    massive = y.norm(dim=-1) > 5 * y.norm(dim=-1).median()
    split = fvu_split(y, recon, massive)
    assert split["fvu_massive"] + split["fvu_ordinary"] == pytest.approx(split["fvu"], rel=1e-12)
    assert split["massive_rows"] == pytest.approx(0.03)
    assert split["massive_variance_share"] > 0.9
    edges = np.geomspace(float(y.norm(dim=-1).min()), float(y.norm(dim=-1).max()) * 1.0001, 7)
    buckets = bucket_errors(y, recon, edges)
    assert sum(b["rows"] for b in buckets) == 500


# ----- emergence --------------------------------------------------------------------------------

def test_matching_a_dictionary_with_itself_finds_every_latent():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(300, 32, generator=g)
    alive = torch.ones(300, dtype=torch.bool)
    assert compare(d, alive, d, alive, 0.99) == {"alive_before": 300, "alive_after": 300, "matched": 300, "born": 0,
                                                 "died": 0, "mean_matched_cosine": pytest.approx(1.0)}
    perm = torch.randperm(300, generator=g)
    unit = d / d.norm(dim=-1, keepdim=True)
    rows, cols = greedy_match(unit @ unit[perm].T, 0.99)
    assert len(rows) == 300 and torch.equal(perm[cols], rows)
    half = alive.clone()
    half[:100] = False  # dead in the later state: they died
    out = compare(d, alive, d, half, 0.99)
    assert (out["matched"], out["died"], out["born"]) == (200, 100, 0)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(8)[:3] * 10
    x = torch.cat([c + torch.randn(40, 8, generator=g) for c in centres])
    labels = kmeans(x, 3, seed=0)
    for part in labels.split(40):
        assert len(part.unique()) == 1
    assert len(labels.unique()) == 3


def test_training_snapshots_change_nothing_and_feed_the_emergence_trajectory(tmp_path, one_thread):
    from dataclasses import replace

    from safetensors.torch import load_file

    from pipeline import checkpoint
    from pipeline.analysis.emergence import trajectory
    from pipeline.train.jobs import train_jobs
    from pipeline.train.snapshots import list_snapshots
    from test_train import SMALL, loader_factory, members_for, toy_data_dir

    data_dir = toy_data_dir(tmp_path)
    with_snaps = members_for([4], tmp_path / "snap")
    train_jobs(with_snaps, loader_factory(data_dir), replace(SMALL, snapshot_tokens=256 * 10))
    plain = members_for([4], tmp_path / "plain")
    train_jobs(plain, loader_factory(data_dir), SMALL)
    a, b = (load_file(j[0].out_dir / "weights.safetensors") for j in (with_snaps, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)  # snapshots leave the run and its result alone
    snaps = list_snapshots(with_snaps[0].out_dir)
    assert [t for t, _ in snaps] == [2560, 5120, 7680]  # every 10 of 40 steps; the checkpoint is the last state
    rows = trajectory(checkpoint.load(with_snaps[0].out_dir), 0, 0.5, 16, progress=False)
    assert [r["tokens"] for r in rows] == [5120, 7680, 10240]
    for r in rows:
        assert r["matched"] + r["born"] == r["alive_after"] and r["matched"] + r["died"] == r["alive_before"]
    assert rows[-1]["matched"] > 0
