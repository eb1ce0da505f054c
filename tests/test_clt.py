"""The cross-layer transcoder: per-layer degenerate case, planted-feature recovery, export, kill -9 resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import pipeline.train.loop
from pipeline import checkpoint
from pipeline.methods.clt import CLTConfig, CrossLayerTranscoder
from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.core.errors import UserError
from pipeline.export.circuit_tracer import load_circuit_tracer, write_circuit_tracer
from pipeline.data.harvest import store_path
from pipeline.data.loader import ActivationLoader, LoaderConfig
from pipeline.data.store import HarvestStore, StoreWriter, chunk_rows_for
from pipeline.data.toy import ToyConfig, write_toy_store

REPO = Path(__file__).resolve().parents[1]
# The training tests take hundreds of tiny steps. With two OpenMP threads each tiny op waits
# for the second core; when other processes hold it that costs ~6 ms per op (measured: this
# file's planted test 5 s on a quiet machine, 75-180 s on a busy one; 10 s with one thread).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


VARIANTS = ("topk", "batchtopk", "jumprelu", "vanilla")
D, N_LATENTS, K = 16, 64, 4

needs_fit = pytest.mark.skipif(not hasattr(pipeline.train.loop, "MEMBER_BUILDERS"),
                               reason="fit() does not take multi-layer members yet")


# ----- helpers -----------------------------------------------------------------------

def per_layer_transcoders(variant: str, layers, seed: int = 0, d: int = D, out_scale: float = 2.0) -> dict[int, Transcoder]:
    """Transcoders with non-trivial biases, scales and sparsity state."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        t = Transcoder(TranscoderConfig(variant=variant, k=K, d_in=d, d_out=d, n_latents=N_LATENTS, layer=layer,
                                        seed=seed + layer))
        with torch.no_grad():
            t.b_enc.copy_(0.1 * torch.randn(N_LATENTS, generator=gen))
            t.b_dec.copy_(torch.randn(d, generator=gen))
            t.input_scale.fill_(0.5 + layer)
            t.target_scale.fill_(out_scale / (1 + layer))
            if variant == "batchtopk":
                t.sparsity.threshold.fill_(0.3)
            if variant == "jumprelu":
                t.sparsity.log_threshold.copy_((0.2 + 0.3 * torch.rand(N_LATENTS, generator=gen)).log())
        out[layer] = t
    return out


def clt_from(transcoders: dict[int, Transcoder]) -> CrossLayerTranscoder:
    """A CLT holding exactly these transcoders' weights, with zero cross-layer slices."""
    layers = tuple(sorted(transcoders))
    c = transcoders[layers[0]].cfg
    clt = CrossLayerTranscoder(CLTConfig(variant=c.variant, k=c.k, d_in=c.d_in, d_out=c.d_out, n_latents=c.n_latents,
                                         layers=layers))
    with torch.no_grad():
        for p, layer in enumerate(layers):
            t = transcoders[layer]
            clt.W_enc[p].copy_(t.W_enc)
            clt.b_enc[p].copy_(t.b_enc)
            clt.W_dec[p].zero_()
            clt.W_dec[p][:, 0] = t.W_dec
            clt.b_dec[p].copy_(t.b_dec)
            clt.input_scale[p] = t.input_scale
            clt.target_scale[p] = t.target_scale
            clt.sparsity[p].load_state_dict(t.sparsity.state_dict())
    return clt


def random_inputs(layers, rows: int = 200, seed: int = 1) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {layer: 2 * torch.randn(rows, D, generator=gen) for layer in layers}


# ----- (1) degenerate case -----------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_cross_slices_behave_like_per_layer_transcoders(variant):
    layers = (0, 1, 2)
    transcoders = per_layer_transcoders(variant, layers)
    clt = clt_from(transcoders).eval()
    for t in transcoders.values():
        t.eval()
    x = random_inputs(layers)
    with torch.no_grad():
        acts = {layer: clt.encode_layer(layer, x[layer]) for layer in layers}
        together = clt(x)
        for layer, t in transcoders.items():
            assert torch.equal(acts[layer], t.encode(x[layer]))  # same latents, same values
            assert (acts[layer] > 0).any()
            want = t(x[layer])
            torch.testing.assert_close(together[layer], want, rtol=1e-6, atol=1e-5)
            # live-splice path: every source i <= layer present, cross slices contribute nothing
            torch.testing.assert_close(clt.decode_layer(layer, {i: a for i, a in acts.items() if i <= layer}), want,
                                       rtol=1e-6, atol=1e-5)

    # Training: the loss is the sum of the transcoders' losses, and the encoders and own-layer
    # decoder slices get the transcoders' gradients (bf16 matmuls included).
    clt.train()
    y = random_inputs(layers, seed=2)
    loss = clt.training_step(x, y, dead=None).loss
    loss.backward()
    total = 0.0
    for p, (layer, t) in enumerate(transcoders.items()):
        t.train()
        t_loss = t.training_step(x[layer].clone(), y[layer].clone(), dead=None).loss
        t_loss.backward()
        total = total + t_loss.detach()
        torch.testing.assert_close(clt.W_enc[p].grad, t.W_enc.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(clt.b_enc.grad[p], t.b_enc.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(clt.W_dec[p].grad[:, 0], t.W_dec.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(clt.b_dec.grad[p], t.b_dec.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.detach(), total, rtol=1e-6, atol=0)
    # ... and only the CLT can grow cross-layer writes.
    assert clt.W_dec[0].grad[:, 1:].abs().sum() > 0


@pytest.mark.parametrize("variant", ["topk", "jumprelu"])
def test_zero_cross_slices_splice_live_like_per_layer_transcoders(models_root, variant):
    """evaluate's live splice (pipeline.eval.splice) of the real CLT on the tiny model."""
    from pipeline.data.models import ensure_model, load_lm
    from pipeline.eval.splice import DecompositionSplice, final_hidden
    from pipeline.methods.transcoder import LayerwiseDecomposition

    ensure_model("tiny-llama", models_root)
    lm = load_lm("tiny-llama", models_root)
    tokens = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = lm.bos_token_id
    transcoders = {l: t.eval() for l, t in per_layer_transcoders(variant, (0, 1, 2), d=lm.d_model, out_scale=20.0).items()}
    clt = clt_from(transcoders).eval()
    for replace in ([0, 1, 2], [2]):
        want = final_hidden(lm, tokens, DecompositionSplice(LayerwiseDecomposition(transcoders)).hooks(lm, replace, None))
        got = final_hidden(lm, tokens, DecompositionSplice(clt).hooks(lm, replace, None))
        assert not torch.allclose(want, final_hidden(lm, tokens, []))  # the splice does change the stream
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cross_slices_change_only_later_layers():
    layers = (3, 4, 5)
    clt = clt_from(per_layer_transcoders("topk", layers)).eval()
    x = random_inputs(layers)
    with torch.no_grad():
        before = clt(x)
        clt.W_dec[1][:, 1] = torch.randn(N_LATENTS, D)  # source layer 4 -> target layer 5
        after = clt(x)
    assert torch.equal(before[3], after[3]) and torch.equal(before[4], after[4])
    assert not torch.allclose(before[5], after[5])
    with torch.no_grad():
        acts = {layer: clt.encode_layer(layer, x[layer]) for layer in layers}
        want = before[5] + acts[4] @ clt.W_dec[1][:, 1] / clt.target_scale[2]
    torch.testing.assert_close(after[5], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="not one of this CLT's layers"):
        clt.encode_layer(0, x[3])


def test_config_is_validated_with_the_bad_field_named():
    base = dict(variant="topk", k=4, d_in=D, d_out=D, n_latents=N_LATENTS, layers=(0, 1))
    with pytest.raises(UserError, match="0 < K < LATENTS"):
        CLTConfig(**{**base, "k": N_LATENTS})
    with pytest.raises(UserError, match="unknown MODEL sparsity"):
        CLTConfig(**{**base, "variant": "top"})
    with pytest.raises(UserError, match="increasing"):
        CLTConfig(**{**base, "layers": (1, 0)})
    cfg = CLTConfig(**{**base, "layers": [0, 2, 5]})
    assert cfg.layers == (0, 2, 5) and cfg.name == "clt-topk-k4-L0_2_5"
    assert CLTConfig(**{**base, "layers": (0, 1, 2, 3)}).name == "clt-topk-k4-L0-3"


def test_train_stage_builds_one_clt_per_k_beside_the_per_layer_dictionaries(tmp_path):
    from pipeline.train.jobs import build_jobs

    store = write_toy_store(tmp_path / "toy.zarr", ToyConfig(d_model=D, n_features=32, n_layers=3, n_rows=1024))
    out = lambda group, name: tmp_path / "train" / group / name  # noqa: E731
    args = dict(store=store, ks=(4, 8), layers=(0, 1, 2), n_latents=N_LATENTS, seed=0, kind="transcoder", out=out)
    members = build_jobs(["clt"], **args)
    assert [m.out_dir for m in members] == [tmp_path / "train" / "clt" / f"clt-batchtopk-k{k}-L0-2" for k in (4, 8)]
    assert members[0].input_key == ((0, "mlp_in"), (1, "mlp_in"), (2, "mlp_in"))
    assert members[1].target_key == ((0, "mlp_out"), (1, "mlp_out"), (2, "mlp_out"))
    assert [m.module.cfg.k for m in members] == [4, 8] and members[0].module.cfg.seed != members[1].module.cfg.seed
    assert build_jobs(["clt-jumprelu"], **args)[0].module.cfg.variant == "jumprelu"
    assert len(build_jobs(["clt", "clt-batchtopk"], **args)) == 2  # one CLT per K, not two
    mixed = build_jobs(["topk", "clt"], **args)
    assert [m.out_dir.parent.name for m in mixed].count("transcoder") == 6 and len(mixed) == 8
    with pytest.raises(UserError, match="KIND=transcoder"):
        build_jobs(["clt"], **{**args, "kind": "sae"})


# ----- (3) export ------------------------------------------------------------------------------

def trained_looking_clt(variant: str, layers=(0, 1, 2)) -> CrossLayerTranscoder:
    """Random weights everywhere, cross slices included, and non-unit scales."""
    clt = clt_from(per_layer_transcoders(variant, layers))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for w in clt.W_dec:
            w.add_(0.3 * torch.randn(w.shape, generator=gen))
        clt.normalize_decoder()
    return clt.eval()


def circuit_tracer_forward(folder: Path, x: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """What the exported files mean, written from the format description alone."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    n = len(list(folder.glob("W_enc_*.safetensors")))
    enc = [load_file(folder / f"W_enc_{p}.safetensors") for p in range(n)]
    dec = [load_file(folder / f"W_dec_{p}.safetensors")[f"W_dec_{p}"] for p in range(n)]
    acts = []
    for p in range(n):
        z = x[p] @ enc[p][f"W_enc_{p}"].T + enc[p][f"b_enc_{p}"]
        t = enc[p].get(f"threshold_{p}")
        acts.append(torch.relu(z) if t is None else z * (z > t))
    return {j: enc[j][f"b_dec_{j}"] + sum(acts[p] @ dec[p][:, j - p] for p in range(j + 1)) for j in range(n)}


@pytest.mark.parametrize("variant", ["batchtopk", "jumprelu", "vanilla"])
def test_export_round_trips_with_identical_outputs(tmp_path, variant):
    clt = trained_looking_clt(variant)
    ckpt = tmp_path / "ckpt"
    checkpoint.save(clt, ckpt, {"lm": "tiny-llama"})
    loaded = checkpoint.load_module(ckpt)  # our own checkpoint format first
    x = random_inputs(clt.cfg.layers, rows=300)
    with torch.no_grad():
        want = clt(x)
        for layer, y in loaded(x).items():
            assert torch.equal(y, want[layer])

    out = write_circuit_tracer(ckpt, tmp_path / "ct")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.yaml"] + [f"W_{w}_{p}.safetensors" for w in ("enc", "dec") for p in range(3)])
    assert load_file(out / "W_dec_1.safetensors")["W_dec_1"].shape == (N_LATENTS, 2, D)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["feature_input_hook"] == "mlp.hook_in" and config["feature_output_hook"] == "hook_mlp_out"
    assert config["nnd"]["lm"] == "tiny-llama" and config["nnd"]["variant"] == variant

    back = load_circuit_tracer(out)
    reference = circuit_tracer_forward(out, x)
    with torch.no_grad():
        got = back(x)
        for layer in clt.cfg.layers:
            assert torch.equal(back.encode_layer(layer, x[layer]) > 0, clt.encode_layer(layer, x[layer]) > 0)
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(reference[layer], want[layer], rtol=1e-5, atol=1e-5)
    assert (back.cfg.variant, back.cfg.k, back.cfg.layers) == (variant, K, clt.cfg.layers)

    # Exporting the reloaded module writes the same tensors again.
    again = write_circuit_tracer(back, tmp_path / "ct2")
    for name in (p.name for p in out.glob("*.safetensors")):
        a, b = load_file(out / name), load_file(again / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0)


def test_nnd_export_writes_the_same_tensors_and_never_overwrites(tmp_path, data_dir):
    import json

    from conftest import run_nnd

    clt = trained_looking_clt("batchtopk")
    checkpoint.save(clt, tmp_path / "ckpt", {"lm": "tiny-llama"})
    dd = ("--data-dir", str(data_dir))
    run_nnd("export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ct"), *dd)
    depth = json.loads((data_dir / "models" / "tiny-llama" / "config.json").read_text())["num_hidden_layers"]
    direct = write_circuit_tracer(tmp_path / "ckpt", tmp_path / "direct", depth=depth)
    assert len(list(direct.glob("W_enc_*.safetensors"))) == depth  # padded to the model's depth
    for f in direct.glob("*.safetensors"):
        a, b = load_file(f), load_file(tmp_path / "ct" / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ct" / "model" / "config.json").exists()
    before = (tmp_path / "ct" / "W_dec_0.safetensors").read_bytes()
    again = run_nnd("export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ct"), *dd, check=False)
    assert again.returncode == 2 and again.stderr.startswith("error: ")
    assert (tmp_path / "ct" / "W_dec_0.safetensors").read_bytes() == before
    run_nnd("export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ct"), "--overwrite", *dd)


def test_export_refuses_what_circuit_tracer_cannot_hold(tmp_path):
    with pytest.raises(UserError, match="TopK CLT has no circuit-tracer equivalent"):
        write_circuit_tracer(trained_looking_clt("topk"), tmp_path / "a")
    with pytest.raises(UserError, match="consecutive layers"):
        write_circuit_tracer(trained_looking_clt("batchtopk", layers=(0, 2)), tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep").write_text("x")
    with pytest.raises(UserError, match="exists"):
        write_circuit_tracer(trained_looking_clt("vanilla"), tmp_path / "c")
    assert (tmp_path / "c" / "keep").read_text() == "x"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----- (2) planted cross-layer features, recovered through fit() ---------------------------------

PLANT_LAYERS, PLANT_FEATURES, PLANT_ROWS, PLANT_CTX = 3, 24, 32768, 129
NEXT_GAIN = 0.7  # a planted feature writes its direction to layer i+1 at this magnitude


def planted_truth(seed: int = 0) -> dict[str, np.ndarray]:
    """Per source layer i: input directions, and output directions at layers i and i+1."""
    rng = np.random.default_rng(seed)

    def unit(*shape):
        v = rng.standard_normal(shape)
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    return {"u": unit(PLANT_LAYERS, PLANT_FEATURES, D), "v_own": unit(PLANT_LAYERS, PLANT_FEATURES, D),
            "v_next": unit(PLANT_LAYERS, PLANT_FEATURES, D)}


def write_planted_store(path: Path, truth: dict[str, np.ndarray], seed: int = 0) -> HarvestStore:
    """mlp_in_i = sum_f a_f u_f over features of source i; mlp_out_j = own features' v_own
    plus NEXT_GAIN x v_next of the features of source j-1 (which layer j's input does not hold)."""
    rng = np.random.default_rng([seed, 1])
    a = (rng.random((PLANT_LAYERS, PLANT_ROWS, PLANT_FEATURES)) < 2 / PLANT_FEATURES) \
        * rng.uniform(0.5, 1.5, (PLANT_LAYERS, PLANT_ROWS, PLANT_FEATURES))
    mlp_in = np.einsum("lrf,lfd->lrd", a, truth["u"])
    mlp_out = np.einsum("lrf,lfd->lrd", a, truth["v_own"])
    mlp_out[1:] += NEXT_GAIN * np.einsum("lrf,lfd->lrd", a[:-1], truth["v_next"][:-1])
    identity = {"lm": "planted", "lm_weights_sha256": "0" * 64, "data": "planted", "split": "train", "ctx": PLANT_CTX,
                "bos_token_id": None, "separator_token_id": None, "dtype": "float16", "compressor": "none",
                "chunk_rows": chunk_rows_for(PLANT_CTX)}
    writer = StoreWriter(path, identity, {"mlp_in": "p.{layer}.in", "mlp_out": "p.{layer}.out"}, d_model=D,
                         n_layers=PLANT_LAYERS, d_mlp=D)
    n_rows = PLANT_ROWS - PLANT_ROWS % (PLANT_CTX - 1)
    rows = np.arange(n_rows)
    writer.prepare(n_rows, list(range(PLANT_LAYERS)), (np.zeros(n_rows, np.int32), (rows // 128).astype(np.int32),
                                                       (1 + rows % 128).astype(np.int32)))
    for layer in range(PLANT_LAYERS):
        for c in range(writer.n_chunks):
            part = slice(c * writer.chunk_rows, min(n_rows, (c + 1) * writer.chunk_rows))
            writer.write_chunk(layer, c, {"mlp_in": mlp_in[layer, part].astype("float16"),
                                          "mlp_out": mlp_out[layer, part].astype("float16")})
    writer.finalize()
    return HarvestStore.open(path)


def model_unit_rows(clt: CrossLayerTranscoder, p: int) -> np.ndarray:
    """Source p's decoder rows [n_latents, (n - p) * d_out] in model units."""
    with torch.no_grad():
        return (clt.W_dec[p] / clt.target_scale[p:, None]).flatten(1).numpy()


def test_planted_cross_layer_features_are_recovered(tmp_path, one_thread):
    from pipeline.methods.base import TrainJob
    from pipeline.train.config import TrainConfig
    from pipeline.train.jobs import train_jobs

    truth = planted_truth()
    store = write_planted_store(tmp_path / "planted.zarr", truth)
    layers = tuple(range(PLANT_LAYERS))
    clt = CrossLayerTranscoder(CLTConfig(variant="topk", k=3, d_in=D, d_out=D, n_latents=96, layers=layers, seed=3))
    member = TrainJob(clt, tuple((i, "mlp_in") for i in layers), tuple((i, "mlp_out") for i in layers), tmp_path / "clt")
    keys = [(i, h) for i in layers for h in ("mlp_in", "mlp_out")]
    cfg = TrainConfig(tokens=6 * store.n_rows, batch_size=256, lr=1e-2, wandb="disabled", progress=False, log_every=20)
    with pytest.warns(UserWarning, match="reuses"):
        train_jobs([member], lambda: ActivationLoader(store, keys, LoaderConfig(batch_size=256, seed=0)), cfg)

    trained = checkpoint.load_module(tmp_path / "clt")
    final = checkpoint.read_config(tmp_path / "clt")["metadata"]["final"]
    assert all(final[f"fvu_L{i}"] < 0.2 for i in layers), final  # TopK-3 with ~2 active: a small floor
    for i in layers:
        rows = model_unit_rows(trained, i).reshape(-1, PLANT_LAYERS - i, D)
        planted = np.zeros((PLANT_FEATURES, PLANT_LAYERS - i, D))
        planted[:, 0] = truth["v_own"][i]
        if i + 1 < PLANT_LAYERS:
            planted[:, 1] = NEXT_GAIN * truth["v_next"][i]
        cos = unit(planted.reshape(PLANT_FEATURES, -1)) @ unit(rows.reshape(len(rows), -1)).T
        best, match = cos.max(axis=1), cos.argmax(axis=1)
        assert (best >= 0.9).all(), f"source layer {i}: planted features matched at cos {np.sort(best)[:5]}"
        # slice by slice: the matched latent writes v_own to layer i, v_next to layer i+1, little beyond
        matched = rows[match]
        assert ((unit(matched[:, 0]) * truth["v_own"][i]).sum(-1) >= 0.9).all()
        if i + 1 < PLANT_LAYERS:
            assert ((unit(matched[:, 1]) * truth["v_next"][i]).sum(-1) >= 0.9).all()
            ratio = np.linalg.norm(matched[:, 1], axis=-1) / np.linalg.norm(matched[:, 0], axis=-1)
            assert np.allclose(ratio, NEXT_GAIN, atol=0.15), ratio
        if i + 2 < PLANT_LAYERS:
            assert (np.linalg.norm(matched[:, 2:], axis=(1, 2)) < 0.2 * np.linalg.norm(matched, axis=(1, 2))).all()


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ----- (4) kill -9 and resume through the train stage ---------------------------------------------

TOY = ToyConfig(d_model=D, n_features=48, n_layers=2, n_rows=8192, mean_active=3, ctx=129)


def _stage_cmd(data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--data", "toy", "--ctx", str(TOY.ctx), "--layers", "0-1",
            "--model", "clt,clt-jumprelu", "--latents", "64", "--k", "4", "--batch-size", "128", "--epochs", "4",
            "--lr", "3e-3", "--checkpoint-every-steps", "20", "--wandb", "disabled", "--no-progress",
            "--data-dir", str(data_dir)]


def test_kill_9_then_resume_gives_identical_clt_weights(tmp_path):
    from pipeline.core import paths

    def clt_checkpoint_dir(data_dir, sparsity):
        return paths.checkpoint(data_dir, "smollm2-135m", "toy", TOY.ctx, "clt", f"clt-{sparsity}-k4-L0-1")

    dirs = {}
    for name in ("ref", "run"):
        dirs[name] = tmp_path / name / "data"
        write_toy_store(store_path(dirs[name], "smollm2-135m", "toy", "train", TOY.ctx), TOY)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    subprocess.run(_stage_cmd(dirs["ref"]), cwd=REPO, env=env, check=True, capture_output=True)

    out = {s: clt_checkpoint_dir(dirs["run"], s) for s in ("batchtopk", "jumprelu")}
    proc = subprocess.Popen(_stage_cmd(dirs["run"]), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((out["jumprelu"] / "partial").glob("state-*-000000120.safetensors")) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not any((d / "done").exists() for d in out.values())

    subprocess.run(_stage_cmd(dirs["run"]), cwd=REPO, env=env, check=True, capture_output=True)
    for sparsity, run in out.items():
        ref = clt_checkpoint_dir(dirs["ref"], sparsity)
        assert run.name == f"clt-{sparsity}-k4-L0-1" and run.parent.name == "clt"
        assert checkpoint.read_config(run)["metadata"]["resumed_from_steps"], "the second run did not resume"
        a, b = load_file(ref / "weights.safetensors"), load_file(run / "weights.safetensors")
        assert set(a) == set(b) and "W_dec.1" in a and a["W_dec.0"].shape == (64, 2, D)
        for name in a:
            assert torch.equal(a[name], b[name]), f"{sparsity}: {name} differs after resume"
        assert isinstance(checkpoint.load_module(run), CrossLayerTranscoder)
