"""`nnd train`: fit dictionaries (a sweep over MODEL x K x LAYERS) on a harvest store.

Output, one directory per dictionary:
``{data_dir}/train/{lm}/{data}/ctx{ctx}/{kind}/{variant}-k{k}-L{layer}/``
with ``weights.safetensors``, ``config.json``, ``curves.png`` and a ``done``
marker written last. Only missing or stale dictionaries are trained, all of
them in one pass over the data; partly trained ones resume.

``--nproc N`` (and ``--nnodes/--node-rank/--master-addr`` for several machines)
checks everything here, then runs this same command in N processes per node
under torchrun (``pipeline.train.distributed``): DDP over slices of each batch
(``--spread ddp``), or the sweep's dictionaries dealt to the processes
(``--spread sweep``).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import typer

from pipeline.core import defaults
from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.layers import parse_layers
from pipeline.data.loader import ActivationLoader, LoaderConfig, StreamsLoader
from pipeline.data.models import mlp_weights
from pipeline.data.store import HarvestStore
from pipeline.methods import REGISTRY
from pipeline.methods.transcoder import KIND_HOOKS
from pipeline.train import distributed
from pipeline.train.config import TrainConfig
from pipeline.train.jobs import build_jobs, train_jobs
from stages.common import parse_ints, parse_numbers, stage


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
    nproc: int = typer.Option(defaults.NPROC, help="processes per node (torchrun); >1 trains with DDP or spreads the sweep"),
    nnodes: int = typer.Option(defaults.NNODES, help="nodes of a multi-node run (each runs this command)"),
    node_rank: int = typer.Option(0, help="this node's rank in a multi-node run"),
    master_addr: str = typer.Option(defaults.MASTER_ADDR, help="address of node 0 in a multi-node run"),
    master_port: int = typer.Option(defaults.MASTER_PORT, help="port on node 0 in a multi-node run"),
    spread: str = typer.Option(defaults.SPREAD, help="ddp (each batch split over processes) or sweep (dictionaries dealt out)"),
    data_streams: int = typer.Option(0, help="one process reading the batches of an N-process DDP run (0: off)"),
    init: str = typer.Option(defaults.INIT, help="decoder initialisation: random | rkcnn (SAEs and transcoders)"),
    prefixes: str = typer.Option(defaults.PREFIXES, help="Matryoshka prefix sizes, fractions of LATENTS (comma list)"),
    snapshot_tokens: int = typer.Option(0, help="save weight snapshots every this many tokens for `nnd emergence` (0: off)"),
):
    """Train dictionaries on data/harvest/<lm>/<data>/train-ctx<ctx>.zarr."""
    params = dict(locals())  # every option, for the worker processes of a distributed run
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
    launch = distributed.Launch(nproc, nnodes, node_rank, master_addr, master_port)
    world = int(os.environ["WORLD_SIZE"]) if distributed.in_worker() else launch.world_size
    if spread not in distributed.SPREADS:
        raise UserError(f"SPREAD must be one of {', '.join(distributed.SPREADS)}, got {spread!r}")
    if spread == "ddp" and batch_size % world:
        raise UserError(f"BATCH_SIZE={batch_size} must be a multiple of the {world} processes (each takes an equal slice)")
    if data_streams < 0 or (data_streams > 1 and (world > 1 or batch_size % data_streams)):
        raise UserError(f"DATA_STREAMS={data_streams} needs one process and a BATCH_SIZE that is a multiple of it")
    location = paths.store(data_dir, lm, data, "train", ctx)
    store = HarvestStore.open(location, layers=layer_list, hooks=list(set(KIND_HOOKS[kind])))
    rows = tokens or store.n_rows
    if rows > store.n_rows:
        raise UserError(f"TOKENS={tokens} exceeds the {store.n_rows} rows of {location}; harvest more or lower TOKENS")
    cfg = TrainConfig(tokens=int(rows * epochs), batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, seed=seed,
                      wandb=wandb, checkpoint_every_s=checkpoint_every, checkpoint_every_steps=checkpoint_every_steps,
                      progress=progress, snapshot_tokens=snapshot_tokens)
    jobs = build_jobs(variants, store=store, ks=tuple(ks), layers=tuple(layer_list), n_latents=latents or defaults.WIDTH_PER_D_MODEL * store.d_model,
                      seed=seed, kind=kind, out=lambda group, name: paths.checkpoint(data_dir, lm, data, ctx, group, name),
                      init=init, prefixes=tuple(parse_numbers(prefixes, "PREFIXES", float, "0.125,0.25,0.5,1")),
                      mlp_weights=lambda layer: mlp_weights(lm, data_dir, layer, store.manifest))
    keys = sorted({key for j in jobs for key in j.keys()})  # a CLT reads many
    if world > 1 and not distributed.in_worker():  # everything is checked: now the same command in every process
        if store.n_chunks < world:
            raise UserError(f"the store has {store.n_chunks} chunks, fewer than {world} processes; harvest more TOKENS")
        code = distributed.launch(launch, ["stages.cli", "train", *_worker_args(params)])
        if code:
            raise UserError(f"the {world}-process run failed (exit {code}); the same command resumes from its "
                            f"last partial state")
        return
    if distributed.in_worker() and os.environ.get("RANK", "0") != "0":
        warnings.simplefilter("ignore")  # rank 0 says it once
    group = distributed.ProcessGroup.start(device) if world > 1 and spread == "ddp" else None
    rank, size = (int(os.environ.get("RANK", 0)), world) if world > 1 else (0, 1)
    if spread == "sweep":
        jobs = jobs[rank::size]
    loader_cfg = LoaderConfig(batch_size=batch_size, seed=seed, device=group.device if group else device)

    def make_loader() -> ActivationLoader:
        if group is not None:
            return ActivationLoader(store, keys, replace(loader_cfg, batch_size=batch_size // world, rank=group.rank,
                                                         world_size=world))
        if data_streams > 1:
            return StreamsLoader(store, keys, loader_cfg, data_streams)
        return ActivationLoader(store, keys, loader_cfg)

    try:
        trained = train_jobs(jobs, make_loader, cfg, log_dir=paths.train_root(data_dir))
    except RuntimeError as e:
        if group is None:
            raise
        # a peer process died or hung up: its collective fails here; the launcher reports the run in one line
        if group.is_main:
            print(f"error: rank 0 lost its process group ({str(e).strip().splitlines()[0][:160]})", file=sys.stderr)
        raise typer.Exit(1) from None
    finally:
        if group is not None:
            group.close()
    if group is not None and not group.is_main:
        return
    skipped = len(jobs) - len(trained)
    folders: dict[Path, list[str]] = {}  # per-layer dictionaries and CLTs live in different folders
    for j in jobs:
        folders.setdefault(j.out_dir.parent, []).append(j.out_dir.name)
    print(f"trained {len(trained)} dictionar{'y' if len(trained) == 1 else 'ies'}"
          + (f", {skipped} already up to date" if skipped else "")
          + ": " + " ".join(f"{folder}/{{{','.join(names)}}}" for folder, names in folders.items()))


LAUNCH_OPTIONS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port")


def _worker_args(params: dict) -> list[str]:
    """This command's options (as given or defaulted), for the worker processes."""
    args = []
    for name, value in params.items():
        if name in LAUNCH_OPTIONS:  # torchrun's own options (the workers read the world from its environment)
            continue
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(option if value else "--no-" + name.replace("_", "-"))
        elif value is not None:
            args += [option, str(value)]
    return args


if __name__ == "__main__":
    typer.run(train)
