"""Our SAELens exports loaded by the real sae-lens (6.54.12), and SAELens folders it writes read by us."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import D, K, N_LATENTS, main_python, trained_looking

from pipeline import checkpoint
from pipeline.core.errors import UserError
from pipeline.export import ExportOptions, export_saelens

CASES = [("sae", "vanilla", "standard"), ("sae", "topk", "topk"), ("sae", "batchtopk", "jumprelu"),
         ("sae", "jumprelu", "jumprelu"), ("transcoder", "vanilla", "transcoder"),
         ("transcoder", "batchtopk", "jumprelu_transcoder"), ("transcoder", "jumprelu", "jumprelu_transcoder"),
         ("skip", "vanilla", "skip_transcoder"), ("skip", "jumprelu", "jumprelu_skip_transcoder")]


def ours(module, x):
    with torch.no_grad():
        acts = module.encode(x)
        return acts, module.reconstruct(acts, x)


@pytest.mark.parametrize("kind,variant,architecture", CASES)
def test_sae_lens_computes_our_latents_and_outputs(tmp_path, kind, variant, architecture):
    from sae_lens import SAE

    module = trained_looking(kind, variant, layer=2)
    checkpoint.save(module, tmp_path / "ckpt", {"lm": "tiny-llama"})
    out = export_saelens([checkpoint.load(tmp_path / "ckpt")], tmp_path / "sl")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg["metadata"]["hook_name"] == f"blocks.2.{'hook_mlp_out' if kind == 'sae' else 'mlp.hook_in'}"
    assert cfg["metadata"]["hook_name_out"] == "blocks.2.hook_mlp_out" and cfg["metadata"]["model_name"] == "tiny-llama"

    sae = SAE.load_from_disk(out, device="cpu")
    assert sae.cfg.architecture() == architecture
    x = 2 * torch.randn(300, D, generator=torch.Generator().manual_seed(3))
    want_acts, want_out = ours(module, x)
    with torch.no_grad():
        acts = sae.encode(x)
        got = sae(x)
    assert torch.equal(acts > 0, want_acts > 0)  # the same latents fire
    assert 0 < (want_acts > 0).sum(-1).float().mean() < N_LATENTS
    torch.testing.assert_close(acts, want_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want_out, rtol=1e-5, atol=1e-5)

    # ... and our reader gives back the same function
    back = checkpoint.load(out)
    assert (back.module.cfg.variant, back.module.cfg.layer, back.spec.name) == (
        variant, 2, "skip" if kind == "skip" else "transcoder")
    back_acts, back_out = ours(back.module, x)
    torch.testing.assert_close(back_acts, want_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back_out, want_out, rtol=1e-5, atol=1e-5)


def test_topk_transcoders_are_refused_with_the_reason(tmp_path):
    for kind in ("transcoder", "skip"):
        checkpoint.save(trained_looking(kind, "topk"), tmp_path / kind, {"lm": "tiny-llama"})
        with pytest.raises(UserError, match="SAELens has no TopK"):
            export_saelens([checkpoint.load(tmp_path / kind)], tmp_path / f"{kind}.sl")
        assert not (tmp_path / f"{kind}.sl").exists()
    checkpoint.save(trained_looking("sae", "topk"), tmp_path / "sae", {"lm": "tiny-llama"})
    export_saelens([checkpoint.load(tmp_path / "sae")], tmp_path / "sae.sl")
    with pytest.raises(UserError, match="exists"):
        export_saelens([checkpoint.load(tmp_path / "sae")], tmp_path / "sae.sl")
    export_saelens([checkpoint.load(tmp_path / "sae")], tmp_path / "sae.sl", ExportOptions(overwrite=True))


def saved_by_sae_lens(folder, architecture: str, layer: int, d: int, **extra):
    """A freshly constructed sae-lens SAE with random weights, saved by sae-lens itself."""
    from sae_lens import SAE

    sae_cls, cfg_cls = SAE.get_sae_class_for_architecture(architecture), SAE.get_sae_config_class_for_architecture(architecture)
    transcoder = "transcoder" in architecture
    hooks = {"hook_name": f"blocks.{layer}.{'mlp.hook_in' if transcoder else 'hook_mlp_out'}",
             "hook_name_out": f"blocks.{layer}.hook_mlp_out", "model_name": "tiny-llama"}
    cfg = cfg_cls.from_dict({"architecture": architecture, "d_in": d, "d_sae": 48, **({"d_out": d} if transcoder else {}),
                             "apply_b_dec_to_input": not transcoder, "metadata": hooks, **extra})
    sae = sae_cls(cfg)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name.startswith("W_") else 0.1))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.2 + 0.3 * torch.rand(sae.threshold.shape, generator=gen))
    sae.save_model(folder)
    return sae.eval()


@pytest.mark.parametrize("architecture,extra", [("standard", {}), ("jumprelu", {}), ("jumprelu_transcoder", {}),
                                                ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True})])
def test_folders_written_by_sae_lens_load_as_the_same_function(tmp_path, architecture, extra):
    sae = saved_by_sae_lens(tmp_path / "sl", architecture, layer=1, d=D, **extra)
    loaded = checkpoint.load(tmp_path / "sl")
    assert loaded.metadata["imported"]["architecture"] == architecture and loaded.module.cfg.layer == 1
    x = 2 * torch.randn(300, D, generator=torch.Generator().manual_seed(5))
    acts, out = ours(loaded.module, x)
    with torch.no_grad():
        torch.testing.assert_close(acts, sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, sae(x), rtol=1e-5, atol=1e-5)


def test_our_evaluator_puts_a_folder_saved_by_sae_lens_on_the_plot(tmp_path, models_root):
    """A transcoder saved by sae-lens, evaluated by our evaluator (our environment, real harvest and splice)."""
    tiny = json.loads((models_root / "models" / "tiny-llama" / "config.json").read_text())
    d = tiny["hidden_size"]
    folder = tmp_path / "public-transcoder"
    saved_by_sae_lens(folder, "jumprelu_transcoder", layer=1, d=d)
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(models_root / "models", target_is_directory=True)
    common = ("--lm", "tiny-llama", "--data", "bbc", "--ctx", "32", "--data-dir", str(data))
    main_python("-m", "stages.cli", "harvest", *common, "--layers", "0-1", "--tokens", "600", "--chunk-rows", "256")
    out = tmp_path / "metrics.json"
    proc = main_python("-m", "stages.cli", "evaluate", "--ckpt", str(folder), *common, "--eval-tokens", "62",
                       "--no-progress", "--modes", "single", "--out", str(out))
    m = json.loads(out.read_text())
    assert m["lm"] == "tiny-llama" and m["checkpoints"] == [str(folder)], proc.stdout
    per = m["modes"]["single_layer"]["layers"]["1"]
    assert per["l0"] > 0 and per["ce"] > 0
    # the CLI refuses a TopK transcoder export in one line, exit 2
    checkpoint.save(trained_looking("transcoder", "topk"), tmp_path / "topk", {"lm": "tiny-llama"})
    bad = main_python("-m", "stages.cli", "export", "--format", "saelens", "--ckpt", str(tmp_path / "topk"),
                      "--out", str(tmp_path / "topk.sl"), check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: SAELens has no TopK") and bad.stderr.count("\n") == 1
