"""Latent codes of one batch, in two small types: ``SparseCodes`` (values on a CSR
pattern) and ``DenseCodes`` (a [rows, n_latents] tensor). Both answer the same
questions (``to_dense``, ``l0``, ``fired``, ``decode``), so coders and the
training loop never ask which one they hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.methods.kernels import SparseDecode, SparsePattern

# Above this fraction of nonzero latents a dense decode beats the sparse one.
SPARSE_DECODE_MAX_DENSITY = 0.05


@dataclass
class SparseCodes:
    """Activations ``values`` [nnz] at the (row, latent) pairs of ``pattern``."""

    values: Tensor
    pattern: SparsePattern
    preacts: Tensor | None = None  # no-grad pre-activations [rows, n_latents], kept for AuxK
    step: Tensor | None = None  # JumpReLU: H(z - t) per entry with its threshold STE, for the L0 term

    @property
    def n_latents(self) -> int:
        return self.pattern.n_latents

    @property
    def n_rows(self) -> int:
        return self.pattern.n_rows

    def to_dense(self) -> Tensor:
        p = self.pattern
        out = torch.zeros(p.n_rows, p.n_latents, dtype=self.values.dtype, device=self.values.device)
        out[p.rows(), p.cols] = self.values
        return out

    def l0(self) -> Tensor:
        """Mean number of nonzero latents per row (no grad)."""
        return (self.values.detach() > 0).sum() / self.pattern.n_rows

    def fired(self) -> Tensor:
        """[n_latents] bool: latents active on at least one row of the batch."""
        out = torch.zeros(self.n_latents, dtype=torch.bool, device=self.values.device)
        out[self.pattern.cols[self.values.detach() > 0]] = True
        return out

    def decode(self, W_dec: Tensor) -> Tensor:
        """codes @ W_dec, without bias, through the sparse kernels."""
        return SparseDecode.apply(self.values, W_dec, self.pattern)


@dataclass
class DenseCodes:
    """Activations as a dense [rows, n_latents] tensor."""

    dense: Tensor
    matmul_dtype: torch.dtype = torch.float32  # for a dense decode
    preacts: Tensor | None = None

    @property
    def n_latents(self) -> int:
        return self.dense.shape[1]

    @property
    def n_rows(self) -> int:
        return self.dense.shape[0]

    def to_dense(self) -> Tensor:
        return self.dense

    def l0(self) -> Tensor:
        return (self.dense.detach() != 0).sum() / self.dense.shape[0]

    def fired(self) -> Tensor:
        return (self.dense.detach() != 0).any(0)

    def decode(self, W_dec: Tensor) -> Tensor:
        """codes @ W_dec, without bias.

        Codes that are mostly zero decode sparsely: gathering the nonzeros
        costs one pass, the dense alternative three [batch, n_latents] x
        [n_latents, d] matmuls (forward and both gradients).
        """
        dense = self.dense
        support = dense.detach() != 0
        if support.count_nonzero() <= SPARSE_DECODE_MAX_DENSITY * support.numel():
            rows, cols = support.nonzero(as_tuple=True)
            pattern = SparsePattern.from_rows(rows, cols, dense.shape[0], self.n_latents)
            return SparseDecode.apply(dense[rows, cols], W_dec, pattern)
        return (dense.to(self.matmul_dtype) @ W_dec.to(self.matmul_dtype)).to(W_dec.dtype)


Codes = SparseCodes | DenseCodes
