"""Feature statistics, logit effects, density, resume after a kill, interventions: on the tiny model."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO
from pipeline import checkpoint
from pipeline.data.harvest import HarvestConfig, harvest
from pipeline.data.models import load_lm
from pipeline.data.store import HarvestStore
from pipeline.eval.splice import EditedSplice, final_hidden, logits
from pipeline.features import examples, interventions as iv
from pipeline.features.examples import FeatureConfig, read_features
from pipeline.features.extract import build_features, load_method, target_for
from pipeline.features.logit_effects import final_norm
from test_splice import D, make_clt, transcoder

CTX = 32
WINDOW = CTX - 1
CFG = FeatureConfig(top_n=5, samples=8, left=3, right=2)


@pytest.fixture(scope="module")
def root(models_root, tmp_path_factory, one_thread) -> Path:
    """A DATA_DIR with a tiny-llama store (layers 0-2, 49 chunks of 4 windows), a transcoder and a CLT."""
    from pipeline.data.models import ensure_model

    ensure_model("tiny-llama", models_root)
    data_dir = tmp_path_factory.mktemp("features") / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(models_root / "models", target_is_directory=True)
    harvest(HarvestConfig(lm="tiny-llama", data="bbc", ctx=CTX, chunk_rows=128, layers=(0, 1, 2), tokens=6000,
                          data_dir=data_dir), progress=False)
    return data_dir


@pytest.fixture(scope="module")
def model(root):
    return load_lm("tiny-llama", root)


def origin(model) -> dict:
    return {"lm": "tiny-llama", "lm_weights_sha256": model.weights_sha256, "data": "bbc", "split": "train", "ctx": CTX}


@pytest.fixture(scope="module")
def tc_ckpt(root, model) -> Path:
    path = root / "train/tiny-llama/bbc/ctx32/transcoder/topk-k4-L1"
    checkpoint.save(transcoder(1, seed=3), path, {"store_manifest": origin(model), "train_hash": "t1"})
    return path


@pytest.fixture(scope="module")
def clt_ckpt(root, model) -> Path:
    path = root / "train/tiny-llama/bbc/ctx32/clt/clt-topk-k4-L1-2"
    checkpoint.save(make_clt([1, 2], seed=5, cross_scale=0.05), path, {"store_manifest": origin(model), "train_hash": "c1"})
    return path


@pytest.fixture(scope="module")
def tc_features(root, model, tc_ckpt) -> Path:
    return build_features(model, target_for(tc_ckpt, root), CFG, report=lambda s: None)


def store_of(root) -> HarvestStore:
    return HarvestStore.open(root / "harvest/tiny-llama/bbc/train-ctx32.zarr")


def direct_acts(store, encode, layer: int) -> torch.Tensor:
    x = np.concatenate([store.read_chunk(layer, "mlp_in", i) for i in range(store.n_chunks)])
    with torch.inference_mode():
        return encode(torch.from_numpy(x).float())


def test_statistics_and_contexts_match_a_direct_computation(root, tc_ckpt, tc_features):
    t, meta = read_features(tc_features)
    store = store_of(root)
    acts = direct_acts(store, checkpoint.load(tc_ckpt).module.encode, 1)  # [rows, 96], all in memory here only
    n_rows = acts.shape[0]
    assert meta["rows_scanned"] == n_rows == store.n_rows and meta["source_layers"] == [1]
    fired = acts > 0
    torch.testing.assert_close(t["L1.count"], fired.sum(0))
    torch.testing.assert_close(t["L1.frequency"], fired.sum(0).float() / n_rows)
    torch.testing.assert_close(t["L1.max_act"], acts.max(0).values)
    torch.testing.assert_close(t["L1.mean_act"], acts.sum(0) / fired.sum(0).clamp(min=1), rtol=1e-4, atol=1e-6)
    assert torch.equal(t["L1.hist"].sum(1).long(), fired.sum(0))
    want_top = acts.topk(CFG.top_n, dim=0).values.T
    torch.testing.assert_close(t["L1.top_act"], torch.where(want_top > 0, want_top, 0.0))
    tokens = store.rows("tokens")
    for latent in (0, 7, 50):
        for j in range(CFG.top_n):
            row = int(t["L1.top_row"][latent, j])
            if row < 0:
                continue
            assert float(acts[row, latent]) == pytest.approx(float(t["L1.top_act"][latent, j]), rel=1e-5)
            for c, off in enumerate(range(-CFG.left, CFG.right + 1)):
                near = row + off
                same = 0 <= near < n_rows and near // WINDOW == row // WINDOW
                tok = int(t["L1.top_ctx_tok"][latent, j, c])
                assert tok == (int(tokens[near]) if same else -1)
                want = float(acts[near, latent]) if same else 0.0
                assert float(t["L1.top_ctx_act"][latent, j, c]) == pytest.approx(want, rel=1e-3, abs=1e-3)
        rows = t["L1.sample_row"][latent]
        got = t["L1.sample_act"][latent][rows >= 0]
        assert len(got) == min(CFG.samples, int(fired[:, latent].sum()))
        assert torch.all(got[1:] >= got[:-1])  # quantile order
        torch.testing.assert_close(got, acts[rows[rows >= 0], latent])
    assert set(meta["tokens"]) >= {str(int(i)) for i in t["L1.top_ctx_tok"].unique() if i >= 0}


def test_logit_effects_are_the_decoder_rows_through_the_final_norm(model, tc_ckpt, tc_features):
    t, _ = read_features(tc_features)
    module = checkpoint.load(tc_ckpt).module
    norm = final_norm(model.hf_model)
    assert type(norm).__name__ == "LlamaRMSNorm"
    v = module.W_dec.detach() / module.target_scale
    v = v / v.pow(2).mean(-1, keepdim=True).sqrt()
    normed = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.detach()
    want = normed @ model.hf_model.get_output_embeddings().weight.detach().T
    top = want.topk(t["L1.logit_top_id"].shape[1], dim=-1)
    torch.testing.assert_close(t["L1.logit_top_value"], top.values, rtol=1e-4, atol=1e-5)
    assert torch.equal(t["L1.logit_top_id"].long(), top.indices)
    torch.testing.assert_close(t["L1.logit_bottom_value"], -(-want).topk(t["L1.logit_bottom_id"].shape[1]).values,
                               rtol=1e-4, atol=1e-5)


def test_density_numbers_and_figures(tc_features):
    t, meta = read_features(tc_features)
    (numbers,) = json.loads((tc_features.parent / "density.json").read_text()).values()
    d = meta["density"]["L1"]
    freq = t["L1.frequency"]
    assert d["dead"] == int((freq == 0).sum()) and d["dense_over_1pct"] == int((freq > 0.01).sum())
    assert d["dense_over_10pct"] == int((freq > 0.1).sum())
    assert sum(d["log10_frequency_counts"]) == int((freq > 0).sum())
    assert numbers == d
    for ext in ("png", "svg"):
        assert (tc_features.parent / f"density.{ext}").stat().st_size > 1000


@pytest.fixture(scope="module")
def clt_features(root, model, clt_ckpt) -> Path:
    cfg = FeatureConfig(top_n=3, samples=0, left=2, right=1, rows=1000)
    return build_features(model, target_for(clt_ckpt, root), cfg, report=lambda s: None)


def test_clt_features_cover_every_source_layer_and_its_later_outputs(model, clt_ckpt, clt_features):
    t, meta = read_features(clt_features)
    assert meta["source_layers"] == [1, 2] and meta["rows_scanned"] == 1023  # rounded up to whole windows
    clt = checkpoint.load(clt_ckpt).module
    from pipeline.features.logit_effects import decoder_directions

    dirs = decoder_directions(load_method(model, clt_ckpt).splice.decomposition, 1, D)
    # a source-1 latent writes to layers 1 and 2: both decoder slices, each in its target's units
    want = clt.W_dec[0][:, 0] / clt.target_scale[0] + clt.W_dec[0][:, 1] / clt.target_scale[1]
    torch.testing.assert_close(dirs, want.detach(), rtol=1e-5, atol=1e-6)
    for layer in (1, 2):
        assert t[f"L{layer}.frequency"].shape == (96,) and t[f"L{layer}.logit_top_id"].shape[0] == 96


def test_a_k_sweep_gets_one_overlaid_density_figure(root, tc_ckpt, clt_ckpt, tc_features, clt_features, tmp_path):
    from pipeline.features.extract import density_overlay

    written = density_overlay([target_for(tc_ckpt, root), target_for(clt_ckpt, root)], tmp_path)
    assert sorted(p.name for p in written) == ["density-overlay.json", "density-overlay.png", "density-overlay.svg"]
    numbers = json.loads((tmp_path / "density-overlay.json").read_text())
    assert len(numbers) == 3  # the transcoder, and the CLT's two source layers
    assert numbers == {**json.loads((tc_features.parent / "density.json").read_text()),
                       **json.loads((clt_features.parent / "density.json").read_text())}


def _features_cmd(root: Path, ckpt: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "stages.cli", "features", "--ckpt", str(ckpt), "--data-dir", str(data_dir),
            "--store", str(root / "harvest/tiny-llama/bbc/train-ctx32.zarr"), "--save-every", "0", "--top", "5",
            "--samples", "8"]


def test_a_killed_features_run_resumes_and_ends_with_the_same_file(root, tc_ckpt, tmp_path):
    runs = {}
    for name in ("killed", "whole"):
        d = tmp_path / name
        d.mkdir()
        (d / "models").symlink_to(root / "models", target_is_directory=True)
        runs[name] = d
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_features_cmd(root, tc_ckpt, runs["killed"]), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("features: chunk 2/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    out = target_for(tc_ckpt, runs["killed"]).features
    partial = json.loads(out.with_name(out.name + ".partial.json").read_text())
    assert 2 <= partial["next_chunk"] < 49 and not out.with_suffix(".json").exists()

    resumed = subprocess.run(_features_cmd(root, tc_ckpt, runs["killed"]), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"features: resuming at chunk {partial['next_chunk']}/49" in resumed.stdout
    whole = subprocess.run(_features_cmd(root, tc_ckpt, runs["whole"]), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
    assert whole.returncode == 0, whole.stderr
    a, meta_a = read_features(out)
    b, meta_b = read_features(target_for(tc_ckpt, runs["whole"]).features)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["tokens"] == meta_b["tokens"] and not out.with_name(out.name + ".partial.json").exists()
    again = subprocess.run(_features_cmd(root, tc_ckpt, runs["whole"]), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
    assert "is up to date" in again.stdout


# ----- interventions ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompt(model):
    return torch.tensor([iv.prompt_ids(model, "The minister said that the")])


def test_no_edit_gives_the_clean_logits_bit_for_bit(model, tc_ckpt, clt_ckpt, prompt):
    clean = iv._next_logits(model, None, [], prompt)
    for ckpt, layer in ((tc_ckpt, 1), (clt_ckpt, 1)):
        dec = load_method(model, ckpt).splice.decomposition
        assert torch.equal(iv._next_logits(model, dec, [], prompt), clean)
        unit = iv.LatentEdit(layer, tuple(range(96)), "scale", 1.0)  # edits every latent by a factor of one
        assert torch.equal(iv._next_logits(model, dec, [unit], prompt), clean)
        g_clean = iv.generate(model, None, [], prompt[0].tolist(), 5, temperature=1.0, seed=3)
        g_same = iv.generate(model, dec, [], prompt[0].tolist(), 5, temperature=1.0, seed=3)
        assert g_clean.ids == g_same.ids


def test_an_edit_at_a_position_changes_only_that_position_and_later(model, tc_ckpt, prompt):
    dec = load_method(model, tc_ckpt).splice.decomposition
    clean = iv._next_logits(model, None, [], prompt)
    acts = {}  # the layer-1 MLP input at position 3, to pick a latent that fires there
    hooks = [(model.hook_name(1, "mlp_in"), lambda t, hook=None: acts.__setitem__("x", t[0, 3].float()))]
    final_hidden(model, prompt, hooks)
    latent = int(dec.encode_layer(1, acts["x"][None]).argmax())
    edit = iv.LatentEdit(1, (latent,), "set", 25.0, positions=(3,))
    edited = iv._next_logits(model, dec, [edit], prompt)
    assert torch.equal(edited[:3], clean[:3]) and not torch.equal(edited[3], clean[3])


def test_a_clt_edit_acts_on_every_layer_its_source_writes_to(model, clt_ckpt, prompt):
    dec = load_method(model, clt_ckpt).splice.decomposition
    seen = {}

    def record(layer, real, out, acts):
        seen[layer] = (out - real).abs().max().item()

    edit = iv.edit_function([iv.LatentEdit(1, tuple(range(96)), "ablate")], prompt.shape[1])
    final_hidden(model, prompt, EditedSplice(dec, edit).hooks(model, [1, 2], record))
    assert seen[1] > 0 and seen[2] > 0  # layer 2 moved although only layer-1 latents were edited


def _intervene(*args):
    from stages.cli import app

    return CliRunner().invoke(app, ["intervene", *map(str, args)])


@pytest.mark.parametrize("extra, message", [
    (["--feature", "96"], "FEATURE=96 is not a latent of layer 1, which has latents 0-95"),
    (["--feature", "3", "--op", "scale"], "OP=scale needs a VALUE"),
    (["--feature", "3", "--op", "melt", "--value", "1"], "OP=melt is not one of ablate, scale, set"),
    (["--feature", "3", "--layer", "2"], "layer 2 has no latents in this checkpoint"),
])
def test_bad_intervention_input_is_one_clear_line(root, tc_ckpt, extra, message):
    result = _intervene("--ckpt", tc_ckpt, "--prompt", "Hello", "--data-dir", root, *extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_checkpoint_of_another_model_is_refused(root, model, tmp_path):
    path = tmp_path / "other/topk-k4-L1"
    checkpoint.save(transcoder(1, seed=3), path, {"store_manifest": {**origin(model), "lm_weights_sha256": "0" * 64}})
    result = _intervene("--ckpt", path, "--prompt", "Hello", "--feature", "1", "--data-dir", root)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "was trained on activations of LM=tiny-llama (weights 000000000000)" in result.stderr


def test_make_generate_hands_a_hostile_prompt_over_as_text(root, tc_ckpt, tmp_path):
    probe = tmp_path / "probe"
    hostile = f"a $(shell touch {probe}1) `touch {probe}2` $$(touch {probe}3) \"x' ; touch {probe}4"
    stamp = tmp_path / "installed"
    stamp.touch()
    proc = subprocess.run(["make", "--no-print-directory", "generate", f"CKPT={tc_ckpt}", "FEATURE=3", "OP=scale",
                           "VALUE=4", "NEW_TOKENS=3", f"PROMPT={hostile}", f"DATA_DIR={root}", "LM=tiny-llama",
                           f"INSTALLED={stamp}", f"NND={sys.executable} -m stages.cli"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(tmp_path.glob("probe*"))
    assert repr(hostile) in proc.stdout  # the stage saw the text exactly as typed
    assert "clean" in proc.stdout and "L1 latent 3 x4" in proc.stdout and "KL(clean || edited)" in proc.stdout
    assert math.isfinite(float(proc.stdout.split("KL(clean || edited) = ")[1].split()[0]))
