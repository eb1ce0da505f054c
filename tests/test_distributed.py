"""Several processes training as one (torchrun, DDP on gloo, 2 processes on this CPU machine).

- a 2-process run ends with the weights of a 1-process run reading the same global
  batches (``--data-streams 2``), to fp32 tolerance, for every sparsity variant and a CLT;
- kill -9 of one worker mid-run, then the same command: it resumes and ends identical
  to an uninterrupted 2-process run;
- ``--spread sweep`` deals a K sweep to the processes: each dictionary equals the one
  a single process trains;
- bad launcher settings are one clear line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoint
from pipeline.core import paths
from pipeline.data.harvest import store_path
from pipeline.data.toy import ToyConfig, write_toy_store

REPO = Path(__file__).resolve().parents[1]
TOY = ToyConfig(d_model=32, n_features=64, n_layers=2, n_rows=32768, mean_active=3, ctx=129)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MODELS = "topk,batchtopk,jumprelu,vanilla,clt"
NAMES = ["topk-k4-L0", "topk-k4-L1", "batchtopk-k4-L0", "jumprelu-k4-L1", "vanilla-k4-L0"]


def _train(data_dir: Path, *extra: str, models: str = MODELS, epochs: str = "1", port: int = 29611,
           popen: bool = False):
    cmd = [sys.executable, "-m", "stages.cli", "train", "--data", "toy", "--ctx", str(TOY.ctx), "--layers", "0-1",
           "--model", models, "--latents", "96", "--k", "4", "--batch-size", "256", "--epochs", epochs,
           "--lr", "3e-3", "--wandb", "disabled", "--no-progress", "--master-port", str(port),
           "--data-dir", str(data_dir), *extra]
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def _data_dir(root: Path) -> Path:
    data_dir = root / "data"
    write_toy_store(store_path(data_dir, "smollm2-135m", "toy", "train", TOY.ctx), TOY)
    return data_dir


def _weights(data_dir: Path, name: str, group: str = "transcoder") -> dict[str, torch.Tensor]:
    return load_file(paths.checkpoint(data_dir, "smollm2-135m", "toy", TOY.ctx, group, name) / "weights.safetensors")


def _all_weights(data_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {name: _weights(data_dir, name) for name in NAMES}
    out["clt"] = _weights(data_dir, "clt-batchtopk-k4-L0-1", "clt")
    return out


def test_two_processes_equal_one_process_reading_the_same_global_batches(tmp_path):
    """Same rows, same init, same loss and gradient up to fp32 rounding. Adam's first steps (about lr x sign(g)) turn fp32 reassociation in the gradient
    all-reduce into differences of up to 2 lr on the few coordinates whose gradient is ~0, so
    the weights after 8 steps are compared by relative norm, and the logged FVU (exact
    global sums, not a mean of per-rank FVUs) to 1e-3."""
    one, two = _data_dir(tmp_path / "one"), _data_dir(tmp_path / "two")
    ran = _train(one, "--tokens", "2048", "--data-streams", "2")
    assert ran.returncode == 0, ran.stderr[-3000:]
    ran = _train(two, "--tokens", "2048", "--nproc", "2")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "Traceback" not in ran.stderr, ran.stderr[-3000:]
    a, b = _all_weights(one), _all_weights(two)
    for name in a:
        for key in (k for k in a[name] if a[name][k].is_floating_point()):
            rel = float((a[name][key] - b[name][key]).norm() / a[name][key].norm().clamp_min(1e-12))
            assert rel < (2e-2 if name.startswith("vanilla") else 1e-3), f"{name}/{key}: relative difference {rel:.3g}"
    for name in NAMES:
        ma, mb = (checkpoint.read_config(paths.checkpoint(d, "smollm2-135m", "toy", TOY.ctx, "transcoder", name))
                  ["metadata"] for d in (one, two))
        assert mb["processes"] == 2 and ma["processes"] == 1 and mb["tokens"] == ma["tokens"] == 2048
        first_a, first_b = ma["final"], mb["final"]
        assert first_b["fvu"] == pytest.approx(first_a["fvu"], abs=1e-3), name
        assert first_b["l0"] == pytest.approx(first_a["l0"], rel=1e-2), name


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found += [int(child), *_children(int(child))]
    return found


def _worker_pids(launcher_pid: int) -> list[int]:
    """The two training workers under the launcher (nnd -> torchrun -> workers)."""
    workers = []
    for pid in _children(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"LOCAL_RANK=" in environ:
            workers.append(pid)
    return workers


def test_kill_9_of_one_worker_then_the_same_command_resumes_identically(tmp_path):
    ref, run = _data_dir(tmp_path / "ref"), _data_dir(tmp_path / "run")
    models, extra = "batchtopk,jumprelu", ("--nproc", "2", "--checkpoint-every-steps", "8")
    done = _train(ref, *extra, models=models, epochs="2", port=29621)
    assert done.returncode == 0, done.stderr[-3000:]

    partial = paths.checkpoint(run, "smollm2-135m", "toy", TOY.ctx, "transcoder", "jumprelu-k4-L1") / "partial"
    proc = _train(run, *extra, models=models, epochs="2", port=29622, popen=True)
    deadline = time.time() + 300
    while not list(partial.glob("state-*-000000064.safetensors")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = _worker_pids(proc.pid)
    assert len(workers) == 2, f"expected 2 workers, found {workers}"
    os.kill(workers[1], signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    names = ["batchtopk-k4-L0", "jumprelu-k4-L1"]
    assert not any((paths.checkpoint(run, "smollm2-135m", "toy", TOY.ctx, "transcoder", n) / "done").exists()
                   for n in names), "the killed run finished before the kill; raise epochs"

    again = _train(run, *extra, models=models, epochs="2", port=29623)
    assert again.returncode == 0, again.stderr[-3000:]
    for name in names:
        meta = checkpoint.read_config(paths.checkpoint(run, "smollm2-135m", "toy", TOY.ctx, "transcoder", name))
        assert meta["metadata"]["resumed_from_steps"], f"{name}: the second run did not resume"
        a, b = _weights(ref, name), _weights(run, name)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}/{key} differs after kill -9 and resume"


def test_two_nodes_on_one_machine_equal_two_local_processes(tmp_path):
    """The multi-node launch (static rendezvous at MASTER_ADDR:MASTER_PORT), both 'nodes' here."""
    local, nodes = _data_dir(tmp_path / "local"), _data_dir(tmp_path / "nodes")
    models, extra = "batchtopk,jumprelu", ("--tokens", "2048")
    ran = _train(local, *extra, "--nproc", "2", models=models, port=29641)
    assert ran.returncode == 0, ran.stderr[-3000:]
    procs = [_train(nodes, *extra, "--nnodes", "2", "--node-rank", str(i), "--master-addr", "127.0.0.1",
                    models=models, port=29642, popen=True) for i in (0, 1)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    for name in ("batchtopk-k4-L0", "jumprelu-k4-L1"):
        a, b = _weights(local, name), _weights(nodes, name)
        for key in a:
            assert torch.allclose(a[key].double(), b[key].double(), rtol=1e-6, atol=1e-7), f"{name}/{key}"


def test_spread_sweep_deals_dictionaries_to_processes_and_each_equals_a_single_process_one(tmp_path):
    one, two = _data_dir(tmp_path / "one"), _data_dir(tmp_path / "two")
    models, ks = "topk", ("--k", "4,8")
    ran = _train(one, *ks, models=models, epochs="1")
    assert ran.returncode == 0, ran.stderr[-3000:]
    ran = _train(two, *ks, "--nproc", "2", "--spread", "sweep", models=models, epochs="1", port=29631)
    assert ran.returncode == 0, ran.stderr[-3000:]
    for name in ("topk-k4-L0", "topk-k4-L1", "topk-k8-L0", "topk-k8-L1"):
        a, b = _weights(one, name), _weights(two, name)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}/{key}"


@pytest.mark.parametrize("extra, message", [
    (("--nproc", "0"), "NPROC=0 must be between 1 and 256"),
    (("--nproc", "2", "--batch-size", "255"), "BATCH_SIZE=255 must be a multiple of the 2 processes"),
    (("--nnodes", "2", "--node-rank", "2"), "NODE_RANK=2 must be in 0..1"),
    (("--nproc", "2", "--master-addr", "a;rm -rf /"), "is not a host name or IP address"),
    (("--nproc", "2", "--spread", "rings"), "SPREAD must be one of ddp, sweep"),
])
def test_bad_launcher_settings_are_one_clear_line(tmp_path, extra, message):
    data_dir = _data_dir(tmp_path)
    ran = _train(data_dir, *extra)
    assert ran.returncode == 2, ran.stderr[-2000:]
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: ") and message in lines[0], ran.stderr[-2000:]
    assert not (data_dir / "train").exists()
