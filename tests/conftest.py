"""Shared fixtures: models are built once per session, every test gets its own DATA_DIR.

``data_dir`` is an empty stage-output root whose ``models/`` links to the
session's model cache, so tests never rebuild a model but never share stores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common import quiet_libraries

REPO = Path(__file__).resolve().parents[1]
# tests/interop runs in its own environment (make test-interop); left out here, its conftest would
# also shadow this one's name for `from conftest import ...`
collect_ignore = ["interop"]
quiet_libraries()


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models_root")
    (root / "models").mkdir()
    return root


def _data_dir_with(models_root: Path, tmp_path: Path, *names: str) -> Path:
    from pipeline.data.models import ensure_model

    for name in names:
        ensure_model(name, models_root)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(models_root / "models", target_is_directory=True)
    return data_dir


@pytest.fixture
def data_dir(models_root, tmp_path) -> Path:
    """A fresh DATA_DIR with the tiny test model available."""
    return _data_dir_with(models_root, tmp_path, "tiny-llama")


@pytest.fixture
def smol_data_dir(models_root, tmp_path) -> Path:
    """A fresh DATA_DIR with the bundled SmolLM2 available (converted once per session)."""
    return _data_dir_with(models_root, tmp_path, "tiny-llama", "smollm2-135m")


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny problems: one intra-op thread is as fast, and far faster on a
    shared machine, where spinning OpenMP workers slowed the suite ~10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm(models_root):
    """The tiny test model, loaded once per module."""
    from pipeline.data.models import ensure_model, load_lm

    ensure_model("tiny-llama", models_root)
    return load_lm("tiny-llama", models_root)


def run_nnd(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"nnd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
