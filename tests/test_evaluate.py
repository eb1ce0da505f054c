"""The evaluate stage on the tiny model: metrics against direct computations, caching, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from pipeline import checkpoint
from pipeline.core.errors import UserError
from pipeline.eval.config import EvalConfig, load_model
from pipeline.eval.methods import load_checkpoints
from pipeline.eval.reference import reference
from pipeline.eval.run import evaluate_methods
from pipeline.data.harvest import HarvestConfig, harvest
from stages.evaluate import baselines, evaluate, report

from test_splice import D, identity_sae, transcoder

CTX = 32
EVAL_TOKENS = 62  # two windows of 31 rows: one batch


def cli() -> typer.Typer:
    app = typer.Typer()
    for command in (evaluate, baselines, report):
        app.command()(command)
    return app


def run_cli(*args: str):
    return CliRunner().invoke(cli(), [str(a) for a in args])


@pytest.fixture(scope="module")
def data_dir(models_root, tmp_path_factory) -> Path:
    """A DATA_DIR with a tiny-llama training store (layers 0-3) for the mean-ablation."""
    from pipeline.data.models import ensure_model

    ensure_model("tiny-llama", models_root)
    root = tmp_path_factory.mktemp("evaluate") / "data"
    root.mkdir()
    (root / "models").symlink_to(models_root / "models", target_is_directory=True)
    harvest(HarvestConfig(lm="tiny-llama", data="bbc", ctx=CTX, chunk_rows=256, layers=(0, 1, 2, 3), tokens=600,
                          data_dir=root), progress=False)
    return root


@pytest.fixture(scope="module")
def cfg(data_dir) -> EvalConfig:
    return EvalConfig(lm="tiny-llama", data="bbc", ctx=CTX, eval_tokens=EVAL_TOKENS, data_dir=data_dir)


@pytest.fixture(scope="module")
def lm(cfg):
    return load_model(cfg)


def save_checkpoints(lm, folder: Path, modules: dict, origin: dict | None = None, meta: dict | None = None) -> Path:
    origin = origin or {"lm": "tiny-llama", "lm_weights_sha256": lm.weights_sha256, "data": "bbc", "split": "train",
                        "ctx": CTX}
    for layer, module in modules.items():
        checkpoint.save(module, folder / f"L{layer}", {"store_manifest": origin, "train_hash": f"h{layer}", **(meta or {})})
    return folder


def test_identity_splice_reproduces_the_clean_ce_exactly(lm, cfg):
    from pipeline.eval.methods import EvalMethod as Method
    from pipeline.eval.splice import DecompositionSplice
    from pipeline.methods.transcoder import LayerwiseDecomposition

    layers = (0, 1, 2, 3)
    method = Method("identity", "identity", "sae", DecompositionSplice(LayerwiseDecomposition({l: identity_sae(l) for l in layers})), layers, k=1)
    (m,) = [r.to_json() for r in evaluate_methods(lm, cfg, [method])]
    for mode in ("single_layer", "all_layers"):
        s = m["modes"][mode]
        assert s["ce"] == m["clean_ce"]
        assert s["delta_ce"] == 0.0 and s["kl"] == 0.0 and s["mse"] == 0.0 and s["fvu"] == 0.0
        assert s["ce_recovered_zero"] == 100.0 and s["ce_recovered_mean"] == 100.0
    assert m["eval_rows"] == 62 and m["eval_predictions"] == 60


def _direct_single_layer(lm, ref, module, layer):
    """CE and FVU of one transcoder spliced at one layer, through plain HF hooks."""
    captured = {}

    def replace(mod, inputs, output):
        x, y = inputs[0][:, 1:], output[:, 1:]
        captured.update(x=x.reshape(-1, D), y=y.reshape(-1, D))
        out = output.clone()
        out[:, 1:] = module(x)
        return out

    handle = lm.hf_model.model.layers[layer].mlp.register_forward_hook(replace)
    try:
        with torch.inference_mode():
            logits = lm.hf_model(ref.tokens).logits.float()
    finally:
        handle.remove()
    ce = F.cross_entropy(logits[:, 1:-1].reshape(-1, logits.shape[-1]), ref.tokens[:, 2:].reshape(-1))
    with torch.no_grad():
        err = module(captured["x"]) - captured["y"]
    fvu = err.pow(2).sum() / (captured["y"] - captured["y"].mean(0)).pow(2).sum()
    return float(ce), float(fvu), float(err.pow(2).sum(-1).mean())


def test_transcoder_checkpoints_metrics_match_direct_computation(lm, cfg, tmp_path):
    k = 4
    modules = {l: transcoder(l, seed=40 + l, k=k) for l in (1, 2)}
    folder = save_checkpoints(lm, tmp_path / "transcoder-topk-k4", modules)
    (method,) = load_checkpoints(lm, [folder])
    assert method.layers == (1, 2) and method.family == "transcoder" and method.k == k
    (m,) = [r.to_json() for r in evaluate_methods(lm, cfg, [method])]
    ref = reference(lm, cfg)
    single = m["modes"]["single_layer"]
    for layer in (1, 2):
        per = single["layers"][str(layer)]
        ce, fvu, mse = _direct_single_layer(lm, ref, modules[layer], layer)
        assert per["ce"] == pytest.approx(ce, rel=1e-5)
        assert per["fvu"] == pytest.approx(fvu, rel=1e-4)
        assert per["mse"] == pytest.approx(mse, rel=1e-4)
        assert per["l0"] == k and per["latents"] == 96
        assert per["alive"] + round(per["dead_pct"] / 100 * 96) == 96
        assert 0 <= per["dense_10pct"] <= per["dense_1pct"] <= per["alive"]
        zero = ref.ablation("zero", (layer,))["ce"]
        assert per["ce_recovered_zero"] == pytest.approx(100 * (zero - per["ce"]) / (zero - ref.clean_ce))
    assert single["ce"] == pytest.approx((single["layers"]["1"]["ce"] + single["layers"]["2"]["ce"]) / 2)
    both = m["modes"]["all_layers"]
    assert both["ce"] != single["layers"]["1"]["ce"] and both["mean_l0"] == k
    # Pareto x-axes: each transcoder latent has one encoder and one decoder row
    assert both["active_components"] == k and both["active_params"] == 2 * k * 2 * D
    assert single["active_params"] == k * 2 * D
    assert m["params"] == sum(p.numel() for mod in modules.values() for p in mod.parameters())


def test_reference_is_computed_once_and_reused(lm, cfg):
    ref = reference(lm, cfg)
    clean_file = cfg.out_dir / "reference" / "clean.safetensors"
    before = clean_file.stat().st_mtime_ns
    again = reference(lm, cfg)
    assert clean_file.stat().st_mtime_ns == before
    assert torch.equal(again.hidden, ref.hidden) and again.clean_ce == ref.clean_ce
    assert set(again.info["massive_norm"]) == {"0", "1", "2", "3"}


def test_evaluate_cli_writes_metrics_json(lm, cfg, tmp_path):
    folder = save_checkpoints(lm, tmp_path / "set", {0: transcoder(0, seed=7)})
    out = tmp_path / "m" / "metrics.json"
    result = run_cli("evaluate", "--ckpt", folder, "--eval-tokens", EVAL_TOKENS, "--data-dir", cfg.data_dir,
                     "--out", out, "--no-progress", "--modes", "single")
    assert result.exit_code == 0, result.output
    m = json.loads(out.read_text())
    assert m["lm"] == "tiny-llama" and m["ctx"] == CTX and list(m["modes"]) == ["single_layer"]
    assert m["checkpoints"] == [str(folder / "L0")]


def test_a_second_evaluation_of_the_same_output_is_refused_naming_the_holder(lm, cfg, tmp_path):
    from pipeline.core.io import exclusive_lock

    folder = save_checkpoints(lm, tmp_path / "set", {0: transcoder(0, seed=7)})
    out = tmp_path / "m" / "metrics.json"
    args = ("evaluate", "--ckpt", folder, "--eval-tokens", EVAL_TOKENS, "--data-dir", cfg.data_dir, "--out", out,
            "--no-progress", "--modes", "single")
    with exclusive_lock(out.with_name(".metrics.json.lock"), what="evaluation"):  # another evaluation holds it
        result = run_cli(*args)
    assert result.exit_code == 2 and "in use by pid" in result.output and not out.exists(), result.output
    assert run_cli(*args).exit_code == 0 and out.exists()
    again = run_cli(*args)  # over the existing metrics.json
    assert again.exit_code == 0, again.output
    assert not out.with_name(".metrics.json.lock").exists()


def test_an_unwritable_output_fails_before_the_work(lm, cfg, tmp_path):
    folder = save_checkpoints(lm, tmp_path / "set", {0: transcoder(0, seed=7)})
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli("evaluate", "--ckpt", folder, "--eval-tokens", EVAL_TOKENS, "--data-dir", cfg.data_dir,
                     "--out", blocker / "m" / "metrics.json", "--no-progress", "--modes", "single")
    assert result.exit_code == 2 and "cannot write the evaluation" in result.output, result.output


@pytest.mark.parametrize("case", ["eval_tokens", "other_lm", "other_d", "missing", "empty", "out_for_two"])
def test_bad_input_gives_one_clear_line_and_exit_2(lm, cfg, tmp_path, case):
    args = ["--eval-tokens", EVAL_TOKENS, "--data-dir", cfg.data_dir, "--no-progress"]
    if case == "eval_tokens":
        ckpt = save_checkpoints(lm, tmp_path / "set", {0: transcoder(0, seed=1)})
        args[1] = 10**8
        expect = "EVAL_TOKENS=100000000 is larger than the eval split"
    elif case == "other_lm":
        ckpt = save_checkpoints(lm, tmp_path / "set", {0: transcoder(0, seed=1)},
                                {"lm": "smollm2-135m", "lm_weights_sha256": "f" * 64, "data": "bbc", "ctx": CTX})
        args += ["--lm", "tiny-llama"]
        expect = "trained on activations of LM=smollm2-135m"
    elif case == "other_d":
        from pipeline.methods.transcoder import Transcoder, TranscoderConfig

        ckpt = save_checkpoints(lm, tmp_path / "set",
                                {0: Transcoder(TranscoderConfig(variant="topk", k=2, d_in=32, d_out=32, n_latents=64))})
        expect = "maps d=32 -> d=32, but tiny-llama has d_model=64"
    elif case == "missing":
        ckpt = tmp_path / "nowhere"
        expect = "does not exist"
    elif case == "empty":
        ckpt = tmp_path / "empty"
        ckpt.mkdir()
        expect = "holds no checkpoints"
    else:
        ckpt = tmp_path / "two"
        save_checkpoints(lm, ckpt, {0: transcoder(0, seed=1, k=2)})
        save_checkpoints(lm, ckpt / "other", {0: transcoder(0, seed=1, k=3)})
        args += ["--ckpt", ckpt / "other", "--out", tmp_path / "metrics.json"]
        expect = "--out names one metrics.json, but the checkpoints hold 2 configurations"
    result = run_cli("evaluate", "--ckpt", ckpt, *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], result.stderr


def test_library_rejects_a_bad_eval_config():
    with pytest.raises(UserError, match="EVAL_TOKENS=0"):
        EvalConfig(eval_tokens=0)
    with pytest.raises(UserError, match="DTYPE"):
        EvalConfig(dtype="float8")


def test_clt_checkpoint_is_evaluated_with_cross_layer_accounting(lm, cfg, tmp_path):
    from test_splice import make_clt

    origin = {"lm": "tiny-llama", "lm_weights_sha256": lm.weights_sha256, "data": "bbc", "split": "train", "ctx": CTX}
    path = tmp_path / "clt-topk-k4-L1-3"
    checkpoint.save(make_clt([1, 2, 3], seed=30, cross_scale=0.05), path, {"store_manifest": origin})
    (method,) = load_checkpoints(lm, [path])
    assert method.family == "clt" and method.layers == (1, 2, 3) and method.k == 4
    (m,) = [r.to_json() for r in evaluate_methods(lm, cfg, [method], modes=("all_layers",))]
    s = m["modes"]["all_layers"]
    l0 = [s["layers"][str(layer)]["l0"] for layer in (1, 2, 3)]
    assert all(0 < v <= 4 for v in l0)
    # a latent of source position i writes to the n - i layers at and after it
    assert s["active_components"] == pytest.approx(sum(v * (3 - i) / 3 for i, v in enumerate(l0)))
    assert s["active_params"] == pytest.approx(sum(v * (D + (3 - i) * D) for i, v in enumerate(l0)))
    assert s["mean_l0"] == pytest.approx(sum(l0) / 3)
    assert s["delta_ce"] != 0 and s["ce_recovered_zero"] is not None


def test_round_robin_takes_one_window_per_document_per_round():
    from pipeline.eval.config import round_robin

    #          doc of each window in stream order: doc 0 has 3 windows, doc 1 one, doc 3 two
    order = round_robin([0, 0, 0, 1, 3, 3])
    assert order.tolist() == [0, 3, 4, 1, 5, 2]


def test_eval_windows_are_drawn_across_documents(lm, cfg):
    from pipeline.data.harvest import token_table
    from pipeline.eval.config import eval_tokens

    table = token_table(lm, "bbc", "eval", CTX, None)
    many = EvalConfig(lm="tiny-llama", data="bbc", ctx=CTX, eval_tokens=20 * (CTX - 1), data_dir=cfg.data_dir)
    tokens = eval_tokens(lm, many).numpy()
    window_of = {row.tobytes(): i for i, row in enumerate(table.ids.astype("int64"))}
    docs = [int(table.doc[window_of[row.tobytes()], 1]) for row in tokens]
    assert len(set(docs)) == 20  # 20 windows, 20 documents (packed, the first 20 windows span far fewer)
    assert len(set(table.doc[:20, 1].tolist())) < 20
    assert torch.equal(eval_tokens(lm, cfg), torch.from_numpy(tokens[: cfg.n_seq]))  # a smaller set is a prefix


def test_kl_is_exact_at_large_kl_and_zero_for_an_unchanged_splice():
    from pipeline.eval.stats import kl_sum

    g = torch.Generator().manual_seed(0)
    clean = F.log_softmax(torch.randn(300, 49152, generator=g) * 6, dim=-1)
    other = F.log_softmax(torch.randn(300, 49152, generator=g) * 6, dim=-1)
    exact = float((clean.double().exp() * (clean.double() - other.double())).sum())
    assert exact / 300 > 10  # large KL
    assert kl_sum(clean, other) == pytest.approx(exact, rel=1e-9, abs=1e-9)
    assert kl_sum(clean, clean) == 0.0


def test_delta_ce_standard_error_is_over_windows():
    from pipeline.eval.stats import CleanBatch, JobStats

    g = torch.Generator().manual_seed(1)
    vocab, windows, per = 11, 6, 5
    logp = F.log_softmax(torch.randn(windows * per, vocab, generator=g), dim=-1)
    clean_logp = F.log_softmax(torch.randn(windows * per, vocab, generator=g), dim=-1)
    targets = torch.randint(vocab, (windows * per,), generator=g)
    stats = JobStats({})
    for half in (slice(0, 3 * per), slice(3 * per, None)):  # two batches of three windows
        clean = CleanBatch(targets[half], -clean_logp[half].gather(1, targets[half, None]).squeeze(1), clean_logp[half], 3)
        stats.add_predictions(logp[half], clean)
    delta = (clean_logp - logp).gather(1, targets[:, None]).squeeze(1).double().reshape(windows, per).mean(1)
    r = stats.result()
    assert r["delta_ce"] == pytest.approx(float(delta.mean())) and r["predictions"] == windows * per
    assert r["delta_ce_se"] == pytest.approx(float(delta.std()) / windows**0.5)


def test_an_empty_eval_split_is_one_clear_line(lm, cfg, tmp_path):
    from pipeline.data.corpora import split_of
    from pipeline.eval.config import eval_tokens

    texts = [t for t in (f"text number {i} " * 40 for i in range(40)) if split_of(t) == "train"][:3]
    (tmp_path / "train_only.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    bad = EvalConfig(lm="tiny-llama", data=str(tmp_path / "train_only.jsonl"), ctx=CTX, eval_tokens=62,
                     data_dir=cfg.data_dir)
    with pytest.raises(UserError, match="the eval split of DATA=.* is empty: 5% of a corpus's documents") as err:
        eval_tokens(lm, bad)
    assert "\n" not in str(err.value)


def test_a_one_document_corpus_is_evaluated_on_its_last_five_percent(lm, cfg, tmp_path):
    from pipeline.eval.config import eval_tokens

    path = tmp_path / "one.txt"
    path.write_text("\n".join(f"line {i} of the only document there is" for i in range(200)))
    one = EvalConfig(lm="tiny-llama", data=str(path), ctx=CTX, eval_tokens=62, data_dir=cfg.data_dir)
    tokens = eval_tokens(lm, one)
    text = lm.tokenizer.decode(tokens[0, 1:].tolist())
    assert tokens.shape == (2, CTX) and text.startswith("line 19")  # lines 190..199 are held out
