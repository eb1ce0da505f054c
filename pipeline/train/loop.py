"""One training loop (``fit``) for every dictionary, a K sweep included.

Every batch the loader reads feeds every member of the run (all K, all
variants, all layers), each with its own Adam; so a sweep costs one pass over
the data. Per step and member: loss -> backward -> drop the decoder-parallel
gradient -> clip the gradient norm -> Adam -> renormalise the decoder ->
variant update (threshold estimate / L0 controller) -> dead-latent bookkeeping.

Defaults and their sources:
- lr = 1e-3 / sqrt(n_latents / 2**14) (1.9e-3 at 4608 latents): 5x the
  scaling fit of Gao et al. 2024 (used by sparsify), because our runs are
  short (see ``default_lr``); warm-up over 5% of the steps (at most 1000),
  then cosine decay to 0 (or constant);
- Adam(0.9, 0.999), gradient-norm clipping at 1.0;
- a latent is *dead* when it has not fired in the last N tokens, N =
  min(10M, tokens / 10): Gao et al. use 10M; our short runs need a window
  that fits ten times into the run so AuxK can act;
- batch 4096 rows.

Resume: every ``checkpoint_every_s`` seconds (and/or steps) each member's full
state (weights, buffers, optimiser, step, loader position, RNG, history) is
saved atomically under ``<member dir>/partial/``, keeping the two latest. A
restarted run resumes each group of members from the newest step they all
saved; everything that happens after is a pure function of that state, so on
CPU the final weights are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pipeline import checkpoint
from pipeline.core.errors import UserError
from pipeline.data.loader import ActivationLoader, Key
from pipeline.data.store import canonical_hash

PARTIAL = "partial"
CURVES = "curves.png"
WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class TrainConfig:
    tokens: int
    batch_size: int = 4096
    lr: float | None = None  # None: the Gao et al. scaling default, per member
    lr_schedule: str = "cosine"
    warmup_frac: float = 0.05
    max_warmup_steps: int = 1000
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    dead_window: int = 0  # 0: min(10M, tokens // 10)
    seed: int = 0
    # Not part of the result (excluded from the staleness hash):
    checkpoint_every_s: float = 300.0
    checkpoint_every_steps: int = 0  # 0: time-based only
    log_every: int = 10
    wandb: str = "offline"
    progress: bool = True

    def __post_init__(self):
        if self.tokens < self.batch_size:
            raise UserError(f"TOKENS={self.tokens} is below one batch ({self.batch_size}); raise TOKENS")
        if self.batch_size <= 0:
            raise UserError(f"batch size must be positive, got {self.batch_size}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"LR must be a positive number (or unset for the default), got {self.lr}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise UserError(f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        if not 0 <= self.warmup_frac < 1:
            raise UserError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.grad_clip <= 0:
            raise UserError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.wandb not in WANDB_MODES:
            raise UserError(f"WANDB must be one of {', '.join(WANDB_MODES)}, got {self.wandb!r}")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def warmup_steps(self) -> int:
        return min(self.max_warmup_steps, int(self.warmup_frac * self.steps))

    @property
    def dead_tokens(self) -> int:
        return self.dead_window or min(10_000_000, max(self.batch_size, self.tokens // 10))

    def result_fields(self) -> dict:
        skip = {"checkpoint_every_s", "checkpoint_every_steps", "log_every", "wandb", "progress"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def default_lr(n_latents: int) -> float:
    """Gao et al.'s scaling fit x 5: their fit is for runs of billions of tokens;
    ours are ~10^6 tokens (a few hundred steps), where a larger step wins: on
    SmolLM2 layers 2/3, 600k tokens, TopK k=32, FVU 0.49 at 2e-3 vs 0.70 at 3.8e-4."""
    return 1e-3 / math.sqrt(n_latents / 2**14)


def lr_at(step: int, cfg: TrainConfig, base: float) -> float:
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return base
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Member:
    """One dictionary of a run: the module, what it reads, where it goes."""

    module: torch.nn.Module
    input_key: Key
    target_key: Key
    out_dir: Path
    name: str = ""
    metadata: dict = field(default_factory=dict)  # recorded in config.json

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.name = self.name or self.out_dir.name


# Families other than the per-layer Dictionary (the CLT) register here how the
# train stage builds their members from its options:
# builder(store, variants, ks, layers, latents, seed, out_dir(name) -> Path) -> list[Member].
MEMBER_BUILDERS: dict[str, Callable[..., list[Member]]] = {}


def select(batch: dict, key):
    """A (layer, hook) key gives its tensor; a tuple of keys (a CLT) gives {layer: tensor}."""
    if isinstance(key[0], tuple):
        return {k[0]: batch[k] for k in key}
    return batch[key]


def _keys(key) -> list:
    return list(key) if isinstance(key[0], tuple) else [key]


def train_hash(member: Member, cfg: TrainConfig, store_manifest_hash: str) -> str:
    return canonical_hash({"module": member.module.config_dict()["config"], "train": cfg.result_fields(),
                           "store": store_manifest_hash, "input": list(member.input_key), "target": list(member.target_key)})


def is_current(member: Member, cfg: TrainConfig, store_manifest_hash: str) -> bool:
    """A finished checkpoint exists for exactly this training request."""
    if not checkpoint.is_done(member.out_dir):
        return False
    return checkpoint.read_config(member.out_dir)["metadata"].get("train_hash") == train_hash(member, cfg, store_manifest_hash)


# ----- partial states -------------------------------------------------------

_STATE = re.compile(r"state-([0-9a-f]{12})-(\d{9})\.pt$")


def _partial_steps(member: Member, key: str) -> dict[int, Path]:
    folder = member.out_dir / PARTIAL
    found = {}
    for p in folder.glob("state-*.pt") if folder.exists() else []:
        m = _STATE.match(p.name)
        if m and m.group(1) == key[:12]:
            found[int(m.group(2))] = p
    return found


def plan_groups(members: list[Member], hashes: dict[str, str]) -> list[tuple[int, list[Member]]]:
    """Group members by the step they resume from (0: fresh), newest common step first."""
    steps = {m.name: set(_partial_steps(m, hashes[m.name])) for m in members}
    with_state = [m for m in members if steps[m.name]]
    common = set.intersection(*(steps[m.name] for m in with_state)) if with_state else set()
    groups: dict[int, list[Member]] = {}
    for m in members:
        start = max(common) if common and m in with_state else max(steps[m.name], default=0)
        groups.setdefault(start, []).append(m)
    return sorted(groups.items(), key=lambda kv: -kv[0])


# ----- the loop -------------------------------------------------------------

class _Logger:
    def __init__(self, cfg: TrainConfig, members: list[Member], run_dir: Path, run_config: dict):
        self.run = None
        if cfg.wandb == "disabled":
            return
        mode = cfg.wandb
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            warnings.warn("WANDB=online but no wandb API key is configured; logging offline instead", stacklevel=2)
            mode = "offline"
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nn-decompositions"), mode=mode, dir=str(run_dir),
                              name="+".join(m.name for m in members)[:120], config=run_config,
                              settings=wandb.Settings(silent=True))

    def log(self, values: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text()


def fit(members: list[Member], make_loader: Callable[[], ActivationLoader], cfg: TrainConfig,
        start_step: int = 0, log_dir: Path | None = None) -> None:
    """Train ``members`` together from ``start_step`` (their saved partial state) to the end."""
    loader = make_loader()
    store = loader.store
    hashes = {m.name: train_hash(m, cfg, store.content_hash) for m in members}
    _check_shapes(members, loader)
    for m in members:
        m.module.to(loader.cfg.device)
    optims = {m.name: torch.optim.Adam(param_groups(m.module), lr=1.0, betas=cfg.betas, eps=cfg.eps,
                                       fused=next(m.module.parameters()).device.type == "cpu" or None)
              for m in members}
    base_lr = {m.name: cfg.lr or default_lr(m.module.cfg.n_latents) for m in members}
    history: dict[str, list[dict]] = {m.name: [] for m in members}
    resumed_from: list[int] = []
    if start_step:
        for m in members:
            state = torch.load(_partial_steps(m, hashes[m.name])[start_step], weights_only=False)
            m.module.load_state_dict(state["module"])
            optims[m.name].load_state_dict(state["optim"])
            history[m.name] = state["history"]
        resumed_from = state.get("resumed_from_steps", [])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
    else:
        torch.manual_seed(cfg.seed)
        for m in members:
            m.module.init_from_stats(*(select({k: loader.sources[k].stats(*k) for k in _keys(key)}, key)
                                       for key in (m.input_key, m.target_key)))
        loader.warn_if_reused(cfg.steps * cfg.batch_size)
    for m in members:
        m.module.train()

    logger = _Logger(cfg, members, log_dir or members[0].out_dir.parent, {"train": asdict(cfg),
                     "members": {m.name: m.module.config_dict() for m in members}, "store": store.manifest_hash})
    bar = _progress(cfg, start_step)
    step, t0, tokens_done = start_step, time.perf_counter(), 0
    last_save = time.perf_counter()
    for batch in loader:
        if step >= cfg.steps:
            break
        log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        if step == 0:
            for m in members:
                m.module.init_from_batch(select(batch, m.input_key), select(batch, m.target_key))
        row = {}
        for m in members:
            metrics = _train_step(m, optims[m.name], batch, lr_at(step, cfg, base_lr[m.name]), cfg, log_now)
            if log_now:
                values = {k: float(v) for k, v in metrics.items()}
                values |= {"step": step + 1, "tokens": (step + 1) * cfg.batch_size, "lr": lr_at(step, cfg, base_lr[m.name]),
                           "dead": float((m.module.tokens_since_fired >= cfg.dead_tokens).float().mean())}
                values |= m.module.sparsity.extra_config()
                history[m.name].append(values)
                row |= {f"{m.name}/{k}": v for k, v in values.items() if k not in ("step", "tokens")}
        step += 1
        tokens_done += cfg.batch_size
        if log_now:
            logger.log(row, step)
            if bar is not None:
                first = history[members[0].name][-1]
                bar.set_postfix_str(f"tok/s {tokens_done / (time.perf_counter() - t0):,.0f} loss {first['loss']:.4g} "
                                    f"fvu {first['fvu']:.3f} l0 {first['l0']:.1f} dead {100 * first['dead']:.1f}%"
                                    + (f" ({members[0].name}; {len(members)} dicts)" if len(members) > 1 else ""))
        if bar is not None:
            bar.update(1)
        due_steps = cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
        due_time = time.perf_counter() - last_save >= cfg.checkpoint_every_s
        if step < cfg.steps and (due_steps or due_time):
            _save_partials(members, optims, loader, history, hashes, step,
                           resumed_from + ([start_step] if start_step else []))
            last_save = time.perf_counter()
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    for m in members:
        m.module.eval()
        meta = {**m.metadata, "train_hash": hashes[m.name], "train": cfg.result_fields(), "steps": step,
                "tokens": step * cfg.batch_size, "store_manifest_hash": store.manifest_hash,
                "store_manifest": {k: store.manifest.get(k) for k in ("lm", "lm_weights_sha256", "data", "split", "ctx", "n_rows")},
                "input_key": list(m.input_key), "target_key": list(m.target_key),
                "dead_window_tokens": cfg.dead_tokens, "final": history[m.name][-1] if history[m.name] else {},
                "tokens_per_s_run": tokens_done / elapsed if elapsed > 0 else None,
                "resumed_from_steps": resumed_from + ([start_step] if start_step else [])}
        curves = history[m.name]
        checkpoint.save(m.module, m.out_dir, meta, {CURVES: lambda path, h=curves, n=m.name: plot_curves(h, n, path)})
    logger.close()


def param_groups(module: torch.nn.Module) -> list[dict]:
    """Adam groups by ``lr_scale`` (an attribute a parameter may carry; default 1)."""
    groups: dict[float, list] = {}
    for p in module.parameters():
        groups.setdefault(float(getattr(p, "lr_scale", 1.0)), []).append(p)
    return [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()]


def _check_shapes(members: list[Member], loader: ActivationLoader) -> None:
    for m in members:
        c = m.module.cfg
        for what, key, d in [("input", k, c.d_in) for k in _keys(m.input_key)] + \
                            [("target", k, c.d_out) for k in _keys(m.target_key)]:
            if key not in loader.sources:
                raise UserError(f"{m.name}: the loader does not serve {what} {key}")
            have = loader.sources[key].d_model
            if have != d:
                raise UserError(f"{m.name}: {what} {key} has d={have} in the store but the dictionary expects d={d}; "
                                f"build the dictionary for this store (d_in/d_out = {have})")


def _train_step(m: Member, opt: torch.optim.Optimizer, batch: dict, lr: float, cfg: TrainConfig,
                with_metrics: bool = True) -> dict:
    module = m.module
    x, y = select(batch, m.input_key), select(batch, m.target_key)
    dead = module.tokens_since_fired >= cfg.dead_tokens
    loss, metrics, codes = module.training_loss(x, y, dead, with_metrics)
    if not torch.isfinite(loss):
        raise UserError(f"{m.name}: the loss became {float(loss)}; lower LR (now {lr:.3g}) or check the store")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    module.project_decoder_grad()
    torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    opt.step()
    module.normalize_decoder()
    module.sparsity.update(codes)
    module.record_firing(codes, cfg.batch_size)
    return metrics


def _save_partials(members, optims, loader, history, hashes, step, resumed_from) -> None:
    for m in members:
        folder = m.out_dir / PARTIAL
        folder.mkdir(parents=True, exist_ok=True)
        state = {"step": step, "module": m.module.state_dict(), "optim": optims[m.name].state_dict(),
                 "loader": loader.state_dict(), "rng": torch.get_rng_state(), "history": history[m.name],
                 "resumed_from_steps": resumed_from}
        checkpoint.torch_save_atomic(state, folder / f"state-{hashes[m.name][:12]}-{step:09d}.pt")
    for m in members:  # keep the two newest: a kill mid-way through the loop above leaves a common step
        for old_step, path in sorted(_partial_steps(m, hashes[m.name]).items())[:-2]:
            path.unlink()


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def plot_curves(history: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("fvu", "FVU (all rows)"), ("fvu_normal", "FVU (non-massive rows)"),
              ("l0", "L0"), ("dead", "dead fraction"), ("aux", "AuxK loss"), ("lr", "learning rate")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    tokens = [h["tokens"] for h in history]
    for ax, (key, label) in zip(axes.flat, panels):
        ax.plot(tokens, [h.get(key, float("nan")) for h in history])
        ax.set_title(label)
        ax.set_xlabel("tokens")
        if key in ("loss", "fvu", "fvu_normal") and all(h.get(key, 0) > 0 for h in history):
            ax.set_yscale("log")
    axes.flat[-1].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def train_members(members: list[Member], make_loader: Callable[[], ActivationLoader], cfg: TrainConfig,
                  log_dir: Path | None = None) -> list[Member]:
    """Train the members that are missing or stale, resuming partial ones; returns those trained."""
    manifest_hash = make_loader().store.content_hash
    todo = [m for m in members if not is_current(m, cfg, manifest_hash)]
    hashes = {m.name: train_hash(m, cfg, manifest_hash) for m in todo}
    for start, group in plan_groups(todo, hashes):
        fit(group, make_loader, cfg, start_step=start, log_dir=log_dir)
    return todo
