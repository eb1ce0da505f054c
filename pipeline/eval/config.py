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
    eval_tokens: int = 4096  # the CLI default is pipeline.core.defaults.EVAL_TOKENS
    dtype: str = "float32"
    data_dir: Path = Path("data")
    text_field: str = "text"
    eval_dir: Path | None = None  # where this eval set lives; default under data_dir (``out_dir``)
    device: str = "cpu"  # cpu, cuda, cuda:N: the model, the dictionaries and the splices (not part of the result)

    def __post_init__(self):
        if self.eval_tokens <= 0:
            raise UserError(f"EVAL_TOKENS={self.eval_tokens} must be a positive number of tokens, e.g. EVAL_TOKENS=4096")
        if self.ctx < 3:
            raise UserError(f"CTX={self.ctx} must be at least 3 (BOS, a replaced token and its prediction)")
        if self.dtype not in DTYPES:
            raise UserError(f"DTYPE={self.dtype} is not one of {', '.join(DTYPES)}")
        from pipeline.data.models import check_device

        check_device(self.device)

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

    lm = load_lm(cfg.lm, cfg.data_dir, cfg.device)
    if cfg.dtype != "float32":
        lm.bridge.to(DTYPES[cfg.dtype])
    return lm


def eval_tokens(lm, cfg: EvalConfig) -> Tensor:
    """``cfg.n_seq`` windows of the eval split, drawn across its documents: [n_seq, ctx] int64.

    The whole eval split (5% of a corpus's documents, none of which is in
    any training store) is packed exactly as the harvest packs a store:
    documents each followed by a separator, cut into windows of ``ctx - 1``
    tokens after a BOS. A window belongs to the document of its first token.
    Windows are then taken round-robin over the documents in corpus order
    (``round_robin``): the first window of every document, then the second
    window of every document that has one, and so on. At the defaults
    (BBC, CTX=128) the split holds 108 documents, so up to 108 windows
    (13.7k tokens) come from 108 different documents; a larger EVAL_TOKENS
    extends the same order, so a smaller eval set is a subset of a larger.
    """
    from pipeline.data import corpora
    from pipeline.data.harvest import token_table

    if next(iter(corpora.documents(cfg.data, "eval", cfg.text_field)), None) is None:
        raise UserError(
            f"the eval split of DATA={cfg.data} is empty: 5% of a corpus's documents, chosen by a hash of their "
            f"text, are held out, and none of these was; add documents, or give one .txt file (a single document "
            f"is split by position, its last 5% held out)")
    try:
        table = token_table(lm, cfg.data, "eval", cfg.ctx, None, cfg.text_field)
    except UserError:  # fewer tokens than one window
        table = None
    have = 0 if table is None else table.ids.shape[0]
    if cfg.n_seq > have:
        raise UserError(
            f"EVAL_TOKENS={cfg.eval_tokens} is larger than the eval split of DATA={cfg.data}, which has "
            f"{have * (cfg.ctx - 1)} tokens at CTX={cfg.ctx}; lower EVAL_TOKENS")
    order = round_robin(table.doc[:, 1])
    return torch.from_numpy(table.ids[order[: cfg.n_seq]].astype(np.int64))


def round_robin(window_doc: np.ndarray) -> np.ndarray:
    """Window indices, round-robin over documents: the r-th window of every document before any (r+1)-th.

    ``window_doc`` is the (non-decreasing) document of each window in stream
    order; within a round, documents keep their stream order.
    """
    window_doc = np.asarray(window_doc)
    rank = np.arange(len(window_doc)) - np.searchsorted(window_doc, window_doc, side="left")
    return np.lexsort((window_doc, rank))
