"""Resumable partial states: data only (safetensors + JSON), never a pickle.

Every ``checkpoint_every_s`` seconds (and/or steps), and when the run is
interrupted (SIGINT / SIGTERM), each job's full state is saved atomically as
one file ``<job dir>/partial/state-<train hash>-<step>.safetensors``: the
module's tensors, the optimiser's tensors and the RNG state as tensors, and
as JSON in the file's metadata the step, the optimiser's hyper-parameters,
the loader position, the logged history and the wandb run id. Loading never
executes code from the data directory. The two newest states are kept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.core.errors import UserError
from pipeline.core.io import write_atomic
from pipeline.methods.base import TrainJob

PARTIAL = "partial"
_STATE = re.compile(r"state-([0-9a-f]{12})-(\d{9})\.safetensors$")


def partial_steps(job: TrainJob, key: str) -> dict[int, Path]:
    """The saved steps of ``job`` under training hash ``key``."""
    folder = job.out_dir / PARTIAL
    found = {}
    for p in folder.glob("state-*.safetensors") if folder.exists() else []:
        m = _STATE.match(p.name)
        if m and m.group(1) == key[:12]:
            found[int(m.group(2))] = p
    return found


def plan_groups(jobs: list[TrainJob], hashes: dict[str, str]) -> list[tuple[int, list[TrainJob]]]:
    """Group jobs by the step they resume from (0: fresh), newest common step first."""
    steps = {j.name: set(partial_steps(j, hashes[j.name])) for j in jobs}
    with_state = [j for j in jobs if steps[j.name]]
    common = set.intersection(*(steps[j.name] for j in with_state)) if with_state else set()
    groups: dict[int, list[TrainJob]] = {}
    for j in jobs:
        start = max(common) if common and j in with_state else max(steps[j.name], default=0)
        groups.setdefault(start, []).append(j)
    return sorted(groups.items(), key=lambda kv: -kv[0])


def save_state(path: Path, module: torch.nn.Module, optim: torch.optim.Optimizer, info: dict) -> None:
    """One job's state: tensors in safetensors, everything else as JSON in its metadata."""
    opt = optim.state_dict()
    tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng"] = torch.get_rng_state()
    meta = {**info, "param_groups": opt["param_groups"]}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}), ".safetensors")


def load_state(path: Path, module: torch.nn.Module, optim: torch.optim.Optimizer) -> dict:
    """Restore module, optimiser and RNG from ``path``; return the JSON part."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated or foreign file: say which, never guess
        raise UserError(f"cannot resume from {path} ({e.__class__.__name__}); delete it to start that run over") from None
    module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, index, name = k.split(".", 2)
            state.setdefault(int(index), {})[name] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta.pop("param_groups")]
    optim.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng"])
    return meta


def prune(job: TrainJob, key: str, keep: int = 2) -> None:
    for _, path in sorted(partial_steps(job, key).items())[:-keep]:
        path.unlink()
