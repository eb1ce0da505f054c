"""Checkpoints: ``weights.safetensors`` + ``config.json`` in one directory.

Final checkpoints are written into a temporary sibling directory and swapped
in by rename, with a ``done`` marker written last: a directory without
``done`` is never taken as finished. Training state for resume lives apart in
``partial/`` (``pipeline.train.resume``).

``load(path)`` returns a typed ``Checkpoint`` (its module, config, origin and
training facts) in one trip: the config names its method family, and the
module is built by that method's spec from ``pipeline.methods.REGISTRY``.
This module imports no method. A folder in SAELens's format (``cfg.json`` +
``sae_weights.safetensors``, ``pipeline.methods.saelens``) loads the same way,
as the transcoder or SAE it describes, so public dictionaries can be evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core.errors import UserError
from pipeline.core.io import folder_atomic
from pipeline.methods import REGISTRY, saelens
from pipeline.methods.base import MethodSpec

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
DONE = "done"


def is_done(path: Path) -> bool:
    return (Path(path) / DONE).exists() and (Path(path) / CONFIG).exists()


def is_checkpoint_dir(path: Path) -> bool:
    """A folder that ``load`` reads: ours (config.json) or an SAELens one."""
    return (Path(path) / CONFIG).exists() or saelens.is_folder(path)


def read_metadata(path: Path) -> dict:
    """What a checkpoint records about its training (``metadata``), without loading weights."""
    if not (Path(path) / CONFIG).exists() and saelens.is_folder(path):
        return saelens.read(path)[0]["metadata"]
    return read_config(path).get("metadata", {})


def read_config(path: Path) -> dict:
    try:
        config = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}/{CONFIG} is unreadable ({e.__class__.__name__}); delete {path} and train it again") from None
    if not isinstance(config, dict) or not isinstance(config.get("metadata", {}), dict):
        raise UserError(f"{path}/{CONFIG} is not a checkpoint config; delete {path} and train it again")
    return config


def save(module: nn.Module, path: Path, metadata: dict, extra_files: dict[str, Callable[[Path], None]] | None = None) -> None:
    """Write a finished checkpoint at ``path`` atomically (old content replaced only at the end).

    ``extra_files`` maps a file name to a writer (e.g. the training-curves PNG).
    """
    with folder_atomic(path) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, tmp / WEIGHTS)
        config = {**module.config_dict(), "metadata": metadata}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        (tmp / DONE).write_text("")


@dataclass
class Checkpoint:
    path: Path
    config: dict
    module: nn.Module
    spec: MethodSpec

    @property
    def metadata(self) -> dict:
        return self.config.get("metadata", {})

    @property
    def origin(self) -> dict:
        """The training store's identity: lm, lm_weights_sha256, data, split, ctx, n_rows."""
        return self.metadata.get("store_manifest", {})

    @property
    def train_facts(self) -> dict:
        meta = self.metadata
        return {k: meta.get(k) for k in ("train_hash", "tokens", "steps", "store_manifest_hash")}


def load(path: str | Path, device: str = "cpu") -> Checkpoint:
    """Any finished checkpoint directory: its module (eval mode) and what it records."""
    path = Path(path)
    if not (path / CONFIG).exists() and saelens.is_folder(path):
        return _load_saelens(path, device)
    if not is_done(path):
        raise UserError(f"{path} is not a finished checkpoint (no {DONE} marker); train it first")
    config = read_config(path)
    spec = REGISTRY.get(str(config.get("family")))
    try:
        module = spec.build(config)
        module.load_state_dict(load_file(path / WEIGHTS, device=device))
    except UserError:
        raise
    except Exception as e:  # any failure to build or fill the module from these files means damage
        raise UserError(f"checkpoint {path} is damaged or from another version ({e.__class__.__name__}); "
                        f"delete it and train it again") from None
    return Checkpoint(path, config, module.to(device).eval(), spec)


def _load_saelens(path: Path, device: str) -> Checkpoint:
    config, tensors = saelens.read(path)
    spec = REGISTRY.get(config["family"])
    module = spec.build(config)
    state = module.state_dict()
    unknown = set(tensors) - set(state)
    if unknown:
        raise UserError(f"{path}: {', '.join(sorted(unknown))} have no place in a {spec.name} module")
    for name, value in tensors.items():
        if value.shape != state[name].shape:
            raise UserError(f"{path}: {name} has shape {tuple(value.shape)}, expected {tuple(state[name].shape)}")
    module.load_state_dict(state | tensors)
    return Checkpoint(path, config, module.to(device).eval(), spec)


def load_module(path: str | Path, device: str = "cpu") -> nn.Module:
    return load(path, device).module
