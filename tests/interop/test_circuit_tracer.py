"""Our circuit-tracer exports loaded by the real circuit-tracer (0.5.0, nnsight backend), and an
attribution graph on the bundled SmolLM2 with a CLT trained and exported by our CLI."""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml
from conftest import D, N_LATENTS, main_python, trained_looking, trained_looking_clt

from pipeline import checkpoint
from pipeline.core.errors import UserError
from pipeline.export.circuit_tracer import load_circuit_tracer, write_circuit_tracer

DEPTH = 4  # the "model" these dictionaries are exported for: layers 0..3, of which 1 and 2 are covered


def inputs(rows: int = 40, seed: int = 3) -> torch.Tensor:
    return 2 * torch.randn(DEPTH, rows, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,variant", [("transcoder", "batchtopk"), ("transcoder", "jumprelu"),
                                          ("transcoder", "vanilla"), ("skip", "jumprelu")])
def test_transcoder_sets_load_in_circuit_tracer_padded_to_the_model_depth(tmp_path, kind, variant):
    from circuit_tracer.utils.hf_utils import load_transcoders

    modules = {layer: trained_looking(kind, variant, layer=layer, seed=layer) for layer in (1, 2)}
    out = write_circuit_tracer(list(modules.values()), tmp_path / "ct", depth=DEPTH)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and len(config["transcoders"]) == DEPTH
    ts = load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32)
    assert ts.n_layers == DEPTH and ts.feature_input_hook == "mlp.hook_in" and ts.skip_connection == (kind == "skip")
    x = inputs()
    with torch.no_grad():
        acts = ts.encode(x)
        out_ct = ts.decode(acts, x)
        for layer in range(DEPTH):
            if layer in modules:
                want = modules[layer].encode(x[layer])
                assert torch.equal(acts[layer] > 0, want > 0) and (want > 0).any()
                torch.testing.assert_close(acts[layer], want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(out_ct[layer], modules[layer].reconstruct(want, x[layer]), rtol=1e-5, atol=1e-5)
            else:  # padding: nothing fires, nothing is written
                assert not acts[layer].any() and not out_ct[layer].any()


@pytest.mark.parametrize("variant", ["batchtopk", "jumprelu", "vanilla"])
def test_clts_load_in_circuit_tracer_padded_to_the_model_depth(tmp_path, variant):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    clt = trained_looking_clt(variant, layers=(1, 2))
    checkpoint.save(clt, tmp_path / "ckpt", {"lm": "tiny-llama"})
    out = write_circuit_tracer(tmp_path / "ckpt", tmp_path / "ct", depth=DEPTH)
    ct = load_clt(str(out), feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                  device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=True)
    assert ct.n_layers == DEPTH
    x = inputs()
    with torch.no_grad():
        acts = ct.encode(x)
        got = ct.forward(x)
        want = clt({l: x[l] for l in (1, 2)})
        for layer in range(DEPTH):
            if layer in (1, 2):
                ours = clt.encode_layer(layer, x[layer])
                assert torch.equal(acts[layer] > 0, ours > 0) and (ours > 0).any()
                torch.testing.assert_close(acts[layer], ours, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
            else:
                assert not acts[layer].any() and not got[layer].any()
    back = load_circuit_tracer(out)  # our reader drops the padding again
    assert back.cfg.layers == (1, 2) and back.cfg.variant == variant
    with torch.no_grad():
        for layer, y in back({l: x[l] for l in (1, 2)}).items():
            torch.testing.assert_close(y, want[layer], rtol=1e-5, atol=1e-5)


def test_topk_and_sae_sets_are_refused_with_the_reason(tmp_path):
    with pytest.raises(UserError, match="loads no TopK transcoder"):
        write_circuit_tracer([trained_looking("transcoder", "topk", layer=1)], tmp_path / "a", depth=DEPTH)
    with pytest.raises(UserError, match="TopK CLT"):
        write_circuit_tracer(trained_looking_clt("topk", layers=(0, 1)), tmp_path / "b", depth=DEPTH)
    with pytest.raises(UserError, match="is not one"):
        write_circuit_tracer([trained_looking("sae", "jumprelu", layer=1)], tmp_path / "c", depth=DEPTH)
    with pytest.raises(UserError, match="one configuration"):
        write_circuit_tracer([trained_looking("transcoder", "jumprelu", layer=1),
                              trained_looking("transcoder", "vanilla", layer=2)], tmp_path / "d", depth=DEPTH)
    assert not any((tmp_path / n).exists() for n in "abcd")


PROMPT = "The capital of France is"
REFERENCE = """
import sys, json, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.tensor([json.loads(sys.argv[2])])
out, hooks = {}, []
for i in range(4):
    mlp = model.model.layers[i].mlp
    hooks.append(mlp.register_forward_hook(lambda m, a, r, i=i: out.update({f"mlp_in_{i}": a[0][0], f"mlp_out_{i}": r[0]})))
with torch.no_grad():
    out["logits"] = model(ids).logits[0]
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[3])
"""


@pytest.mark.slow
def test_attribution_graph_on_smollm2_with_our_trained_clt(tmp_path, models_root):
    """Harvest, train a small CLT on SmolLM2 layers 0-3 and export it with our CLI (our environment);
    circuit-tracer (nnsight backend, transformers 4.57) reads the exported model folder as our
    transformers 5 does, computes our CLT's latents, and builds an attribution graph offline."""
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from safetensors.torch import load_file

    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(models_root / "models", target_is_directory=True)
    common = ("--lm", "smollm2-135m", "--data", "bbc", "--ctx", "32", "--data-dir", str(data))
    main_python("-m", "stages.cli", "harvest", *common, "--layers", "0-3", "--tokens", "4000", "--chunk-rows", "512",
                "--no-progress")
    main_python("-m", "stages.cli", "train", *common, "--model", "clt", "--k", "8", "--layers", "0-3", "--latents",
                "256", "--batch-size", "512", "--epochs", "1", "--wandb", "disabled", "--no-progress")
    ckpt = data / "train" / "smollm2-135m" / "bbc" / "ctx32" / "clt" / "clt-batchtopk-k8-L0-3"
    out = tmp_path / "ct"
    main_python("-m", "stages.cli", "export", "--format", "circuit-tracer", "--ckpt", str(ckpt), "--out", str(out),
                "--data-dir", str(data))
    n_layers = json.loads((out / "model" / "config.json").read_text())["num_hidden_layers"]
    assert len(list(out.glob("W_dec_*.safetensors"))) == n_layers == 30

    clt = load_clt(str(out), feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                   device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=True)
    model = ReplacementModel.from_pretrained_and_transcoders(model_name=str(out / "model"), transcoders=clt,
                                                             backend="nnsight", device=torch.device("cpu"),
                                                             dtype=torch.float32)
    assert model.tokenizer.__class__.__name__ == "PreTrainedTokenizerFast"
    assert model._hf_config.rope_theta == 100000
    tokens = model.ensure_tokenized(PROMPT)
    ref_file = tmp_path / "reference.safetensors"
    main_python("-c", REFERENCE, str(models_root / "models" / "smollm2-135m"), json.dumps(tokens.tolist()), str(ref_file))
    ref = load_file(ref_file)
    # transformers 5 (ours) reads the exported model folder as the original
    main_python("-c", REFERENCE, str(out / "model"), json.dumps(tokens.tolist()), str(tmp_path / "exported.safetensors"))
    assert torch.equal(load_file(tmp_path / "exported.safetensors")["logits"], ref["logits"])

    logits, acts = model.get_activations(tokens.unsqueeze(0))
    torch.testing.assert_close(logits.reshape(ref["logits"].shape), ref["logits"], rtol=1e-3, atol=2e-3)
    ours = checkpoint.load(ckpt).module
    with torch.no_grad():
        for layer in range(4):
            want = ours.encode_layer(layer, ref[f"mlp_in_{layer}"])[1:]  # BOS aside (attribution zeroes it)
            got = (acts[layer].to_dense() if acts.is_sparse else acts[layer]).reshape(len(tokens), -1)[1:]
            agree = ((got > 0) == (want > 0)).float().mean()
            assert agree > 0.99 and (want > 0).any(), (layer, agree)
            both = (got > 0) & (want > 0)
            torch.testing.assert_close(got[both], want[both], rtol=1e-3, atol=2e-3)
        assert not (acts[4:].to_dense() if acts.is_sparse else acts[4:]).any()  # padded layers never fire

    start = time.perf_counter()
    graph = attribute(PROMPT, model, max_n_logits=3, batch_size=64, max_feature_nodes=200)
    seconds = time.perf_counter() - start
    n_nodes = graph.adjacency_matrix.shape[0]
    assert graph.adjacency_matrix.shape == (n_nodes, n_nodes) and n_nodes > len(tokens)
    assert len(graph.active_features) > 0 and int(graph.active_features[:, 0].max()) < 4
    assert torch.isfinite(graph.adjacency_matrix).all()
    print(f"attribution graph: {len(tokens)} tokens, {n_nodes} nodes, {len(graph.active_features)} active features, "
          f"{seconds:.1f} s")
