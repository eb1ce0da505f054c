"""Training settings (``TrainConfig``), the learning-rate schedule and its defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pipeline.core.errors import UserError

WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class TrainConfig:
    tokens: int
    batch_size: int = 1024
    lr: float | None = None  # None: the Gao et al. scaling default, per member
    lr_schedule: str = "cosine"
    warmup_frac: float = 0.05
    max_warmup_steps: int = 1000
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    dead_window: int = 0  # AuxK's "dead": not fired in this many tokens; 0: min(10M, tokens // 10)
    # The dead % a checkpoint reports counts latents silent over this trailing window of
    # training tokens; 0: min(10M, half the run). A tenth of a 200k-token run (20k tokens)
    # flagged rare but working latents: on SmolLM2 layer 2 (TopK k=8, 2304 latents, two passes over 200k
    # tokens) 35% had not fired in the last 20k tokens, 24% in 100k, 8.6% in 200k.
    report_dead_window: int = 0
    # Rows read after training from the training stream, on which BatchTopK's inference
    # threshold and JumpReLU's threshold level are set so that the mean L0 is k.
    calibration_tokens: int = 32768
    seed: int = 0
    # Not part of the result (excluded from the staleness hash):
    checkpoint_every_s: float = 300.0
    checkpoint_every_steps: int = 0  # 0: time-based only
    log_every: int = 10
    min_log_points: int = 50  # curves get at least this many points whatever the run's length
    wandb: str = "offline"
    progress: bool = True
    # Snapshots of the weights every this many training tokens, for the emergence analysis
    # (pipeline.train.snapshots); 0: none. Not part of the result either.
    snapshot_tokens: int = 0

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
        if self.snapshot_tokens < 0:
            raise UserError(f"SNAPSHOT_TOKENS must be >= 0 (0: no snapshots), got {self.snapshot_tokens}")
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

    @property
    def report_dead_tokens(self) -> int:
        return self.report_dead_window or min(10_000_000, max(self.batch_size, self.steps * self.batch_size // 2))

    def result_fields(self) -> dict:
        skip = {"checkpoint_every_s", "checkpoint_every_steps", "log_every", "min_log_points", "wandb", "progress"}
        skip |= {"snapshot_tokens"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def default_lr(n_latents: int) -> float:
    """2e-3 / sqrt(n_latents / 2^14): 10x the scaling fit of Gao et al. 2024 (made for
    billions of tokens). Our runs are a few hundred steps, where a larger step wins:
    SmolLM2 layer 1, 200k tokens, batch 1024 (195 steps), TopK/BatchTopK k=32,
    held-out FVU 0.36 at 1.9e-3, 0.31 at 3.8e-3, 0.30 at 7.6e-3 (but 9% dead latents)."""
    return 2e-3 / math.sqrt(n_latents / 2**14)


def lr_at(step: int, cfg: TrainConfig, base: float) -> float:
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return base
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


