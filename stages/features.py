"""`nnd features`, `nnd dashboard`, `nnd intervene`: look inside a trained dictionary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.core import defaults
from pipeline.core.errors import UserError
from stages.common import parse_ints, stage

CKPT_HELP = "checkpoint directory, folder of checkpoints, or quoted glob (repeatable)"


def _targets(ckpt: List[Path], data_dir: Path, store: Optional[Path]):
    from pipeline.eval.methods import checkpoint_dirs
    from pipeline.features.extract import target_for

    return [target_for(d, data_dir, store) for d in checkpoint_dirs(ckpt)]


def _lm(ckpt_dir: Path, lm: Optional[str], data_dir: Path):
    from pipeline.data.models import load_lm
    from pipeline.eval.methods import checkpoint_origin

    return load_lm(lm or checkpoint_origin([ckpt_dir]).get("lm", defaults.LM), data_dir)


def _config(rows: int, top: int, samples: int, seed: int):
    from pipeline.features.examples import FeatureConfig

    return FeatureConfig(top_n=top, samples=samples, rows=rows, seed=seed)


def _build_all(ckpt, data_dir, store, lm, cfg, save_every, force):
    from pipeline.features.extract import build_features, density_overlay

    targets = _targets(ckpt, data_dir, store)
    model = _lm(targets[0].ckpt, lm, data_dir)
    for t in targets:
        build_features(model, t, cfg, save_every=save_every, force=force)
    if len(targets) > 1:
        common = Path(os.path.commonpath([str(t.out_dir) for t in targets]))
        for path in density_overlay(targets, common):
            print(f"features: {path}")
    return targets


@stage
def features(
    ckpt: List[Path] = typer.Option(..., help=CKPT_HELP),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    store: Optional[Path] = typer.Option(None, help="store to scan (default: the checkpoint's training store)"),
    lm: Optional[str] = typer.Option(None, help="model (default: the one the checkpoint was trained on)"),
    rows: int = typer.Option(defaults.FEATURE_TOKENS, help="store rows to scan, rounded up to whole windows (0 = all)"),
    top: int = typer.Option(16, help="top activating contexts kept per latent"),
    samples: int = typer.Option(16, help="random contexts per latent (read as activation quantiles)"),
    seed: int = typer.Option(defaults.SEED, help="seed of the random samples"),
    save_every: float = typer.Option(60.0, help="seconds between saves of the resumable state"),
    force: bool = typer.Option(False, help="recompute even when the features file is current"),
):
    """Per-latent frequency, activations, histograms, top and quantile contexts, logit effects.

    One features.safetensors + features.json per checkpoint (and density.png/svg/json); several
    checkpoints (a K sweep) also get one density-overlay figure. A killed run resumes.
    """
    _build_all(ckpt, data_dir, store, lm, _config(rows, top, samples, seed), save_every, force)


@stage
def dashboard(
    ckpt: List[Path] = typer.Option(..., help=CKPT_HELP),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    store: Optional[Path] = typer.Option(None, help="store to scan (default: the checkpoint's training store)"),
    lm: Optional[str] = typer.Option(None, help="model (default: the one the checkpoint was trained on)"),
    rows: int = typer.Option(defaults.FEATURE_TOKENS, help="store rows to scan (0 = all)"),
    seed: int = typer.Option(defaults.SEED, help="seed of the random samples"),
    save_every: float = typer.Option(60.0, help="seconds between saves of the resumable state"),
):
    """A static feature dashboard per checkpoint (computes its features first when needed)."""
    from pipeline.features.dashboard import build_dashboard

    for t in _build_all(ckpt, data_dir, store, lm, _config(rows, 16, 16, seed), save_every, False):
        print(f"dashboard: {build_dashboard(t.features, t.out_dir / 'dashboard')}")


@stage
def intervene(
    ckpt: Path = typer.Option(..., help="one checkpoint directory (or folder of one configuration's per-layer ones)"),
    prompt: Optional[str] = typer.Option(None, envvar="NND_PROMPT", help="text to continue (or env NND_PROMPT)"),
    feature: str = typer.Option(..., help="latent index or comma list, e.g. 123 or 5,17"),
    layer: Optional[int] = typer.Option(None, help="source layer of the latents (needed when there are several)"),
    op: str = typer.Option(defaults.OP, help="ablate | scale | set"),
    value: Optional[float] = typer.Option(None, help="factor (scale) or value (set)"),
    positions: Optional[str] = typer.Option(None, help="token positions to edit, 0 = BOS (default: all)"),
    new_tokens: int = typer.Option(defaults.NEW_TOKENS, help="tokens to generate"),
    temperature: float = typer.Option(defaults.TEMPERATURE,
                                      help="temperature of the seeded sample (greedy is always shown)"),
    seed: int = typer.Option(defaults.SEED, help="seed of the sample (the same for clean and edited)"),
    lm: Optional[str] = typer.Option(None, help="model (default: the one the checkpoint was trained on)"),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    out: Optional[Path] = typer.Option(None, help="also write everything as JSON here"),
):
    """Edit latents in the live model (error added back): clean vs edited continuations, log-prob changes."""
    from pipeline.features import interventions as iv
    from pipeline.features.extract import load_method

    if prompt is None:
        raise UserError("no PROMPT; give the text to continue, e.g. PROMPT='The government said'")
    if new_tokens < 1:
        raise UserError(f"NEW_TOKENS={new_tokens} must be at least 1")
    latents = tuple(parse_ints(feature, "FEATURE"))
    where = tuple(parse_ints(positions, "POSITIONS")) if positions else None
    model = _lm(ckpt, lm, data_dir)
    decomposition = load_method(model, ckpt).splice.decomposition
    edit = iv.LatentEdit(layer if layer is not None else iv.default_layer(decomposition), latents, op, value, where)
    edit.check(decomposition)
    ids = iv.prompt_ids(model, prompt)
    runs = {}
    for mode, temp in (("greedy", 0.0), (f"sampled (T={temperature:g}, seed {seed})", temperature)):
        if temp <= 0 and mode != "greedy":
            continue
        clean = iv.generate(model, None, [], ids, new_tokens, temp, seed)
        edited = iv.generate(model, decomposition, [edit], ids, new_tokens, temp, seed)
        runs[mode] = {"clean": clean.text, "edited": edited.text}
        print(f"\n{mode}: {prompt!r} + ...")
        print(iv.side_by_side(clean.text, edited.text, ("clean", _describe(edit))))
    change = iv.logprob_change(model, decomposition, [edit], ids)
    print(f"\nnext token after the prompt: KL(clean || edited) = {change['kl_clean_edited']:.4g} nats")
    for name in ("gained", "lost"):
        print(f"  {name}: " + ", ".join(f"{r['token']!r} {r['change']:+.3f}" for r in change[name][:6]))
    if out is not None:
        from pipeline.core.io import write_json_atomic

        write_json_atomic(out, {"prompt": prompt, "edit": edit.__dict__, "generations": runs, "next_token": change})
        print(f"intervene: {out}")


def _describe(e) -> str:
    what = {"ablate": "ablated", "scale": f"x{e.value:g}", "set": f"set to {e.value:g}"}[e.op]
    where = "" if e.positions is None else f" at {','.join(map(str, e.positions))}"
    return f"L{e.layer} latent {','.join(map(str, e.latents))} {what}{where}"
