"""Checkpoints: ``weights.safetensors`` + ``config.json`` in one directory.

Final checkpoints are written into a temporary sibling directory and swapped
in by rename, with a ``done`` marker written last: a directory without
``done`` is never taken as finished. Training state for resume (optimiser,
step, loader position, RNG, history) lives apart in ``partial/`` (see
``pipeline.train.loop``).

``load(path)`` rebuilds any checkpoint: the config names its module family,
looked up in ``FAMILIES`` (the cross-layer transcoder registers itself there).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core.errors import UserError

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
DONE = "done"

FAMILIES: dict[str, Callable[[dict], nn.Module]] = {}


def register_family(name: str, from_config: Callable[[dict], nn.Module]) -> None:
    FAMILIES[name] = from_config


def _families() -> dict[str, Callable[[dict], nn.Module]]:
    import pipeline.methods.clt  # noqa: F401  (registers the cross-layer transcoder family)
    from pipeline.methods.transcoder import Dictionary

    FAMILIES.setdefault(Dictionary.family, Dictionary.from_config_dict)
    return FAMILIES


def write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def torch_save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def is_done(path: Path) -> bool:
    return (Path(path) / DONE).exists() and (Path(path) / CONFIG).exists()


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / CONFIG).read_text())


def save(module: nn.Module, path: Path, metadata: dict, extra_files: dict[str, Callable[[Path], None]] | None = None) -> None:
    """Write a finished checkpoint at ``path`` atomically (old content replaced only at the end).

    ``extra_files`` maps a file name to a writer (e.g. the training-curves PNG).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, tmp / WEIGHTS)
    config = {**module.config_dict(), "metadata": metadata}
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    for name, write in (extra_files or {}).items():
        write(tmp / name)
    (tmp / DONE).write_text("")
    publish_dir(tmp, path)


def publish_dir(tmp: Path, path: Path) -> None:
    """Move a fully written folder into place, replacing any older one.

    Readers see the old folder or the new one, never a half-written one; only
    between the two renames is there none at all.
    """
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def load(path: str | Path, device: str = "cpu") -> nn.Module:
    """Any finished checkpoint directory back into its module (eval mode)."""
    path = Path(path)
    if not is_done(path):
        raise UserError(f"{path} is not a finished checkpoint (no {DONE} marker); train it first")
    config = read_config(path)
    families = _families()
    if config.get("family") not in families:
        raise UserError(f"{path}: unknown checkpoint family {config.get('family')!r}; known: {', '.join(families)}")
    module = families[config["family"]](config)
    module.load_state_dict(load_file(path / WEIGHTS, device=device))
    return module.to(device).eval()
