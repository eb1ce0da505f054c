"""An eval set: which model, corpus split, context and tokens (``EvalConfig``), and loading them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.core import paths
from pipeline.core.errors import UserError

EVAL_BATCH = 8  # sequences per forward; fixed so reference and splices share exactly the same batches
MODES = ("single_layer", "all_layers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EvalConfig:
    lm: str = "smollm2-135m"
    data: str = "bbc"
    ctx: int = 128
    eval_tokens: int = 4096
    dtype: str = "float32"
    data_dir: Path = Path("data")
    text_field: str = "text"
    eval_dir: Path | None = None  # where this eval set lives; default under data_dir (``out_dir``)

    def __post_init__(self):
        if self.eval_tokens <= 0:
            raise UserError(f"EVAL_TOKENS={self.eval_tokens} must be a positive number of tokens, e.g. EVAL_TOKENS=4096")
        if self.ctx < 3:
            raise UserError(f"CTX={self.ctx} must be at least 3 (BOS, a replaced token and its prediction)")
        if self.dtype not in DTYPES:
            raise UserError(f"DTYPE={self.dtype} is not one of {', '.join(DTYPES)}")

    @property
    def n_seq(self) -> int:
        return -(-self.eval_tokens // (self.ctx - 1))

    @property
    def rows(self) -> int:
        return self.n_seq * (self.ctx - 1)

    @property
    def out_dir(self) -> Path:
        """``data/eval/<lm>/<data>/ctx<ctx>-t<eval_tokens>[-bf16]``: reference, one folder per method, report."""
        if self.eval_dir is not None:
            return Path(self.eval_dir)
        return paths.eval_dir(self.data_dir, self.lm, self.data, self.ctx, self.eval_tokens, self.dtype)

    @property
    def train_store(self) -> Path:
        return paths.store(self.data_dir, self.lm, self.data, "train", self.ctx)


def load_model(cfg: EvalConfig):
    from pipeline.data.models import load_lm

    lm = load_lm(cfg.lm, cfg.data_dir)
    if cfg.dtype != "float32":
        lm.bridge.to(DTYPES[cfg.dtype])
    return lm


def eval_tokens(lm, cfg: EvalConfig) -> Tensor:
    """The first ``cfg.n_seq`` windows of the eval split, [n_seq, ctx] int64."""
    from pipeline.data.harvest import token_table

    # The whole split is packed to know its size: it is 5% of the corpus.
    table = token_table(lm, cfg.data, "eval", cfg.ctx, None, cfg.text_field)
    if cfg.n_seq > table.ids.shape[0]:
        raise UserError(
            f"EVAL_TOKENS={cfg.eval_tokens} is larger than the eval split of DATA={cfg.data}, which has "
            f"{table.n_rows} tokens at CTX={cfg.ctx}; lower EVAL_TOKENS"
        )
    return torch.from_numpy(table.ids[: cfg.n_seq].astype(np.int64))
