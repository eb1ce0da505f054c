"""What to train: jobs from a request, staleness, and the train pass over the stale ones.

A job is stale (trained again) when no finished checkpoint exists for exactly
its request: the hash of its module config, the training settings, the
store's content hash and its input/target keys. Adding a K to a sweep thus
trains only the new checkpoint.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

from pipeline import checkpoint
from pipeline.core.errors import UserError
from pipeline.core.io import check_writable, exclusive_locks
from pipeline.core.hashing import canonical_hash
from pipeline.data.loader import ActivationLoader
import pipeline.methods.collective as collective
from pipeline.methods import REGISTRY
from pipeline.methods.base import TrainJob, TrainRequest
from pipeline.train.config import TrainConfig
from pipeline.train.log import plot_curves
from pipeline.train.loop import fit
from pipeline.train.resume import plan_groups

CURVES = "curves.png"


def build_jobs(models: list[str], **request) -> list[TrainJob]:
    """Every job of a train request (MODEL names of any methods), validated before any write."""
    jobs = []
    for spec, names in REGISTRY.for_models(models).items():
        jobs += spec.jobs(TrainRequest(models=tuple(names), **request))
    return jobs


def train_hash(job: TrainJob, cfg: TrainConfig, store_content_hash: str) -> str:
    return canonical_hash({"module": job.module.config_dict()["config"], "train": cfg.result_fields(),
                           "store": store_content_hash, "input": list(job.input_key), "target": list(job.target_key)})


def is_current(job: TrainJob, cfg: TrainConfig, store_content_hash: str) -> bool:
    """A finished checkpoint exists for exactly this training request (a damaged one is not: it is retrained)."""
    if not checkpoint.is_done(job.out_dir):
        return False
    try:
        metadata = checkpoint.read_config(job.out_dir).get("metadata", {})
    except UserError:
        warnings.warn(f"{job.out_dir}/{checkpoint.CONFIG} is damaged; training that checkpoint again", stacklevel=2)
        return False
    return isinstance(metadata, dict) and metadata.get("train_hash") == train_hash(job, cfg, store_content_hash)


def lock_path(job: TrainJob) -> Path:
    """The lock of one checkpoint: a hidden sibling file, so the folder itself can be swapped whole."""
    return job.out_dir.parent / f".{job.out_dir.name}.lock"


def bytes_needed(jobs: list[TrainJob]) -> int:
    """Free space a run needs: per job its weights, two partial states (module + Adam's two
    moments) and one more being written, with a margin for configs and curves."""
    per_param = 4 * (1 + 3 * 3)
    return sum(per_param * sum(t.numel() for t in j.module.state_dict().values()) + (1 << 20) for j in jobs)


def check_outputs(jobs: list[TrainJob]) -> None:
    """Fail before any work when a checkpoint folder cannot be written or the disk lacks room."""
    for parent in sorted({j.out_dir.parent for j in jobs}):
        here = [j for j in jobs if j.out_dir.parent == parent]
        check_writable(parent, bytes_needed(here), what=f"{len(here)} checkpoint{'s' if len(here) > 1 else ''}")


def save_checkpoint(job: TrainJob, metadata: dict, history: list[dict]) -> None:
    """The default ``save`` of ``fit``: the checkpoint folder with its training curves."""
    checkpoint.save(job.module, job.out_dir, metadata,
                    {CURVES: lambda path: plot_curves(history, job.name, path)})


def train_jobs(jobs: list[TrainJob], make_loader: Callable[[], ActivationLoader], cfg: TrainConfig,
               log_dir: Path | None = None, save=save_checkpoint) -> list[TrainJob]:
    """Train the jobs that are missing or stale, resuming partial ones; returns those trained.

    Each checkpoint being trained is locked: a second train of the same checkpoint
    is refused, naming the process (pid, host) that holds it."""
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):  # fit keys optimisers and histories by name
        raise ValueError(f"jobs of one training run need distinct names, got {sorted(n for n in set(names) if names.count(n) > 1)}")
    content_hash = make_loader().store.content_hash
    todo = [j for j in jobs if not is_current(j, cfg, content_hash)]
    if not todo:
        return todo
    hashes = {j.name: train_hash(j, cfg, content_hash) for j in todo}
    by_path = {lock_path(j): j for j in todo}
    main = collective.rank() == 0  # in a distributed run rank 0 checks, locks and writes for all
    if main:
        check_outputs(todo)
    with exclusive_locks(list(by_path) if main else [], lambda p: f"checkpoint {by_path[p].out_dir}"):
        for start, group in plan_groups(todo, hashes):
            fit(group, make_loader, cfg, save, {j.name: hashes[j.name] for j in group}, start_step=start, log_dir=log_dir)
    return todo
