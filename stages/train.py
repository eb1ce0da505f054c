"""`nnd train`: fit dictionaries (a sweep over MODEL x K x LAYERS) on a harvest store.

Output, one directory per dictionary:
``{data_dir}/train/{lm}/{data}/ctx{ctx}/{kind}/{variant}-k{k}-L{layer}/``
with ``weights.safetensors``, ``config.json``, ``curves.png`` and a ``done``
marker written last. Only missing or stale dictionaries are trained, all of
them in one pass over the data; partly trained ones resume.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import typer

from pipeline.core import defaults
from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.layers import parse_layers
from pipeline.data.loader import ActivationLoader, LoaderConfig
from pipeline.data.store import HarvestStore
from pipeline.methods import REGISTRY
from pipeline.methods.transcoder import KIND_HOOKS
from pipeline.train.config import TrainConfig
from pipeline.train.jobs import build_jobs, train_jobs
from stages.common import parse_ints, stage


@stage
def train(
    model: str = typer.Option(defaults.MODEL, help=f"method(s), comma list: {', '.join(REGISTRY.models())}"),
    k: str = typer.Option(defaults.K, help="k (topk/batchtopk) or target L0 (vanilla/jumprelu); comma list = sweep"),
    kind: str = typer.Option(defaults.KIND, help="transcoder (mlp_in -> mlp_out) or sae (mlp_out -> mlp_out)"),
    layers: str = typer.Option(defaults.LAYERS, help="layers, e.g. 0-3 or 0,2"),
    latents: int = typer.Option(defaults.LATENTS, help=f"dictionary width; 0 = {defaults.WIDTH_PER_D_MODEL} x d_model"),
    tokens: int = typer.Option(defaults.TRAIN_TOKENS, help="store rows used per epoch; 0 = the whole store"),
    epochs: float = typer.Option(defaults.EPOCHS, help="passes over those rows (more than 1 reuses data, with a warning)"),
    lr: float = typer.Option(defaults.LR, help="learning rate; default 2e-3 / sqrt(latents / 2^14)"),
    lm: str = typer.Option(defaults.LM, help="model the store was harvested from"),
    data: str = typer.Option(defaults.DATA, help="corpus of the store"),
    ctx: int = typer.Option(defaults.CTX, help="context length of the store"),
    wandb: str = typer.Option(os.environ.get("WANDB_MODE", defaults.WANDB), help="offline | online | disabled"),
    seed: int = typer.Option(defaults.SEED, help="seed for init and data order"),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    batch_size: int = typer.Option(defaults.BATCH_SIZE, help="rows per optimiser step"),
    lr_schedule: str = typer.Option("cosine", help="cosine or constant (after warm-up)"),
    checkpoint_every: float = typer.Option(300.0, help="seconds between resumable partial checkpoints"),
    checkpoint_every_steps: int = typer.Option(0, help="also save every this many steps (0: off)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    device: str = typer.Option("cpu", help="cpu or cuda (pinned-memory, non-blocking batches)"),
    snapshot_tokens: int = typer.Option(0, help="save weight snapshots every this many tokens for `nnd emergence` (0: off)"),
):
    """Train dictionaries on data/harvest/<lm>/<data>/train-ctx<ctx>.zarr."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    variants = [v for v in model.replace(" ", "").split(",") if v]
    ks = parse_ints(k, "K")
    layer_list = parse_layers(layers)
    if not epochs > 0:
        raise UserError(f"EPOCHS must be positive, got {epochs}")
    if latents is not None and latents < 0:
        raise UserError(f"LATENTS={latents} must be a positive dictionary width (0 or unset: {defaults.WIDTH_PER_D_MODEL} x d_model)")
    if tokens < 0:
        raise UserError(f"TOKENS must be >= 0, got {tokens}")
    if kind not in KIND_HOOKS:
        raise UserError(f"unknown KIND '{kind}'; choose transcoder or sae")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"DEVICE must be cpu or cuda, got {device!r}")
    location = paths.store(data_dir, lm, data, "train", ctx)
    store = HarvestStore.open(location, layers=layer_list, hooks=list(set(KIND_HOOKS[kind])))
    rows = tokens or store.n_rows
    if rows > store.n_rows:
        raise UserError(f"TOKENS={tokens} exceeds the {store.n_rows} rows of {location}; harvest more or lower TOKENS")
    cfg = TrainConfig(tokens=int(rows * epochs), batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, seed=seed,
                      wandb=wandb, checkpoint_every_s=checkpoint_every, checkpoint_every_steps=checkpoint_every_steps,
                      progress=progress, snapshot_tokens=snapshot_tokens)
    jobs = build_jobs(variants, store=store, ks=tuple(ks), layers=tuple(layer_list), n_latents=latents or defaults.WIDTH_PER_D_MODEL * store.d_model,
                      seed=seed, kind=kind, out=lambda group, name: paths.checkpoint(data_dir, lm, data, ctx, group, name))
    keys = sorted({key for j in jobs for key in j.keys()})  # a CLT reads many

    def make_loader() -> ActivationLoader:
        return ActivationLoader(store, keys, LoaderConfig(batch_size=batch_size, seed=seed, device=device))

    trained = train_jobs(jobs, make_loader, cfg, log_dir=paths.train_root(data_dir))
    skipped = len(jobs) - len(trained)
    folders: dict[Path, list[str]] = {}  # per-layer dictionaries and CLTs live in different folders
    for j in jobs:
        folders.setdefault(j.out_dir.parent, []).append(j.out_dir.name)
    print(f"trained {len(trained)} dictionar{'y' if len(trained) == 1 else 'ies'}"
          + (f", {skipped} already up to date" if skipped else "")
          + ": " + " ".join(f"{folder}/{{{','.join(names)}}}" for folder, names in folders.items()))


if __name__ == "__main__":
    typer.run(train)
