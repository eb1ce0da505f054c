"""One training loop (``fit``) for every method, a K sweep included.

Every batch the loader reads feeds every job of the run (all K, all variants,
all layers), each with its own Adam; so a sweep costs one pass over the data.
Per step and job: ``training_step`` -> backward -> ``after_backward`` (drop
the decoder-parallel gradient) -> clip the gradient norm -> Adam ->
``after_step`` (renormalise, threshold / controller updates, firing counts).

``fit`` depends only on the ``Trainable`` contract (``pipeline.methods.base``)
and receives where results go as arguments: ``save(job, metadata, history)``
writes a finished job, and an optional ``evaluate(job) -> dict`` adds
held-out figures to its metadata. Partial states (``pipeline.train.resume``)
are saved every ``checkpoint_every_s`` seconds and on SIGINT/SIGTERM; a
restarted run resumes from the newest common step, and everything after is a
pure function of that state, so on CPU the final weights are bit-identical to
an uninterrupted run.
"""

from __future__ import annotations

import signal
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Callable, Iterator

import torch

from pipeline.core.errors import Interrupted, UserError
from pipeline.core.io import write_error
from pipeline.core.progress import progress_bar
from pipeline.data.loader import ActivationLoader
import pipeline.methods.collective as collective
from pipeline.methods.base import StepOutput, TrainJob, as_keys, select
from pipeline.train import distributed, resume
from pipeline.train.config import TrainConfig, default_lr, lr_at
from pipeline.train.log import RunLogger
from pipeline.train.snapshots import snapshot_due, save_snapshots

SaveFn = Callable[[TrainJob, dict, list[dict]], None]


class _Run:
    """The mutable state of one ``fit``: optimisers, histories, step, timers."""

    def __init__(self, jobs: list[TrainJob], cfg: TrainConfig, hashes: dict[str, str], device: str):
        self.jobs, self.cfg, self.hashes = jobs, cfg, hashes
        self.device = device
        self.is_main = collective.rank() == 0
        for j in jobs:
            j.module.to(device)
        # one process: training_step itself; several: the same call through DDP
        self.step_fns = {j.name: distributed.step_function(j.module) for j in jobs}
        fused = torch.device(device).type == "cpu" or None
        self.optims = {j.name: torch.optim.Adam(param_groups(j.module), lr=1.0, betas=cfg.betas, eps=cfg.eps, fused=fused)
                       for j in jobs}
        self.base_lr = {j.name: cfg.lr or default_lr(j.module.cfg.n_latents) for j in jobs}
        self.history: dict[str, list[dict]] = {j.name: [] for j in jobs}
        self.resumed_from: list[int] = []
        self.run_id = uuid.uuid4().hex[:16]
        self.step = 0

    def restore(self, start_step: int, loader: ActivationLoader) -> None:
        for j in self.jobs:
            info = resume.load_state(resume.partial_steps(j, self.hashes[j.name])[start_step], j.module, self.optims[j.name])
            self.history[j.name] = info["history"]
        self.resumed_from = info.get("resumed_from_steps", []) + [start_step]
        self.run_id = info.get("wandb_run_id") or self.run_id
        loader.load_state_dict(info["loader"])
        # the RNG state restored by the last load_state is the one saved with this step
        self.step = start_step

    def save_partials(self, loader: ActivationLoader) -> None:
        """Rank 0 writes (every rank holds the same state); the others wait for it."""
        if self.is_main:
            with _clear_write_errors(f"the partial state at step {self.step}", self):
                self._save_partials(loader)
        if collective.world_size() > 1:
            torch.distributed.barrier()

    def last_saved_step(self) -> int:
        """The newest step every job has a partial state for (0: none)."""
        common = set.intersection(*(set(resume.partial_steps(j, self.hashes[j.name])) for j in self.jobs))
        return max(common, default=0)

    def _save_partials(self, loader: ActivationLoader) -> None:
        for j in self.jobs:
            folder = j.out_dir / resume.PARTIAL
            folder.mkdir(parents=True, exist_ok=True)
            info = {"step": self.step, "loader": loader.state_dict(), "history": self.history[j.name],
                    "resumed_from_steps": self.resumed_from, "wandb_run_id": self.run_id}
            resume.save_state(folder / f"state-{self.hashes[j.name][:12]}-{self.step:09d}.safetensors",
                              j.module, self.optims[j.name], info)
        for j in self.jobs:  # keep the two newest: a kill mid-way through the loop above leaves a common step
            resume.prune(j, self.hashes[j.name])


@contextmanager
def _clear_write_errors(what: str, run: "_Run") -> Iterator[None]:
    """A full disk, read-only filesystem or missing permission at save: one clear line; the
    partial states already saved are left as they are, so the same command resumes."""
    try:
        yield
    except OSError as e:
        step = run.last_saved_step()
        after = (f"the partial state of step {step} is intact: free space or fix permissions and run the same command "
                 f"to resume from it" if step else "nothing was saved: fix it and run the same command again")
        error = write_error(e, what, after)
        if error is None:
            raise
        raise error from None


def param_groups(module: torch.nn.Module) -> list[dict]:
    """Adam groups by ``lr_scale`` (an attribute a parameter may carry; default 1)."""
    groups: dict[float, list] = {}
    for p in module.parameters():
        groups.setdefault(float(getattr(p, "lr_scale", 1.0)), []).append(p)
    return [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()]


def train_step(job: TrainJob, opt: torch.optim.Optimizer, batch: dict, lr: float, cfg: TrainConfig,
               with_metrics: bool = True, step_fn: Callable | None = None) -> StepOutput:
    """One optimiser step; ``step_fn`` (default ``training_step``) is the DDP-wrapped call in a distributed run."""
    module = job.module
    out = (step_fn or module.training_step)(select(batch, job.input_key), select(batch, job.target_key),
                                            module.dead_mask(cfg.dead_tokens), with_metrics)
    if not torch.isfinite(out.loss):
        raise UserError(f"{job.name}: the loss became {float(out.loss)}; lower LR (now {lr:.3g}) or check the store")
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    module.after_backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    opt.step()
    module.after_step(out, cfg.batch_size)  # cfg.batch_size: the global batch
    return out


def _check_shapes(jobs: list[TrainJob], loader: ActivationLoader) -> None:
    for j in jobs:
        c = j.module.cfg
        for what, keys, d in (("input", as_keys(j.input_key), c.d_in), ("target", as_keys(j.target_key), c.d_out)):
            for key in keys:
                if key not in loader.sources:
                    raise UserError(f"{j.name}: the loader does not serve {what} {key}")
                have = loader.sources[key].d_model
                if have != d:
                    raise UserError(f"{j.name}: {what} {key} has d={have} in the store but the dictionary expects d={d}; "
                                    f"build the dictionary for this store (d_in/d_out = {have})")


def _init_fresh(run: _Run, loader: ActivationLoader) -> None:
    torch.manual_seed(run.cfg.seed)
    for j in run.jobs:
        stats = [select({k: loader.sources[k].stats(*k) for k in as_keys(key)}, key) for key in (j.input_key, j.target_key)]
        j.module.init_from_stats(*stats)
    loader.warn_if_reused(run.cfg.steps * run.cfg.batch_size)


def _log_row(run: _Run, job: TrainJob, out: StepOutput, lr: float) -> dict:
    values = out.log_values() | {"step": run.step + 1, "tokens": (run.step + 1) * run.cfg.batch_size, "lr": lr,
                                 "dead": float(job.module.dead_mask(run.cfg.dead_tokens).float().mean())}
    values |= job.module.extra_config()
    if collective.world_size() > 1:  # the mean over ranks (exact for means; FVU's ratio is approximated)
        names = [k for k, v in values.items() if isinstance(v, float) and k not in ("step", "tokens", "lr")]
        means = collective.mean_over_ranks(torch.tensor([values[k] for k in names], dtype=torch.float64))
        values |= dict(zip(names, means.tolist()))
    run.history[job.name].append(values)
    return {f"{job.name}/{k}": v for k, v in values.items() if k not in ("step", "tokens")}


@contextmanager
def _interruptible() -> Iterator[dict]:
    """SIGINT/SIGTERM set a flag instead of killing the process mid-step."""
    flag = {"signal": None}
    handler = lambda signum, frame: flag.__setitem__("signal", signum)  # noqa: E731
    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be caught here
        previous = {}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def fit(jobs: list[TrainJob], make_loader: Callable[[], ActivationLoader], cfg: TrainConfig, save: SaveFn,
        hashes: dict[str, str], start_step: int = 0, log_dir=None,
        evaluate: Callable[[TrainJob], dict] | None = None) -> None:
    """Train ``jobs`` together from ``start_step`` (their saved partial state) to the end."""
    loader = make_loader()
    _check_shapes(jobs, loader)
    run = _Run(jobs, cfg, hashes, loader.cfg.device)
    if not run.is_main:  # rank 0 alone logs and shows progress
        cfg = replace(cfg, wandb="disabled", progress=False)
        run.cfg = cfg
    if start_step:
        run.restore(start_step, loader)
    else:
        _init_fresh(run, loader)
    for j in jobs:
        j.module.train()
    logger = RunLogger(cfg, "+".join(j.name for j in jobs), log_dir or jobs[0].out_dir.parent,
                       {"train": asdict(cfg), "jobs": {j.name: j.module.config_dict() for j in jobs}}, run.run_id)
    t0 = time.perf_counter()
    try:
        with _interruptible() as interrupted:
            tokens_done = _loop(run, loader, logger, interrupted)
    finally:
        logger.close()  # an interrupted run's wandb run is closed too, and resumed under the same id
    elapsed = time.perf_counter() - t0
    for j in jobs:
        j.module.eval()
    calibration = calibrate(jobs, loader, cfg)
    if run.is_main:  # every rank holds the same weights; rank 0 writes them
        _save_all(run, jobs, cfg, hashes, loader, calibration, tokens_done / elapsed if elapsed > 0 else None,
                  save, evaluate)
    if collective.world_size() > 1:
        torch.distributed.barrier()


def _save_all(run: _Run, jobs: list[TrainJob], cfg: TrainConfig, hashes: dict[str, str], loader: ActivationLoader,
              calibration: dict, tokens_per_s: float | None, save: SaveFn, evaluate) -> None:
    for j in jobs:
        meta = {**j.metadata, "train_hash": hashes[j.name], "train": cfg.result_fields(), "steps": run.step,
                "tokens": run.step * cfg.batch_size, "dead_window_tokens": cfg.report_dead_tokens,
                "dead_fraction": float(j.module.dead_mask(cfg.report_dead_tokens).float().mean()),
                "calibration": calibration.get(j.name), "input_key": list(j.input_key), "target_key": list(j.target_key),
                "final": run.history[j.name][-1] if run.history[j.name] else {},
                "tokens_per_s_run": tokens_per_s, "processes": collective.world_size(),
                "resumed_from_steps": run.resumed_from, "wandb_run_id": run.run_id, **loader.store.provenance()}
        if evaluate is not None:
            meta |= evaluate(j)
        with _clear_write_errors(f"checkpoint {j.out_dir}", run):
            save(j, meta, run.history[j.name])


@torch.no_grad()
def calibrate(jobs: list[TrainJob], loader: ActivationLoader, cfg: TrainConfig) -> dict[str, dict]:
    """Set inference thresholds (BatchTopK, JumpReLU; per source layer for a CLT) so that the
    mean L0 is exactly k on ``cfg.calibration_tokens`` training rows, read once for every job
    from the loader's stream after the last step (so a resumed run calibrates on the same rows)."""
    calibs = {j.name: j.module.start_calibration() for j in jobs}
    todo = [j for j in jobs if calibs[j.name] is not None]
    if not todo or cfg.calibration_tokens <= 0:
        return {}
    keys = sorted({k for j in todo for k in as_keys(j.input_key)})
    kept, rows = [], 0  # the rows are read once and fed twice (L0Calibrator's two passes)
    for batch in loader:
        kept.append(distributed.gather_batch({k: batch[k] for k in keys}))  # every rank: the global rows
        rows += cfg.batch_size
        if rows >= cfg.calibration_tokens:
            break
    for second in (False, True):
        for j in todo:
            if second:
                j.module.next_calibration_pass(calibs[j.name])
            for batch in kept:
                j.module.add_calibration(calibs[j.name], select(batch, j.input_key))
    return {j.name: j.module.finish_calibration(calibs[j.name]) for j in todo}


def log_points(cfg: TrainConfig) -> set[int]:
    """Steps (1-based) whose metrics are logged: every ``log_every`` steps, but at least
    ~``min_log_points`` points spread over the run, the first and the last step included."""
    every = max(1, min(cfg.log_every, cfg.steps // max(1, cfg.min_log_points)))
    return {s for s in range(1, cfg.steps + 1) if s % every == 0} | {1, cfg.steps}


def _loop(run: _Run, loader: ActivationLoader, logger: RunLogger, interrupted: dict) -> int:
    cfg = run.cfg
    bar = progress_bar(cfg.steps, cfg.progress, unit="step", initial=run.step)
    points = log_points(cfg)
    tokens_done, t0, last_save = 0, time.perf_counter(), time.perf_counter()
    for batch in loader:
        if run.step >= cfg.steps:
            break
        log_now = run.step + 1 in points
        if run.step == 0:
            first = distributed.gather_batch(batch)  # the data-dependent init sees the global batch on every rank
            for j in run.jobs:
                j.module.init_from_batch(select(first, j.input_key), select(first, j.target_key))
        row = {}
        for j in run.jobs:
            lr = lr_at(run.step, cfg, run.base_lr[j.name])
            out = train_step(j, run.optims[j.name], batch, lr, cfg, log_now, run.step_fns[j.name])
            if log_now:
                row |= _log_row(run, j, out, lr)
        run.step += 1
        tokens_done += cfg.batch_size
        if log_now:
            logger.log(row, run.step)
            _show(bar, run, tokens_done / (time.perf_counter() - t0))
        bar.update(1)
        if run.is_main and snapshot_due(cfg, run.step):  # rank 0 writes for all
            save_snapshots(run.jobs, run.step, run.step * cfg.batch_size)
        due = (cfg.checkpoint_every_steps and run.step % cfg.checkpoint_every_steps == 0) or \
            time.perf_counter() - last_save >= cfg.checkpoint_every_s
        # one rank may see a signal, or the clock, a step before another: all act on the same step
        stop, due = distributed.any_rank_flags([interrupted["signal"] is not None, bool(due)], run.device)
        if run.step < cfg.steps and (due or stop):
            run.save_partials(loader)
            last_save = time.perf_counter()
            if stop:
                bar.close()
                raise Interrupted(f"interrupted at step {run.step}; the same command resumes from there")
    bar.close()
    return tokens_done


def _show(bar, run: _Run, tokens_per_s: float) -> None:
    first = run.jobs[0]
    h = run.history[first.name][-1]
    bar.set_postfix_str(f"tok/s {tokens_per_s:,.0f} loss {h['loss']:.4g} fvu {h['fvu']:.3f} l0 {h['l0']:.1f} "
                        f"dead {100 * h['dead']:.1f}%" + (f" ({first.name}; {len(run.jobs)} dicts)" if len(run.jobs) > 1 else ""))
