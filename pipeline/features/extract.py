"""`nnd features` for one checkpoint: the pass over its store, logit effects, density, one file.

The checkpoint is loaded the way the evaluator loads it
(``pipeline.eval.methods.load_checkpoints``: checked against the model, its
spec combines it into a ``Decomposition``), so a per-layer transcoder or SAE
and a CLT take the same path. Output, under
``paths.features_dir(...)``: ``features.safetensors`` + ``features.json``
(see ``docs/CONTRACTS.md``), ``density.png|svg|json``.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import json

from pipeline import checkpoint
from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.hashing import canonical_hash
from pipeline.data.store import HarvestStore
from pipeline.eval.methods import EvalMethod, load_checkpoints
from pipeline.features import density, examples, logit_effects

FEATURES_FILE = "features.safetensors"


@dataclass(frozen=True)
class Target:
    """One checkpoint and where its features go."""

    ckpt: Path
    out_dir: Path
    store: Path

    @property
    def features(self) -> Path:
        return self.out_dir / FEATURES_FILE


def target_for(ckpt: Path, data_dir: Path, store: Path | None = None) -> Target:
    """Where the features of ``ckpt`` go (from what the checkpoint records about its store)."""
    origin = checkpoint.read_config(ckpt).get("metadata", {}).get("store_manifest", {})
    missing = [k for k in ("lm", "data", "ctx") if origin.get(k) is None]
    if missing:
        raise UserError(f"checkpoint {ckpt} records no {', '.join(missing)} of its training store; retrain it")
    ckpt = Path(ckpt).resolve()
    out = paths.features_dir(data_dir, origin["lm"], origin["data"], int(origin["ctx"]), ckpt.parent.name, ckpt.name)
    default_store = paths.store(data_dir, origin["lm"], origin["data"], "train", int(origin["ctx"]))
    return Target(ckpt, out, Path(store) if store else default_store)


def load_method(lm, ckpt: Path) -> EvalMethod:
    methods = load_checkpoints(lm, [ckpt])
    if len(methods) != 1:
        raise UserError(f"{ckpt} holds {len(methods)} configurations; name one checkpoint")
    return methods[0]


def _identity(method: EvalMethod, store: HarvestStore) -> dict:
    return {"checkpoints": method.info.get("checkpoints"), "train": method.info.get("train"),
            "store": store.content_hash}


def is_current(target: Target, key: str) -> bool:
    sidecar = target.features.with_suffix(".json")
    if not (target.features.exists() and sidecar.exists()):
        return False
    try:
        return json.loads(sidecar.read_text()).get("identity_hash") == key
    except (OSError, json.JSONDecodeError):
        return False


@contextmanager
def _stop_flag():
    """SIGINT/SIGTERM ask the pass to save and stop after the current chunk."""
    flag = {"signal": None}
    handler = lambda signum, frame: flag.__setitem__("signal", signum)  # noqa: E731
    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield lambda: flag["signal"] is not None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def build_features(lm, target: Target, cfg: examples.FeatureConfig, save_every: float = 60.0,
                   report=print, force: bool = False) -> Path:
    """Run (or resume) the pass and write the features file; skipped when it is current."""
    method = load_method(lm, target.ckpt)
    store = HarvestStore.open(target.store)
    if store.manifest.get("lm") != lm.name:
        raise UserError(f"store {target.store} holds activations of {store.manifest.get('lm')}, not {lm.name}")
    decomposition = method.splice.decomposition
    hook = decomposition.input_hook
    layers = examples.source_layers(decomposition)
    missing = [l for l in layers if l not in store.layers or hook not in store.manifest["hooks"]]
    if missing:
        raise UserError(f"store {target.store} has no complete {hook} of layers {missing}; "
                        f"run `make harvest LAYERS=...` first")
    identity = _identity(method, store)
    key = canonical_hash({**identity, "config": asdict(cfg), "format": examples.FORMAT_VERSION})
    if is_current(target, key) and not force:
        report(f"features: {target.features} is up to date")
        return target.features
    target.out_dir.mkdir(parents=True, exist_ok=True)

    def progress(done: int, total: int, resumed: bool) -> None:
        if resumed:
            report(f"features: resuming at chunk {done}/{total}")
        elif done:
            report(f"features: chunk {done}/{total}")

    with _stop_flag() as should_stop:
        state = examples.collect(decomposition, store, cfg, target.features, identity, save_every=save_every,
                                 on_chunk=progress, should_stop=should_stop)
    window = int(store.manifest["ctx"]) - 1
    tokens = store.rows("tokens")
    tensors = examples.feature_tensors(state, cfg, tokens, window)
    numbers = {}
    for layer in layers:
        dirs = logit_effects.decoder_directions(decomposition, layer, lm.d_model)
        for name, value in logit_effects.logit_effects(lm, dirs).items():
            tensors[f"L{layer}.logit_{name}"] = value
        numbers[f"L{layer}"] = density.density_numbers(tensors[f"L{layer}.frequency"].numpy(), state.rows_seen)
    ids = [t for k, t in tensors.items() if k.endswith(("_tok", "_id"))]
    vocab = examples.token_strings(lm.tokenizer, {int(i) for t in ids for i in t.unique().tolist()})
    sidecar = {
        "format": "nnd-features", "version": examples.FORMAT_VERSION, "identity_hash": key,
        "checkpoint": str(target.ckpt), "method": method.name, "label": method.label, "family": method.family,
        "k": method.k, "lm": lm.name, "store": str(target.store), "rows_scanned": state.rows_seen,
        "window": window, "source_layers": list(layers),
        "n_latents": {f"L{l}": decomposition.n_latents(l) for l in layers},
        "config": asdict(cfg), "context_offsets": list(range(-cfg.left, cfg.right + 1)),
        "hist_log10_edges": [round(float(e), 4) for e in examples.hist_edges()],
        "keys": {f"L<layer>.{k}": v for k, v in examples.KEYS_DOC.items()},
        "density": numbers, "tokens": vocab,
    }
    examples.write_features(target.features, tensors, sidecar)
    examples.clear_state(target.features)
    series = [(f"{method.name} L{l}" if len(layers) > 1 else method.name,
               tensors[f"L{l}.frequency"].numpy(), numbers[f"L{l}"]) for l in layers]
    density.write_density(target.out_dir, series, f"firing frequency: {method.name} ({state.rows_seen} tokens)")
    report(f"features: {target.features} ({state.rows_seen} rows, "
           + ", ".join(f"L{l}: {numbers[f'L{l}']['dead']} dead, {numbers[f'L{l}']['dense_over_1pct']} >1%"
                       for l in layers) + ")")
    return target.features


def density_overlay(targets: list[Target], out_dir: Path) -> list[Path]:
    """One figure overlaying the density of several checkpoints (a K sweep), from their features files."""
    series = []
    for t in targets:
        tensors, meta = examples.read_features(t.features)
        for layer in meta["source_layers"]:
            label = meta["method"] + (f" L{layer}" if len(meta["source_layers"]) > 1 else "")
            series.append((label, tensors[f"L{layer}.frequency"].numpy(), meta["density"][f"L{layer}"]))
    return density.write_density(out_dir, series, "firing frequency across checkpoints", stem="density-overlay")
