"""The CUDA paths: harvest, loader, training. Skipped, with the reason, where no GPU is present;
the bad-device check runs everywhere."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_nnd
from pipeline.data.harvest import HarvestConfig, harvest
from pipeline.data.loader import ActivationLoader, LoaderConfig
from pipeline.data.store import HarvestStore
from pipeline.data.toy import ToyConfig, write_toy_store
from pipeline.methods.base import TrainJob
from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.train.config import TrainConfig
from pipeline.train.jobs import train_jobs

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="no CUDA GPU on this machine")
SMALL = dict(lm="tiny-llama", data="bbc", ctx=32, chunk_rows=256, tokens=2000, layers=(0, 1))


def test_a_gpu_device_without_a_gpu_is_one_clear_line(data_dir):
    if GPU:
        pytest.skip("this machine has a GPU")
    ran = run_nnd("harvest", "--lm", "tiny-llama", "--tokens", "500", "--ctx", "32", "--device", "cuda",
                  "--data-dir", str(data_dir), check=False)
    assert ran.returncode == 2 and ran.stderr.strip().splitlines() == [
        "error: DEVICE=cuda but no CUDA GPU is available here; use DEVICE=cpu"], ran.stderr
    assert not (data_dir / "harvest").exists()


@needs_gpu
def test_harvest_on_the_gpu_equals_the_cpu_store_in_fp32_and_differs_little_in_bf16(data_dir, tmp_path):
    stores = {}
    for name, device, dtype in (("cpu", "cpu", "float32"), ("gpu", "cuda", "float32"), ("bf16", "cuda", "bfloat16")):
        cfg = HarvestConfig(**SMALL, data_dir=data_dir, store=str(tmp_path / f"{name}.zarr"), device=device,
                            model_dtype=dtype, dtype="float32")
        harvest(cfg, progress=False)
        stores[name] = HarvestStore.open(cfg.location)
    assert stores["bf16"].manifest["model_dtype"] == "bfloat16" and "model_dtype" not in stores["gpu"].manifest
    for layer in (0, 1):
        for hook in ("mlp_in", "mlp_out"):
            cpu, gpu, bf16 = (np.concatenate([s.read_chunk(layer, hook, c) for c in range(s.n_chunks)])
                              for s in (stores["cpu"], stores["gpu"], stores["bf16"]))
            scale = np.abs(cpu).max()
            assert np.abs(gpu - cpu).max() <= 1e-4 * scale, (layer, hook)
            rel = np.linalg.norm(bf16 - cpu) / np.linalg.norm(cpu)
            assert 0 < rel < 0.05, (layer, hook, rel)


@needs_gpu
def test_the_loader_feeds_the_gpu_from_pinned_memory(tmp_path):
    toy = ToyConfig(d_model=32, n_features=64, n_rows=20000, ctx=129)
    store = write_toy_store(tmp_path / "toy.zarr", toy)
    loader = ActivationLoader(store, [(0, "mlp_in")], LoaderConfig(batch_size=3000, device="cuda"))
    assert loader.pin
    batch = next(iter(loader))[(0, "mlp_in")]
    assert batch.device.type == "cuda" and batch.shape == (3000, 32)
    joined = loader._joined([torch.ones(5, 32, dtype=torch.float16), torch.ones(7, 32, dtype=torch.float16)])
    assert joined.is_pinned() and joined.shape == (12, 32)


@needs_gpu
@pytest.mark.parametrize("variant", ["topk", "batchtopk", "jumprelu"])
def test_training_on_the_gpu_reaches_the_cpu_result(tmp_path, variant):
    """Same rows, seed and settings on CPU and GPU (bf16 matmuls on both, different kernels):
    the same FVU within 0.02 and L0 at k."""
    toy = ToyConfig(d_model=32, n_features=128, n_rows=32768, mean_active=4, ctx=129)
    store = write_toy_store(tmp_path / "toy.zarr", toy)
    keys = [(0, "mlp_in"), (0, "mlp_out")]
    results = {}
    for device in ("cpu", "cuda"):
        module = Transcoder(TranscoderConfig(variant=variant, k=4, d_in=32, d_out=32, n_latents=128, layer=0))
        job = TrainJob(module, keys[0], keys[1], tmp_path / device / variant)
        cfg = TrainConfig(tokens=4 * 32768, batch_size=1024, lr=3e-3, wandb="disabled", progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # four epochs of the toy rows: the reuse warning is expected
            train_jobs([job], lambda: ActivationLoader(store, keys, LoaderConfig(batch_size=1024, device=device)), cfg)
        from pipeline import checkpoint

        results[device] = checkpoint.read_config(job.out_dir)["metadata"]["final"]
    assert results["cuda"]["fvu"] == pytest.approx(results["cpu"]["fvu"], abs=0.02), results
    assert results["cuda"]["l0"] == pytest.approx(4, rel=0.25), results


@needs_gpu
def test_evaluation_on_the_gpu_gives_the_cpu_metrics(data_dir, tmp_path):
    from pipeline import checkpoint
    from pipeline.eval.config import EvalConfig, load_model
    from pipeline.eval.methods import load_checkpoints, neuron_method
    from pipeline.eval.run import evaluate_methods
    from test_splice import transcoder

    harvest(HarvestConfig(**{**SMALL, "layers": (0, 1, 2, 3), "tokens": 600}, data_dir=data_dir), progress=False)
    results = {}
    for device in ("cpu", "cuda"):
        cfg = EvalConfig(lm="tiny-llama", data="bbc", ctx=32, eval_tokens=124, data_dir=data_dir,
                         eval_dir=tmp_path / device, device=device)
        lm = load_model(cfg)
        folder = tmp_path / f"ckpt-{device}"
        origin = {"lm": "tiny-llama", "lm_weights_sha256": lm.weights_sha256, "data": "bbc", "split": "train", "ctx": 32}
        for layer in (1, 2):
            checkpoint.save(transcoder(layer, seed=40 + layer, k=4), folder / f"L{layer}", {"store_manifest": origin})
        methods = load_checkpoints(lm, [folder]) + [neuron_method(lm, 8, (1, 2))]
        results[device] = [r.to_json() for r in evaluate_methods(lm, cfg, methods)]
    for cpu, gpu in zip(results["cpu"], results["cuda"]):
        for mode in ("single_layer", "all_layers"):
            assert gpu["modes"][mode]["ce"] == pytest.approx(cpu["modes"][mode]["ce"], rel=1e-4), (cpu["name"], mode)
            assert gpu["modes"][mode]["fvu"] == pytest.approx(cpu["modes"][mode]["fvu"], rel=1e-3), (cpu["name"], mode)
