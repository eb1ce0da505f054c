"""Reliability: store identity by content, verify/repair, crash-safe creation, no code from data,
failing before the work, saves on signals and full disks, locks, and bad input through the real CLI.

Each bad-input case asserts the exit code, one `error:` line (no traceback) and that DATA_DIR is
unchanged. Tiny model (`tiny-llama`), tiny stores, toy stores for training.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import REPO, tree_bytes
from pipeline import checkpoint
from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.io import exclusive_lock
from pipeline.data.harvest import HarvestConfig, harvest, store_path
from pipeline.data.store import HarvestStore
from pipeline.data.toy import ToyConfig, write_toy_store
from stages.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--lm", "tiny-llama", "--ctx", "32", "--chunk-rows", "256", "--no-progress"]
TOY = ToyConfig(d_model=16, n_features=64, n_rows=16384, mean_active=3, ctx=129)  # 2 chunks of 8192 rows
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def nnd(*args) -> "CliResult":
    """The real `nnd` command tree, in process (fast); ``nnd_process`` for a real process."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    return CliResult(r.exit_code, r.stdout, r.stderr, r.exception)


class CliResult:
    def __init__(self, code, stdout, stderr, exception=None):
        self.code, self.stdout, self.stderr, self.exception = code, stdout, stderr, exception


def nnd_process(*args, python_flags=(), **kw) -> CliResult:
    p = subprocess.run([sys.executable, *python_flags, "-m", "stages.cli", *map(str, args)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, **kw)
    return CliResult(p.returncode, p.stdout, p.stderr)


def one_error_line(r: CliResult, *fragments: str, code: int = 2) -> str:
    assert r.code == code, (r.code, r.stdout, r.stderr, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def checksum(root: Path) -> str:
    """Every file and folder under DATA_DIR (the shared models link excluded)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] == "models":
            continue
        h.update(str(rel).encode() + b"\0")
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def toy_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "toydata"
    write_toy_store(store_path(data_dir, "smollm2-135m", "toy", "train", TOY.ctx), TOY)
    return data_dir


def train_args(data_dir: Path, *extra) -> list[str]:
    return ["train", "--data", "toy", "--ctx", TOY.ctx, "--layers", "0", "--latents", "64", "--k", "4",
            "--batch-size", "256", "--epochs", "1", "--lr", "3e-3", "--wandb", "disabled", "--no-progress",
            "--data-dir", data_dir, *extra]


def toy_ckpt(data_dir: Path, k: int = 4) -> Path:
    return paths.checkpoint(data_dir, "smollm2-135m", "toy", TOY.ctx, "transcoder", f"topk-k{k}-L0")


def toy_chunk(data_dir: Path, hook="mlp_out", chunk=1) -> Path:
    return store_path(data_dir, "smollm2-135m", "toy", "train", TOY.ctx) / f"layers/0/{hook}/c/{chunk}/0"


# ----- 1. store identity by content ---------------------------------------------------------

def _corpus(path: Path, n_docs=80, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta river stone cloud paper light music garden window".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 60))}) + "\n" for _ in range(n_docs)))
    return path


def test_edited_corpus_never_extends_its_store(data_dir, tmp_path):
    corpus = _corpus(tmp_path / "corpus.jsonl")
    args = ["harvest", *TINY, "--data", corpus, "--layers", "0", "--data-dir", data_dir]
    assert nnd(*args, "--tokens", 1000).code == 0
    location = store_path(data_dir, "tiny-llama", str(corpus), "train", 32)
    manifest = HarvestStore.open(location).manifest
    assert [(r["start"], r["stop"]) for r in manifest["row_ranges"]] == [(0, 1023)]
    corpus.write_text(corpus.read_text().replace("river", "RIVER"))  # edit the documents
    before = checksum(data_dir)
    one_error_line(nnd(*args, "--tokens", 3000), "has changed since", "cannot be extended", "delete")
    one_error_line(nnd(*args, "--tokens", 1000, "--layers", "0-1"), "has changed since")  # nor a new layer
    assert checksum(data_dir) == before
    _corpus(corpus)  # the old text back: growing works, and equals a one-go harvest
    assert nnd(*args, "--tokens", 3000).code == 0
    assert nnd(*args, "--tokens", 3000, "--store", tmp_path / "fresh.zarr").code == 0
    grown, fresh = tree_bytes(location), tree_bytes(tmp_path / "fresh.zarr")
    assert grown.pop("zarr.json") != fresh.pop("zarr.json") and grown == fresh  # only the manifest's ranges differ
    ranges = HarvestStore.open(location).manifest["row_ranges"]
    assert [(r["start"], r["stop"]) for r in ranges] == [(0, 1023), (1023, 3007)]


def test_reordered_documents_are_refused_too(data_dir, tmp_path):
    corpus = _corpus(tmp_path / "docs.jsonl")
    args = ["harvest", *TINY, "--data", corpus, "--layers", "0", "--data-dir", data_dir]
    assert nnd(*args, "--tokens", 500).code == 0
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines[40:] + lines[:40]) + lines[0].replace("alpha", "omega"))
    one_error_line(nnd(*args, "--tokens", 2000), "has changed since")


# ----- 5. verify and repair; train refuses damaged chunks -------------------------------------

def _damage(location: Path) -> None:
    chunk = lambda layer, hook, c: location / f"layers/{layer}/{hook}/c/{c}/0"  # noqa: E731
    raw = np.fromfile(chunk(0, "mlp_out", 3), dtype="<f2")
    raw[5] = np.nan
    raw.tofile(chunk(0, "mlp_out", 3))
    with open(chunk(1, "mlp_in", 2), "r+b") as f:
        f.truncate(100)
    chunk(1, "mlp_out", 5).unlink()
    raw = np.fromfile(chunk(0, "mlp_in", 1), dtype="<f2")
    raw[7] += 1  # finite, right size: only the checksum knows
    raw.tofile(chunk(0, "mlp_in", 1))
    tokens = location / "tokens/c/0"
    tokens.write_bytes(b"\0" * tokens.stat().st_size)


def test_verify_names_every_damaged_chunk_and_repair_is_byte_identical(data_dir, tmp_path):
    args = ["harvest", *TINY, "--data", "bbc", "--layers", "0-1", "--tokens", 2000, "--data-dir", data_dir]
    assert nnd(*args).code == 0
    assert nnd(*args, "--store", tmp_path / "clean.zarr").code == 0
    location = store_path(data_dir, "tiny-llama", "bbc", "train", 32)
    verify = ["verify", "--lm", "tiny-llama", "--data", "bbc", "--ctx", 32, "--data-dir", data_dir]
    ok = nnd(*verify)
    assert ok.code == 0 and "intact (18 layer-chunks checked)" in ok.stdout
    _damage(location)
    bad = nnd(*verify)
    line = one_error_line(bad, "5 problems", "nnd harvest --repair", code=1)
    assert str(location) in line
    damaged = [l for l in bad.stdout.splitlines() if l.startswith("damaged:")]
    for fragment in ("layer 0 mlp_out chunk 3: non-finite", "layer 1 mlp_in chunk 2: damaged", "layer 1 mlp_out chunk 5: missing",
                     "layer 0 mlp_in chunk 1: checksum mismatch", "tokens/doc/pos do not match"):
        assert any(fragment in l for l in damaged), (fragment, damaged)
    repaired = nnd("harvest", "--repair", "--store", location, "--data-dir", data_dir, "--no-progress")
    assert repaired.code == 0, repaired.stderr
    assert "4 layer-chunks recomputed" in repaired.stdout
    assert tree_bytes(location) == tree_bytes(tmp_path / "clean.zarr")
    assert nnd(*verify).code == 0


def test_a_compressed_store_missing_chunk_is_found_not_read_as_zeros(data_dir, tmp_path):
    args = ["harvest", *TINY, "--data", "bbc", "--layers", "0", "--tokens", 1000, "--compressor", "zstd", "--data-dir", data_dir]
    assert nnd(*args).code == 0 and nnd(*args, "--store", tmp_path / "clean.zarr").code == 0
    location = store_path(data_dir, "tiny-llama", "bbc", "train", 32)
    (location / "layers/0/mlp_in/c/2/0").unlink()
    with pytest.raises(UserError, match="chunk 2 of layer 0 mlp_in is missing.*nnd harvest --repair"):
        HarvestStore.open(location).read_chunk(0, "mlp_in", 2)
    bad = nnd("verify", "--store", location)
    assert bad.code == 1 and "damaged: layer 0 mlp_in chunk 2: missing" in bad.stdout
    assert nnd("harvest", "--repair", "--store", location, "--data-dir", data_dir, "--no-progress").code == 0
    assert tree_bytes(location) == tree_bytes(tmp_path / "clean.zarr")


def test_train_refuses_a_damaged_chunk_naming_it_and_the_repair(tmp_path):
    data_dir = toy_dir(tmp_path)
    chunk = toy_chunk(data_dir)
    with open(chunk, "r+b") as f:
        f.truncate(1000)
    before = checksum(data_dir)
    for flags in ((), ("-O",)):  # explicit checks, not asserts: `python -O` refuses too
        r = nnd_process(*train_args(data_dir), python_flags=flags)
        one_error_line(r, "chunk 1 of layer 0 mlp_out is damaged", "nnd harvest --repair")
        assert checksum(data_dir) == before
    chunk.unlink()
    one_error_line(nnd(*train_args(data_dir)), "chunk 1 of layer 0 mlp_out is missing", "nnd harvest --repair")
    np.full(8192 * 16, np.nan, dtype="<f2").tofile(chunk)
    one_error_line(nnd(*train_args(data_dir)), "non-finite values", "chunk 1", "nnd harvest --repair")
    assert not toy_ckpt(data_dir).exists()


# ----- 6. crash-safe creation ---------------------------------------------------------------

def test_interrupted_creation_is_recognised_and_redone(data_dir):
    location = store_path(data_dir, "tiny-llama", "bbc", "train", 32)
    location.mkdir(parents=True)
    (location / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')  # older versions
    debris = location.with_name(f".{location.name}.tmp-0123")  # a creation killed before its rename
    (debris / "zarr.json").parent.mkdir()
    (debris / "zarr.json").write_text("{}")
    with pytest.raises(UserError, match="creation was interrupted; the same `make harvest` recreates it"):
        HarvestStore.open(location)
    assert nnd("harvest", *TINY, "--data", "bbc", "--layers", "0", "--tokens", 500, "--data-dir", data_dir).code == 0
    assert HarvestStore.open(location, layers=[0]).n_rows == 527 and not debris.exists()


def test_kill_9_right_at_store_creation_then_the_same_command_finishes(data_dir):
    args = ["harvest", *TINY, "--data", "bbc", "--layers", "0", "--tokens", 500, "--data-dir", data_dir]
    location = store_path(data_dir, "tiny-llama", "bbc", "train", 32)
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *map(str, args)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # the first sign of the store, then kill at once
        if (location / "zarr.json").exists() or (location.parent.exists() and list(location.parent.glob(".*.tmp-*"))):
            break
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "harvest ended before it could be killed"
    if location.exists():
        assert HarvestStore.open(location).manifest  # never a store without its manifest
    r = nnd(*args)
    assert r.code == 0, r.stderr
    assert HarvestStore.open(location, layers=[0]).n_rows == 527 and not list(location.parent.glob(".*.tmp-*"))


def test_a_new_store_appears_only_with_its_manifest(data_dir, monkeypatch):
    from pipeline.data import store as store_module

    def killed(self, *args, **kwargs):  # the process dies right after creating the store
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module.StoreWriter, "_grow", killed)
    cfg = HarvestConfig(lm="tiny-llama", data="bbc", layers=(0,), tokens=500, ctx=32, chunk_rows=256, data_dir=data_dir)
    with pytest.raises(KeyboardInterrupt):
        harvest(cfg, progress=False)
    assert HarvestStore.open(cfg.location).manifest["n_rows"] == 0  # has a manifest: the same command continues
    assert not list(Path(cfg.location).parent.glob(".*.tmp-*"))
    monkeypatch.undo()
    harvest(cfg, progress=False)
    assert HarvestStore.open(cfg.location, layers=[0]).n_rows == 527


# ----- 3. no code from the data directory ----------------------------------------------------

class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_planted_pickle_is_never_executed(tmp_path):
    from pipeline.train import resume

    data_dir = toy_dir(tmp_path)
    marker = tmp_path / "executed"
    payload = pickle.dumps(_Planted(marker))
    partial = toy_ckpt(data_dir) / "partial"
    partial.mkdir(parents=True)
    for name in ("state-0-000000010.pt", "state-000000000010.pt", "optim.pt", "state.pkl"):
        (partial / name).write_bytes(payload)
    disguised = partial / "state-0123456789ab-000000010.safetensors"
    disguised.write_bytes(payload)
    r = nnd(*train_args(data_dir))
    assert r.code == 0, r.stderr
    assert not marker.exists()
    with pytest.raises(UserError, match="cannot resume from"):  # even when named like a state
        resume.load_state(disguised, torch.nn.Linear(2, 2), torch.optim.Adam(torch.nn.Linear(2, 2).parameters()))
    assert not marker.exists()
    sources = [p.read_text() for p in (REPO / "pipeline").rglob("*.py")] + [p.read_text() for p in (REPO / "stages").rglob("*.py")]
    assert not any(s for s in sources if "torch.load(" in s or "pickle.load" in s)


# ----- 7. fail before the work; no work lost at the end ------------------------------------------

@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the filesystem is read-only")])
def test_a_failed_save_is_one_line_and_keeps_the_partial_state(tmp_path, monkeypatch, code, reason):
    data_dir = toy_dir(tmp_path)

    def no_room(module, path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(checkpoint, "save", no_room)
    r = nnd(*train_args(data_dir, "--checkpoint-every-steps", "20"))
    one_error_line(r, f"cannot write checkpoint {toy_ckpt(data_dir)}: {reason}", "partial state of step 60 is intact")
    states = sorted(p.name for p in (toy_ckpt(data_dir) / "partial").iterdir())
    assert len(states) == 2 and states[-1].endswith("-000000060.safetensors")
    assert not [p for p in (data_dir / "train").rglob(".*") if ".tmp-" in p.name or p.name.endswith(".lock")]
    monkeypatch.undo()
    r = nnd(*train_args(data_dir, "--checkpoint-every-steps", "20"))
    assert r.code == 0, r.stderr
    assert checkpoint.read_config(toy_ckpt(data_dir))["metadata"]["resumed_from_steps"] == [60]


def test_sigterm_saves_a_partial_state_and_resume_equals_an_uninterrupted_run(tmp_path):
    ref_dir, run_dir = toy_dir(tmp_path / "ref"), toy_dir(tmp_path / "run")
    long = ["--epochs", "12", "--checkpoint-every-steps", "50", "--checkpoint-every", "1e9"]
    ref = nnd_process(*train_args(ref_dir, *long))
    assert ref.code == 0, ref.stderr
    args = [a for a in train_args(run_dir, *long)]
    args[args.index("--wandb") + 1] = "offline"
    cmd = [sys.executable, "-m", "stages.cli", *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**ENV, "WANDB_SILENT": "true"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    partial = toy_ckpt(run_dir) / "partial"
    deadline = time.time() + 180
    while not list(partial.glob("*-000000050.safetensors")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert 50 < step < 768, err  # saved on the signal, not at a scheduled step
    saved = sorted(partial.glob("state-*.safetensors"))[-1]
    assert saved.name.endswith(f"-{step:09d}.safetensors")
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as f:
        run_id = json.loads(f.metadata()["state"])["wandb_run_id"]
    proc = subprocess.run(cmd, cwd=REPO, env={**ENV, "WANDB_SILENT": "true"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    meta = checkpoint.read_config(toy_ckpt(run_dir))["metadata"]
    assert meta["resumed_from_steps"] == [step] and meta["wandb_run_id"] == run_id  # one wandb run, continued
    runs = list((run_dir / "train" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    a, b = load_file(toy_ckpt(ref_dir) / "weights.safetensors"), load_file(toy_ckpt(run_dir) / "weights.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


# ----- 8. locks -----------------------------------------------------------------------------

def test_a_second_train_of_the_same_checkpoint_is_refused_naming_the_holder(tmp_path):
    from pipeline.train.jobs import lock_path

    data_dir = toy_dir(tmp_path)
    out = toy_ckpt(data_dir)

    class Job:
        out_dir = out

    with exclusive_lock(lock_path(Job), blocking=False, what="checkpoint"):
        before = checksum(data_dir)
        line = one_error_line(nnd(*train_args(data_dir)), f"checkpoint {out} is in use by pid {os.getpid()} on host")
        assert os.uname().nodename in line
        assert checksum(data_dir) == before
    assert nnd(*train_args(data_dir)).code == 0  # free again
    assert not lock_path(Job).exists()


def test_two_real_trains_at_once_one_is_refused(tmp_path):
    data_dir = toy_dir(tmp_path)
    args = train_args(data_dir, "--epochs", "200")
    first = subprocess.Popen([sys.executable, "-m", "stages.cli", *map(str, args)], cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = toy_ckpt(data_dir).parent / f".{toy_ckpt(data_dir).name}.lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text()) and time.time() < deadline and first.poll() is None:
        time.sleep(0.02)
    second = nnd_process(*args)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    one_error_line(second, "is in use by pid", str(first.pid))


def test_waiters_on_a_removed_lock_file_never_hold_it_together(tmp_path):
    import threading

    target, inside, seen = tmp_path / "ref" / "lock", [], []

    def worker():
        for _ in range(20):
            with exclusive_lock(target):
                inside.append(1)
                seen.append(len(inside))
                time.sleep(0.001)
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 60 and max(seen) == 1  # mutual exclusion across the unlink-on-release


def test_a_failed_run_leaves_no_lock_folders(tmp_path):
    target = tmp_path / "eval" / "x" / "reference" / "lock"
    with pytest.raises(UserError):
        with exclusive_lock(target):
            raise UserError("the eval split is too small")
    assert not (tmp_path / "eval").exists()
