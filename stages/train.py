"""`nnd train`: fit dictionaries (a sweep over MODEL x K x LAYERS) on a harvest store.

Output, one directory per dictionary:
``{data_dir}/train/{lm}/{data}/ctx{ctx}/{kind}/{variant}-k{k}-L{layer}/``
with ``weights.safetensors``, ``config.json``, ``curves.png`` and a ``done``
marker written last. Only missing or stale dictionaries are trained, all of
them in one pass over the data; partly trained ones resume.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from pathlib import Path

import typer

from pipeline.methods.transcoder import Dictionary, DictionaryConfig
from pipeline.core.errors import UserError
from pipeline.data.harvest import parse_layers, store_path
from pipeline.data.loader import ActivationLoader, LoaderConfig
from pipeline.methods.sparsity import SPARSITY
from pipeline.data.store import HarvestStore
from pipeline.train.loop import MEMBER_BUILDERS, Member, TrainConfig, _keys, train_members
from stages.common import stage

KIND_HOOKS = {"transcoder": ("mlp_in", "mlp_out"), "sae": ("mlp_out", "mlp_out")}

# Modules that register extra MODEL families in MEMBER_BUILDERS when imported.
FAMILY_MODULES = ("pipeline.methods.clt",)
for _name in FAMILY_MODULES:
    if importlib.util.find_spec(_name) is not None:
        importlib.import_module(_name)


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{what}='{text}' must be an integer or a comma list of integers, e.g. 8,16,32") from None
    if not values:
        raise UserError(f"{what} is empty")
    return values


def checkpoint_dir(data_dir: Path, lm: str, data: str, ctx: int, kind: str, variant: str, k: int, layer: int) -> Path:
    from pipeline.data import corpora

    return (Path(data_dir) / "train" / lm.replace("/", "__") / corpora.store_name(data) / f"ctx{ctx}" / kind
            / f"{variant}-k{k}-L{layer}")


def build_members(store: HarvestStore, variants: list[str], ks: list[int], kind: str, layers: list[int],
                  latents: int, seed: int, out: callable) -> list[Member]:
    """Validate everything (names, K range, hooks, d) and build the members, before any write."""
    unknown = [v for v in variants if v not in SPARSITY and v not in MEMBER_BUILDERS]
    if unknown:
        raise UserError(f"unknown MODEL {unknown}; choose from {', '.join([*SPARSITY, *MEMBER_BUILDERS])}")
    if kind not in KIND_HOOKS:
        raise UserError(f"unknown KIND '{kind}'; choose transcoder or sae")
    input_hook, target_hook = KIND_HOOKS[kind]
    n_latents = latents or 8 * store.d_model
    members = []
    for family in dict.fromkeys(v for v in variants if v in MEMBER_BUILDERS):
        members += MEMBER_BUILDERS[family](store=store, variants=variants, ks=ks, layers=layers, latents=n_latents,
                                           seed=seed, kind=kind, out=out)
    for layer in layers:
        for variant in (v for v in variants if v in SPARSITY):
            for k in ks:
                cfg = DictionaryConfig(variant=variant, k=k, d_in=store.d_model, d_out=store.d_model, n_latents=n_latents,
                                       kind=kind, layer=layer, input_hook=input_hook, target_hook=target_hook,
                                       seed=_member_seed(seed, variant, k, layer))
                members.append(Member(Dictionary(cfg), (layer, input_hook), (layer, target_hook),
                                      out(variant, k, layer), metadata={"lm": store.manifest["lm"]}))
    return members


def _member_seed(seed: int, variant: str, k: int, layer: int) -> int:
    """Init seed of one dictionary: independent of which others train alongside it."""
    import zlib

    return zlib.crc32(f"{seed}/{variant}/{k}/{layer}".encode())


@stage
def train(
    model: str = typer.Option("topk", help=f"variant(s), comma list: {', '.join(SPARSITY)}"),
    k: str = typer.Option("32", help="k (topk/batchtopk) or target L0 (vanilla/jumprelu); comma list = sweep"),
    kind: str = typer.Option("transcoder", help="transcoder (mlp_in -> mlp_out) or sae (mlp_out -> mlp_out)"),
    layers: str = typer.Option("0-3", help="layers, e.g. 0-3 or 0,2"),
    latents: int = typer.Option(0, help="dictionary width; 0 = 8 x d_model"),
    tokens: int = typer.Option(0, help="store rows used per epoch; 0 = the whole store"),
    epochs: float = typer.Option(4.0, help="passes over those rows (more than 1 reuses data, with a warning)"),
    lr: float = typer.Option(None, help="learning rate; default 1e-3 / sqrt(latents / 2^14)"),
    lm: str = typer.Option("smollm2-135m", help="model the store was harvested from"),
    data: str = typer.Option("bbc", help="corpus of the store"),
    ctx: int = typer.Option(128, help="context length of the store"),
    wandb: str = typer.Option(os.environ.get("WANDB_MODE", "offline"), help="offline | online | disabled"),
    seed: int = typer.Option(0, help="seed for init and data order"),
    data_dir: Path = typer.Option(Path("data"), help="root of all stage outputs"),
    batch_size: int = typer.Option(4096, help="rows per optimiser step"),
    lr_schedule: str = typer.Option("cosine", help="cosine or constant (after warm-up)"),
    checkpoint_every: float = typer.Option(300.0, help="seconds between resumable partial checkpoints"),
    checkpoint_every_steps: int = typer.Option(0, help="also save every this many steps (0: off)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    device: str = typer.Option("cpu", help="cpu or cuda (pinned-memory, non-blocking batches)"),
):
    """Train dictionaries on data/harvest/<lm>/<data>/train-ctx<ctx>.zarr."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    variants = [v for v in model.replace(" ", "").split(",") if v]
    ks = parse_ints(k, "K")
    layer_list = parse_layers(layers)
    if not epochs > 0:
        raise UserError(f"EPOCHS must be positive, got {epochs}")
    if tokens < 0:
        raise UserError(f"TOKENS must be >= 0, got {tokens}")
    if kind not in KIND_HOOKS:
        raise UserError(f"unknown KIND '{kind}'; choose transcoder or sae")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"DEVICE must be cpu or cuda, got {device!r}")
    location = store_path(data_dir, lm, data, "train", ctx)
    store = HarvestStore.open(location, layers=layer_list, hooks=list(set(KIND_HOOKS[kind])))
    rows = tokens or store.n_rows
    if rows > store.n_rows:
        raise UserError(f"TOKENS={tokens} exceeds the {store.n_rows} rows of {location}; harvest more or lower TOKENS")
    cfg = TrainConfig(tokens=int(rows * epochs), batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, seed=seed,
                      wandb=wandb, checkpoint_every_s=checkpoint_every, checkpoint_every_steps=checkpoint_every_steps,
                      progress=progress)
    members = build_members(store, variants, ks, kind, layer_list, latents, seed,
                            lambda v, kk, layer: checkpoint_dir(data_dir, lm, data, ctx, kind, v, kk, layer))
    keys = sorted({key for m in members for key in _keys(m.input_key) + _keys(m.target_key)})  # a CLT reads many

    def make_loader() -> ActivationLoader:
        return ActivationLoader(store, keys, LoaderConfig(batch_size=batch_size, seed=seed, device=device))

    trained = train_members(members, make_loader, cfg, log_dir=Path(data_dir) / "train")
    skipped = len(members) - len(trained)
    folders: dict[Path, list[str]] = {}  # per-layer dictionaries and CLTs live in different folders
    for m in members:
        folders.setdefault(m.out_dir.parent, []).append(m.out_dir.name)
    print(f"trained {len(trained)} dictionar{'y' if len(trained) == 1 else 'ies'}"
          + (f", {skipped} already up to date" if skipped else "")
          + ": " + " ".join(f"{folder}/{{{','.join(names)}}}" for folder, names in folders.items()))


if __name__ == "__main__":
    typer.run(train)
