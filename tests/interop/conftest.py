"""Interop tests: our exports loaded by the real sae-lens and circuit-tracer, in the side
environment ``.venv-interop`` (``make test-interop``; they pin older transformers than we do).

Run as ``.venv-interop/bin/python -m pytest --confcutdir=tests/interop tests/interop`` from the
repository root: our ``pipeline`` package is imported from the source tree (its method,
checkpoint and export layers need only torch, safetensors and PyYAML); what needs our
environment (the model conversion, harvest, evaluate, transformers 5 activations) runs there
as subprocesses of ``.venv/bin/python``. Outside the side environment these tests are not
collected.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("sae_lens") is None or importlib.util.find_spec("circuit_tracer") is None:
    collect_ignore_glob = ["test_*.py"]  # not the side environment (make test-interop builds it)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
MAIN_PYTHON = Path(os.environ.get("NND_MAIN_PYTHON", REPO / ".venv" / "bin" / "python"))
D, N_LATENTS, K = 16, 64, 4


def main_python(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run our own environment's Python from the repository root (``-m stages.cli ...`` is ``nnd``)."""
    if not MAIN_PYTHON.exists():
        pytest.skip(f"{MAIN_PYTHON} is missing (make install builds it)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(MAIN_PYTHON), *args], cwd=REPO, env=env, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    """A data dir whose models/ holds tiny-llama and SmolLM2, converted once per session by our environment."""
    root = tmp_path_factory.mktemp("interop_models")
    main_python("-c", "import sys; from pathlib import Path; from pipeline.data.models import ensure_model; "
                      "[ensure_model(n, Path(sys.argv[1])) for n in ('tiny-llama', 'smollm2-135m')]", str(root))
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_looking(kind: str, variant: str, layer: int = 0, d: int = D, n_latents: int = N_LATENTS, seed: int = 0):
    """A per-layer transcoder / SAE / skip transcoder with random weights, non-unit scales and
    thresholds where its variant has them, in eval mode."""
    import torch

    from pipeline.methods.skip import SkipTranscoder, SkipTranscoderConfig
    from pipeline.methods.transcoder import Transcoder, TranscoderConfig

    hooks = ("mlp_out", "mlp_out") if kind == "sae" else ("mlp_in", "mlp_out")
    args = dict(variant=variant, k=K, d_in=d, d_out=d, n_latents=n_latents, layer=layer, input_hook=hooks[0],
                target_hook=hooks[1], seed=seed, kind="sae" if kind == "sae" else "transcoder")
    module = SkipTranscoder(SkipTranscoderConfig(**args)) if kind == "skip" else Transcoder(TranscoderConfig(**args))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        module.W_enc.copy_(torch.randn(n_latents, d, generator=gen) / d**0.5)
        module.b_enc.copy_(0.1 * torch.randn(n_latents, generator=gen))
        module.W_dec.copy_(torch.randn(n_latents, d, generator=gen) / d**0.5)
        module.b_dec.copy_(torch.randn(d, generator=gen))
        module.input_scale.fill_(1.7)
        module.target_scale.fill_(0.6)
        if variant == "jumprelu":
            module.sparsity.log_threshold.copy_((0.5 + torch.rand(n_latents, generator=gen)).log())
        if variant == "batchtopk":
            module.sparsity.threshold.fill_(0.8)
        if kind == "skip":
            module.W_skip.copy_(0.1 * torch.randn(d, d, generator=gen))
    return module.eval()


def trained_looking_clt(variant: str, layers, d: int = D, n_latents: int = N_LATENTS, seed: int = 0):
    import torch

    from pipeline.methods.clt import CLTConfig, CrossLayerTranscoder

    clt = CrossLayerTranscoder(CLTConfig(variant=variant, k=K, d_in=d, d_out=d, n_latents=n_latents,
                                         layers=tuple(layers), seed=seed))
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in range(len(layers)):
            clt.W_enc[p].copy_(torch.randn(n_latents, d, generator=gen) / d**0.5)
            clt.W_dec[p].copy_(torch.randn(clt.W_dec[p].shape, generator=gen) / d**0.5)
            clt.b_enc[p].copy_(0.1 * torch.randn(n_latents, generator=gen))
            if variant == "jumprelu":
                clt.sparsity[p].log_threshold.copy_((0.5 + torch.rand(n_latents, generator=gen)).log())
            if variant == "batchtopk":
                clt.sparsity[p].threshold.fill_(0.8)
        clt.b_dec.copy_(torch.randn(clt.b_dec.shape, generator=gen))
        clt.input_scale.copy_(torch.linspace(1.2, 2.0, len(layers)))
        clt.target_scale.copy_(torch.linspace(0.5, 0.9, len(layers)))
    return clt.eval()
