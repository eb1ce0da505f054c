"""The training loop and the train stage: one-pass sweeps, staleness, kill -9 resume, bad input."""

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
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline import checkpoint
from pipeline.methods.transcoder import Transcoder, TranscoderConfig
from pipeline.core.errors import UserError
from pipeline.data.harvest import store_path
from pipeline.data.loader import ActivationLoader, LoaderConfig
from pipeline.data.toy import ToyConfig, write_toy_store
from pipeline.methods.base import TrainJob
from pipeline.train.config import TrainConfig
from pipeline.train.jobs import train_jobs
from pipeline.core import paths
from stages.train import train

REPO = Path(__file__).resolve().parents[1]
TOY = ToyConfig(d_model=16, n_features=64, n_rows=8192, mean_active=3, ctx=129)
KEYS = [(0, "mlp_in"), (0, "mlp_out")]

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_data_dir(root: Path) -> Path:
    """A DATA_DIR holding a toy store where the train stage looks for DATA=toy, CTX=129."""
    data_dir = root / "data"
    write_toy_store(store_path(data_dir, "smollm2-135m", "toy", "train", TOY.ctx), TOY)
    return data_dir


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return toy_data_dir(tmp_path_factory.mktemp("toydata"))


def members_for(ks, out: Path, n_latents=64) -> list[TrainJob]:
    return [TrainJob(Transcoder(TranscoderConfig(variant="topk", k=k, d_in=16, d_out=16, n_latents=n_latents, seed=k)),
                   (0, "mlp_in"), (0, "mlp_out"), out / f"topk-k{k}-L0") for k in ks]


def loader_factory(data_dir: Path, counter: list | None = None):
    from pipeline.data.store import HarvestStore

    store = HarvestStore.open(store_path(data_dir, "smollm2-135m", "toy", "train", TOY.ctx))

    def make():
        loader = ActivationLoader(store, KEYS, LoaderConfig(batch_size=256, seed=0))
        if counter is not None:
            read = loader._read_group

            def counted(*args):
                counter.append(args[:2])
                return read(*args)

            loader._read_group = counted
        return loader

    return make


SMALL = TrainConfig(tokens=256 * 40, batch_size=256, lr=3e-3, wandb="disabled", progress=False, log_every=5)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "weights.safetensors")


def test_sweep_is_one_pass_and_each_member_equals_its_solo_run(toy_dir, tmp_path):
    reads_sweep, reads_solo = [], []
    sweep = members_for([2, 4, 8], tmp_path / "sweep")
    trained = train_jobs(sweep, loader_factory(toy_dir, reads_sweep), SMALL)
    assert len(trained) == 3
    solo = members_for([4], tmp_path / "solo")
    train_jobs(solo, loader_factory(toy_dir, reads_solo), SMALL)
    assert reads_sweep == reads_solo  # three dictionaries, the same single pass over the data
    a, b = weights(tmp_path / "sweep" / "topk-k4-L0"), weights(tmp_path / "solo" / "topk-k4-L0")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    out = tmp_path / "sweep" / "topk-k8-L0"
    assert (out / "curves.png").stat().st_size > 1000 and (out / "done").exists()
    meta = checkpoint.read_config(out)["metadata"]
    assert meta["steps"] == 40 and meta["store_manifest_hash"] and np.isfinite(meta["final"]["fvu"])
    assert set(meta["final"]) >= {"loss", "fvu", "fvu_normal", "l0", "dead", "aux", "mse", "lr"}


def test_only_missing_or_stale_members_are_trained(toy_dir, tmp_path):
    make = loader_factory(toy_dir)
    assert len(train_jobs(members_for([2, 4], tmp_path), make, SMALL)) == 2
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("weights.safetensors")}
    assert train_jobs(members_for([2, 4], tmp_path), make, SMALL) == []
    again = train_jobs(members_for([2, 4, 8], tmp_path), make, SMALL)
    assert [m.out_dir.name for m in again] == ["topk-k8-L0"]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # K=2,4 untouched
    longer = TrainConfig(**{**SMALL.__dict__, "tokens": 256 * 50})
    assert len(train_jobs(members_for([2], tmp_path), make, longer)) == 1


def _stage_cmd(data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--data", "toy", "--ctx", str(TOY.ctx), "--layers", "0",
            "--latents", "256", "--k", "4,8", "--batch-size", "128", "--epochs", "6", "--lr", "3e-3",
            "--checkpoint-every-steps", "20", "--wandb", "disabled", "--no-progress", "--data-dir", str(data_dir), *extra]


def test_kill_9_then_resume_gives_identical_weights(tmp_path):
    ref_dir, run_dir = toy_data_dir(tmp_path / "ref"), toy_data_dir(tmp_path / "run")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # see one_thread
    subprocess.run(_stage_cmd(ref_dir), cwd=REPO, env=env, check=True, capture_output=True)

    proc = subprocess.Popen(_stage_cmd(run_dir), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = paths.checkpoint(run_dir, "smollm2-135m", "toy", TOY.ctx, "transcoder", f"topk-k{8}-L0") / "partial"
    deadline = time.time() + 120
    while not list(partial.glob("state-*-000000040.safetensors")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (partial.parent / "done").exists()

    subprocess.run(_stage_cmd(run_dir), cwd=REPO, env=env, check=True, capture_output=True)
    for k in (4, 8):
        ref = paths.checkpoint(ref_dir, "smollm2-135m", "toy", TOY.ctx, "transcoder", f"topk-k{k}-L0")
        run = paths.checkpoint(run_dir, "smollm2-135m", "toy", TOY.ctx, "transcoder", f"topk-k{k}-L0")
        assert checkpoint.read_config(run)["metadata"]["resumed_from_steps"], "the second run did not resume"
        a, b = weights(ref), weights(run)
        for name in a:
            assert torch.equal(a[name], b[name]), f"k={k} {name} differs after resume"


# ----- bad input ------------------------------------------------------------------

def _cli():
    app = typer.Typer()
    app.command()(train)
    return app


def run_stage(data_dir: Path, *args: str):
    base = ["--data", "toy", "--ctx", str(TOY.ctx), "--layers", "0", "--latents", "64", "--batch-size", "256",
            "--wandb", "disabled", "--no-progress", "--data-dir", str(data_dir), "--lr", "3e-3"]
    return CliRunner().invoke(_cli(), [*base, *args])


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "partial" not in p.parts}


@pytest.mark.parametrize("args, message", [
    (["--k", "64"], "0 < K < LATENTS"),
    (["--k", "0"], "0 < K"),
    (["--k", "-2"], "0 < K"),
    (["--lr", "0"], "LR must be a positive"),
    (["--lr", "-1e-3"], "LR must be a positive"),
    (["--model", "topq"], "unknown MODEL"),
    (["--kind", "crosscoder"], "unknown KIND"),
    (["--data", "nothere"], "no harvest store"),
    (["--layers", "0-1"], "incomplete"),
    (["--k", "4,x"], "comma list"),
])
def test_bad_input_gives_one_error_line_and_overwrites_nothing(tmp_path, args, message):
    data_dir = toy_data_dir(tmp_path)
    ok = run_stage(data_dir, "--k", "4", "--epochs", "1")
    assert ok.exit_code == 0, ok.output
    before = snapshot(data_dir)
    result = run_stage(data_dir, *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert snapshot(data_dir) == before


def test_non_finite_chunk_is_named_and_old_checkpoint_survives(tmp_path):
    data_dir = toy_data_dir(tmp_path)
    assert run_stage(data_dir, "--k", "4", "--epochs", "1").exit_code == 0
    before = snapshot(data_dir / "train")
    chunk = store_path(data_dir, "smollm2-135m", "toy", "train", TOY.ctx) / "layers/0/mlp_out/c/0/0"
    raw = np.fromfile(chunk, dtype="<f2")
    raw[100] = np.inf
    raw.tofile(chunk)
    result = run_stage(data_dir, "--k", "4", "--epochs", "2")  # stale: retrains, meets the bad chunk
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite values" in errors[0] and "layer 0 mlp_out, chunk 0" in errors[0]
    assert snapshot(data_dir / "train") == before


def test_mismatched_d_is_refused_before_anything_is_written(toy_dir, tmp_path):
    wrong = [TrainJob(Transcoder(TranscoderConfig(variant="topk", k=2, d_in=8, d_out=8, n_latents=32)),
                    (0, "mlp_in"), (0, "mlp_out"), tmp_path / "wrong")]
    with pytest.raises(UserError, match="d=16 in the store but the dictionary expects d=8"):
        train_jobs(wrong, loader_factory(toy_dir), SMALL)
    assert not (tmp_path / "wrong").exists()


def test_train_config_validation():
    with pytest.raises(UserError, match="below one batch"):
        TrainConfig(tokens=10, batch_size=256)
    with pytest.raises(UserError, match="WANDB"):
        TrainConfig(tokens=1000, batch_size=10, wandb="sometimes")
