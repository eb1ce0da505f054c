"""Topic experiments: labels, AUROC, the classifier, ablation and steering on the tiny model, the CLI and Make."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO
from pipeline.core.errors import UserError

D = 64  # tiny-llama d_model


# ----- labels ---------------------------------------------------------------------------

def test_bbc_documents_carry_their_topic_and_the_split_is_unchanged():
    from pipeline.data import corpora

    for split in ("train", "eval"):
        docs = corpora.labelled("bbc", split)
        assert [d.key for d in docs] == [d.key for d in corpora.documents("bbc", split)]
        assert {d.label for d in docs} == {"business", "entertainment", "politics", "sports", "tech"}
        assert all(d.key.split("/")[1] == d.label for d in docs)


def test_a_corpus_without_labels_is_refused_and_a_label_field_is_read(tmp_path):
    from pipeline.data import corpora

    for name in ("sotu", "mix"):
        with pytest.raises(UserError, match="has no topic labels"):
            corpora.labelled(name, "train")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} " * 20, "topic": "ab"[i % 2]}) + "\n"
                            for i in range(60)))
    with pytest.raises(UserError, match="--label-field"):
        corpora.labelled(str(path), "train")
    docs = corpora.labelled(str(path), "train", label_field="topic")
    assert {d.label for d in docs} == {"a", "b"}
    with pytest.raises(UserError, match="no label in field 'kind'"):
        corpora.labelled(str(path), "train", label_field="kind")


# ----- AUROC ----------------------------------------------------------------------------

def test_auroc_matches_a_hand_computed_case_with_ties():
    from pipeline.analysis.topics import auroc, midranks, topic_auroc

    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.0])
    positive = np.array([False, True, False, True, False])
    assert midranks(scores).tolist() == [2.0, 3.5, 3.5, 5.0, 1.0]
    # positives 0.4 and 0.8 against negatives 0.1, 0.4, 0.0: 0.4 wins twice and ties once, 0.8 wins 3 times
    assert auroc(scores, positive) == pytest.approx(5.5 / 6, abs=1e-12)
    assert auroc(np.zeros(5), positive) == 0.5  # all tied: chance
    # against the definition, pair by pair, on columns full of ties
    gen = np.random.default_rng(0)
    many = gen.integers(0, 4, size=(40, 7)).astype(float)
    labels = gen.integers(0, 3, size=40)
    got = topic_auroc(many, labels, 3)
    for t in range(3):
        pos, neg = many[labels == t], many[labels != t]
        want = ((pos[:, None] > neg[None]).sum((0, 1)) + 0.5 * (pos[:, None] == neg[None]).sum((0, 1))) / (len(pos) * len(neg))
        np.testing.assert_allclose(got[t], want, rtol=0, atol=1e-12)


# ----- classifier -----------------------------------------------------------------------

def test_the_topic_classifier_beats_chance_on_held_out_bbc_documents(tmp_path):
    from pipeline.analysis.classifier import trained
    from pipeline.data import corpora

    train, held_out = corpora.labelled("bbc", "train"), corpora.labelled("bbc", "eval")
    clf = trained(tmp_path / "clf", train, held_out, {"data": "bbc"})
    assert clf.heldout_docs == len(held_out) > 50
    assert clf.heldout_accuracy >= 0.85, clf.heldout_accuracy  # chance is 0.2
    again = trained(tmp_path / "clf", train, held_out, {"data": "bbc"})  # from the cache
    assert torch.equal(again.weight, clf.weight) and again.heldout_accuracy == clf.heldout_accuracy
    probs = clf.probabilities(["the striker scored twice as the club won the cup final",
                               "shares fell as the bank reported lower profits and the market slid"])
    assert [clf.topics[i] for i in probs.argmax(-1).tolist()] == ["sports", "business"]


# ----- ablation and steering on the tiny model -----------------------------------------------

def _transcoder_units(layer: int = 1):
    from pipeline.analysis.units import Units
    from pipeline.eval.splice import EditedSplice
    from pipeline.methods.transcoder import LayerwiseDecomposition, Transcoder, TranscoderConfig

    module = Transcoder(TranscoderConfig(variant="topk", k=4, d_in=D, d_out=D, n_latents=96, layer=layer, seed=1))
    with torch.no_grad():
        module.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        module.W_dec.mul_(0.3)
    d = LayerwiseDecomposition({layer: module.eval()})
    return Units("t", "t", (layer,), {layer: 96}, "mlp_in", d.encode_layer, lambda e: EditedSplice(d, e))


@pytest.fixture(scope="module")
def tiny_ref(lm, models_root, tmp_path_factory, one_thread):
    from pipeline.eval.config import EvalConfig
    from pipeline.eval.reference import reference

    data_dir = tmp_path_factory.mktemp("ref")
    (data_dir / "models").symlink_to(models_root / "models", target_is_directory=True)
    return reference(lm, EvalConfig(lm="tiny-llama", data="bbc", ctx=32, eval_tokens=310, data_dir=data_dir))


def test_ablating_no_units_leaves_ce_unchanged_to_the_last_bit(lm, tiny_ref):
    from pipeline.analysis.topics import prediction_ce
    from pipeline.analysis.units import neuron_units, zero_edit

    for units in (_transcoder_units(), neuron_units(lm, [0, 2])):
        ce = prediction_ce(lm, tiny_ref.tokens, units.make_splice(zero_edit(units, [])), units.replace)
        assert torch.equal(ce, tiny_ref.ce), units.name
        moved = prediction_ce(lm, tiny_ref.tokens, units.make_splice(zero_edit(units, range(0, units.total, 3))),
                              units.replace)
        assert not torch.equal(moved, tiny_ref.ce), units.name


def test_hidden_units_are_what_the_output_projection_reads(lm):
    from pipeline.eval.baselines import down_projection
    from pipeline.eval.neuron_edit import hidden_units

    x = torch.randn(7, D, generator=torch.Generator().manual_seed(0))
    h = hidden_units(lm, 2, x)
    assert h.shape == (7, lm.d_mlp)
    with torch.no_grad():
        torch.testing.assert_close(down_projection(lm, 2)(h), lm.mlp_module(2)(x), rtol=1e-5, atol=1e-6)


def test_steering_with_alpha_zero_is_the_clean_generation(lm, one_thread):
    from pipeline.analysis.steering import generate, prompt_ids, steer_edit
    from pipeline.analysis.units import neuron_units

    prompt = prompt_ids(lm, "I think that")
    clean = generate(lm, prompt, None, (), 6)
    for units in (_transcoder_units(), neuron_units(lm, [1])):
        for row_unit in (None, 5):  # the unsteered row, and a unit steered by 0
            edit = steer_edit(units, 1, [row_unit], [0.0], "add")
            assert torch.equal(generate(lm, prompt, units.make_splice(edit), units.replace, 6), clean), units.name
        # a batch of α: the α = 0 row stays clean while a strong one moves away
        edit = steer_edit(units, 2, [None, 5], [0.0, 1000.0], "add")
        both = generate(lm, prompt.expand(2, -1), units.make_splice(edit), units.replace, 6)
        assert torch.equal(both[0], clean[0]) and not torch.equal(both[1], clean[0]), units.name
        clamped = steer_edit(units, 1, [5], [1000.0], "clamp")
        assert not torch.equal(generate(lm, prompt, units.make_splice(clamped), units.replace, 6), clean)


# ----- the stages end to end on a tiny pipeline, and bad input ----------------------------------

def invoke(*args: str):
    from stages.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def tiny_pipeline(models_root, tmp_path_factory, one_thread):
    """A tiny-llama store of BBC (layer 1, enough documents for every topic) and a TopK transcoder on it."""
    data_dir = tmp_path_factory.mktemp("topics") / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(models_root / "models", target_is_directory=True)
    common = ["--lm", "tiny-llama", "--data", "bbc", "--ctx", "32", "--data-dir", str(data_dir)]
    for args in (["harvest", "--layers", "1", "--tokens", "64000", "--no-progress", *common],
                 ["train", "--model", "topk", "--k", "4", "--layers", "1", "--latents", "64", "--batch-size", "512",
                  "--wandb", "disabled", "--no-progress", *common]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    return data_dir, data_dir / "train/tiny-llama/bbc/ctx32/transcoder/topk-k4-L1"


def test_ablate_topics_and_steer_run_and_cache(tiny_pipeline):
    data_dir, ckpt = tiny_pipeline
    args = ["--ckpt", str(ckpt), "--data-dir", str(data_dir), "--no-progress"]
    first = invoke("ablate-topics", *args, "--n", "1,4", "--eval-tokens", "620")
    assert first.exit_code == 0, first.output
    assert "neurons-L1: done" in first.output
    report = data_dir / "analysis/tiny-llama/bbc/ctx32/ablate-t620/report"
    rows = (report / "ablation.csv").read_text().splitlines()
    # 5 topics x 2 n, and the random control for 5 topics x 2 n, for the transcoder and the neurons
    assert len(rows) == 1 + 2 * (10 + 10)
    assert (report / "selectivity.png").stat().st_size > 0 and "| random |" in (report / "ablation.md").read_text()
    again = invoke("ablate-topics", *args, "--n", "1,4", "--eval-tokens", "620")
    assert again.exit_code == 0 and again.output.count(": cached") == 2, again.output

    steer = invoke("steer", *args, "--alphas", "0,8", "--prompts", "1", "--new-tokens", "3", "--topics", "sports,tech")
    assert steer.exit_code == 0, steer.output
    assert re.search(r"held-out accuracy 0\.\d+ on \d+ documents", steer.output)
    out = data_dir / "analysis/tiny-llama/bbc/ctx32/steer/report"
    frontier = (out / "steering_frontier.csv").read_text().splitlines()
    assert len(frontier) == 1 + 2 * 2  # (transcoder, neurons) x (α = 0, 8)
    assert (out / "frontier.png").stat().st_size > 0 and "First α reaching" in (out / "steering.md").read_text()

    # Make runs the same stage with the same values: everything comes from the cache
    stamp = data_dir / "installed"
    stamp.touch()
    made = subprocess.run(["make", "--no-print-directory", "ablate-topics", f"CKPT={ckpt}", f"DATA_DIR={data_dir}",
                           "LM=tiny-llama", "CTX=32", "TOPIC_N=1,4", "EVAL_TOKENS=620", f"INSTALLED={stamp}",
                           f"NND={sys.executable} -m stages.cli"], cwd=REPO, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    assert made.stdout.count(": cached") == 2, made.stdout


@pytest.mark.parametrize("extra, message", [
    (["ablate-topics", "--data", "sotu"], "error: DATA=sotu has no topic labels"),
    (["ablate-topics", "--topics", "sports,cooking"], "error: unknown topic cooking"),
    (["steer", "--alphas", ""], "error: ALPHAS is empty"),
    (["steer", "--mode", "push"], "error: STEER_MODE=push must be one of add, clamp"),
])
def test_bad_input_is_one_clear_line(tiny_pipeline, extra, message):
    data_dir, ckpt = tiny_pipeline
    result = invoke(*extra, "--ckpt", str(ckpt), "--data-dir", str(data_dir), "--no-progress")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_checkpoint_of_another_model_is_refused(tiny_pipeline, tmp_path):
    import shutil

    data_dir, ckpt = tiny_pipeline
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    config = json.loads((other / "config.json").read_text())
    config["metadata"]["store_manifest"] |= {"lm": "smollm2-135m", "lm_weights_sha256": "0" * 64}
    (other / "config.json").write_text(json.dumps(config))
    result = invoke("steer", "--ckpt", str(other), "--lm", "tiny-llama", "--data", "bbc", "--ctx", "32",
                    "--data-dir", str(data_dir), "--no-progress")
    assert result.exit_code == 2 and "error: checkpoint" in result.output and "LM=smollm2-135m" in result.output


@pytest.mark.parametrize("value, message", [
    ("ALPHAS=", "ALPHAS is empty"),
    ("ALPHAS=1;touch {probe}", "ALPHAS='1;touch"),
    ("TOPICS=sport$(shell touch {probe})", "TOPICS='sport$(shell"),
    ("STEER_MODE=add`touch {probe}`", "STEER_MODE='add`touch"),
])
def test_make_checks_the_topic_variables_before_any_shell(tmp_path, value, message):
    probe = tmp_path / "probe"
    for goal in ("ablate-topics", "steer"):
        proc = subprocess.run(["make", "--no-print-directory", "-n", goal, "CKPT=x", f"DATA_DIR={tmp_path / 'data'}",
                               value.format(probe=probe)], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not probe.exists() and not (tmp_path / "data").exists()
