"""Weight snapshots during training (``TrainConfig.snapshot_tokens``), for the emergence analysis.

Every ``snapshot_tokens`` training tokens each job's module state is written to
``paths.snapshots_dir(job.out_dir)/tokens-<tokens>.safetensors`` (safetensors, the
step and token count in its metadata). A resumed run rewrites the snapshots after its
resume step with the same values (training is a pure function of the saved state).
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, safe_open, save_file

from pipeline.core import paths
from pipeline.core.io import write_atomic


def snapshot_due(cfg, step: int) -> bool:
    """True after the step that crosses a multiple of ``cfg.snapshot_tokens`` (the last step excluded:
    the checkpoint itself is the final state)."""
    every = cfg.snapshot_tokens
    if not every or step >= cfg.steps:
        return False
    return step * cfg.batch_size // every > (step - 1) * cfg.batch_size // every


def save_snapshots(jobs, step: int, tokens: int) -> None:
    for j in jobs:
        folder = paths.snapshots_dir(j.out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in j.module.state_dict().items()}
        meta = {"step": str(step), "tokens": str(tokens)}
        write_atomic(folder / f"tokens-{tokens:012d}.safetensors", lambda tmp: save_file(state, str(tmp), metadata=meta),
                     ".safetensors")


def list_snapshots(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(tokens, file) of every snapshot of a checkpoint, in training order."""
    folder = paths.snapshots_dir(checkpoint_dir)
    out = []
    for f in sorted(folder.glob("tokens-*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            out.append((int(handle.metadata()["tokens"]), f))
    return sorted(out)


def load_snapshot(path: Path) -> dict:
    return load_file(str(path))
