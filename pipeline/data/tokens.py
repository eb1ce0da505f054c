"""Documents -> fixed-length token sequences.

Documents are packed: tokenised, each followed by a separator token, and
concatenated into one stream that is cut into windows of ``ctx - 1`` tokens,
each prefixed with BOS. Packing wastes no compute on padding, so no padding
position exists; the BOS at position 0 of every window is never stored. Every
window therefore yields exactly ``ctx - 1`` rows, which lets a store's row
index map to (sequence, position) by arithmetic and keeps chunks aligned to
whole sequences.

The stream is a pure function of (tokenizer, corpus, split), so a store that
grows (more TOKENS) extends the same prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from pipeline.data.corpora import Document
from pipeline.core.errors import UserError

DEFAULT_CTX = 128
TOKENIZE_BATCH = 256


@dataclass
class TokenTable:
    ids: np.ndarray  # [n_seq, ctx] int32; column 0 is BOS
    doc: np.ndarray  # [n_seq, ctx] int32; the document index of each token (-1 at BOS)

    @property
    def ctx(self) -> int:
        return self.ids.shape[1]

    @property
    def n_rows(self) -> int:
        return self.ids.shape[0] * (self.ctx - 1)

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token id, document, position) for every stored row, sequence-major."""
        n_seq = self.ids.shape[0]
        pos = np.tile(np.arange(1, self.ctx, dtype=np.int32), n_seq)
        return self.ids[:, 1:].reshape(-1), self.doc[:, 1:].reshape(-1), pos


def _token_stream(tokenizer, docs: Iterable[Document], separator_id: int) -> Iterator[tuple[np.ndarray, int]]:
    it = iter(docs)
    doc_index = 0
    while True:
        batch = [d.text for d, _ in zip(it, range(TOKENIZE_BATCH))]
        if not batch:
            return
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            yield np.asarray(ids + [separator_id], dtype=np.int32), doc_index
            doc_index += 1


def pack(
    tokenizer,
    docs: Iterable[Document],
    ctx: int,
    bos_id: int,
    separator_id: int,
    n_rows: int | None = None,
    what: str = "the corpus split",
) -> TokenTable:
    """Pack documents into ``ceil(n_rows / (ctx-1))`` windows (all of them if None)."""
    if ctx < 2:
        raise UserError(f"CTX={ctx} is too small; it must be at least 2 (BOS plus one token)")
    per_seq = ctx - 1
    need = None if n_rows is None else -(-n_rows // per_seq) * per_seq
    pieces, doc_pieces, have = [], [], 0
    for ids, doc_index in _token_stream(tokenizer, docs, separator_id):
        pieces.append(ids)
        doc_pieces.append(np.full(len(ids), doc_index, dtype=np.int32))
        have += len(ids)
        if need is not None and have >= need:
            break
    available = (have // per_seq) * per_seq
    if need is None:
        need = available
    if need > available or need == 0:
        raise UserError(
            f"TOKENS={n_rows} is larger than {what}, which has {available} tokens at CTX={ctx}; "
            f"lower TOKENS or choose a larger corpus (DATA=mix holds all bundled text)"
        )
    stream = np.concatenate(pieces)[:need].reshape(-1, per_seq)
    doc = np.concatenate(doc_pieces)[:need].reshape(-1, per_seq)
    n_seq = stream.shape[0]
    ids = np.concatenate([np.full((n_seq, 1), bos_id, dtype=np.int32), stream], axis=1)
    doc = np.concatenate([np.full((n_seq, 1), -1, dtype=np.int32), doc], axis=1)
    return TokenTable(ids=ids, doc=doc)
