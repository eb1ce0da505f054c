"""Sparse kernels shared by every coder: CSR activation patterns and sparse autograd.

After the one dense, no-grad encoder matmul (bf16 while training), TopK,
BatchTopK, JumpReLU and (once sparse) vanilla work on sparse codes whose
pattern is kept in CSR form (``crow``, ``cols``): decoding and both weight
gradients are sparse matrix products instead of dense [batch, n_latents]
matmuls, and the transposed pattern is cached and shared by the encoder and
decoder backward.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# We rely on CSR matmuls only through the stable CPU/MKL paths exercised in tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# Training-time matmul dtype. bf16 matmuls run ~4x faster than fp32 on the
# target CPUs (AVX512-BF16); weights, gradients and optimiser state stay fp32.
# Inference (eval mode) uses fp32 so evaluation does not see bf16 rounding.
TRAIN_MATMUL_DTYPE = torch.bfloat16


def argsort(keys: Tensor) -> Tensor:
    """argsort of distinct keys. On CPU numpy's single-threaded sort: torch's
    parallel sort of ~10^5 keys took 6 ms alone but 100-550 ms on 2 cores
    shared with other processes (spinning threads), numpy's 6-8 ms either way."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(keys.numpy()))
    return torch.argsort(keys)


class SparsePattern:
    """Which (row, latent) pairs are active, in CSR form, with its transpose cached."""

    def __init__(self, crow: Tensor, cols: Tensor, n_rows: int, n_latents: int, rows: Tensor | None = None):
        self.crow, self.cols = crow, cols
        self.n_rows, self.n_latents = n_rows, n_latents
        self._rows = rows
        self._transpose: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def from_topk(cls, indices: Tensor, n_latents: int) -> "SparsePattern":
        n_rows, k = indices.shape
        crow = torch.arange(0, n_rows * k + 1, k, device=indices.device)
        rows = torch.arange(n_rows * k, device=indices.device) // k
        return cls(crow, indices.reshape(-1), n_rows, n_latents, rows)

    @classmethod
    def from_rows(cls, rows: Tensor, cols: Tensor, n_rows: int, n_latents: int) -> "SparsePattern":
        """``rows`` must be sorted (row-major order of the entries)."""
        counts = torch.bincount(rows, minlength=n_rows)
        crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
        crow[1:] = counts.cumsum(0)
        return cls(crow, cols, n_rows, n_latents, rows)

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    def rows(self) -> Tensor:
        if self._rows is None:
            counts = self.crow.diff()
            self._rows = torch.repeat_interleave(torch.arange(self.n_rows, device=self.cols.device), counts)
        return self._rows

    def transpose(self) -> tuple[Tensor, Tensor, Tensor]:
        """(crow_t, rows_sorted, order): CSR of the [n_latents, n_rows] transpose."""
        if self._transpose is None:
            # Unique keys (latent, row): a plain sort is then deterministic and
            # equals a stable sort by latent, and is much faster than one.
            order = argsort(self.cols * self.n_rows + self.rows())
            counts = torch.bincount(self.cols, minlength=self.n_latents)
            crow_t = torch.zeros(self.n_latents + 1, dtype=torch.int64, device=self.cols.device)
            crow_t[1:] = counts.cumsum(0)
            self._transpose = (crow_t, self.rows()[order], order)
        return self._transpose

    def latents_by_rows(self, values: Tensor, dense: Tensor) -> Tensor:
        """sum_b values[b, i] * dense[b] -> [n_latents, d] (a weight gradient)."""
        crow_t, rows_t, order = self.transpose()
        sparse_t = torch.sparse_csr_tensor(crow_t, rows_t, values[order].to(dense.dtype),
                                           (self.n_latents, self.n_rows), check_invariants=False)
        return sparse_t @ dense

    def rows_dot_latents(self, dense_rows: Tensor, weight: Tensor) -> Tensor:
        """dense_rows[b] . weight[i] for every active (b, i): a sampled matmul -> [nnz]."""
        sample = torch.sparse_csr_tensor(self.crow, self.cols, torch.zeros(self.nnz, dtype=weight.dtype, device=weight.device),
                                         (self.n_rows, self.n_latents), check_invariants=False)
        return torch.sparse.sampled_addmm(sample, dense_rows.to(weight.dtype), weight.T, beta=0.0).values()

    def bag(self, values: Tensor, weight: Tensor) -> Tensor:
        """sum_i values[b, i] * weight[i] per row -> [n_rows, d]."""
        return F.embedding_bag(self.cols, weight, self.crow[:-1], mode="sum",
                               per_sample_weights=values.to(weight.dtype), include_last_offset=False)


# ----------------------------------------------------------------------------

class SelectedPreacts(torch.autograd.Function):
    """Pre-activations at the active (row, latent) pairs, with sparse gradients.

    Forward only passes through ``values`` (already computed by the dense
    no-grad matmul); backward sends the gradient to W_enc, b_enc (and x if it
    needs one) through the active pairs only: nnz x d work instead of a dense
    batch x n_latents x d matmul.
    """

    @staticmethod
    def forward(ctx, values, x, W_enc, b_enc, pattern: SparsePattern):
        ctx.save_for_backward(x, W_enc)
        ctx.pattern = pattern
        return values

    @staticmethod
    def backward(ctx, grad_values):
        x, W_enc = ctx.saved_tensors
        p: SparsePattern = ctx.pattern
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = p.bag(grad_values, W_enc)
        if ctx.needs_input_grad[2]:
            grad_w = p.latents_by_rows(grad_values, x.to(W_enc.dtype))
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(p.n_latents, dtype=grad_values.dtype, device=grad_values.device)
            grad_b.index_add_(0, p.cols, grad_values)
        return grad_values if ctx.needs_input_grad[0] else None, grad_x, grad_w, grad_b, None


class SparseDecode(torch.autograd.Function):
    """sum over active latents of value * W_dec[latent], with sparse backward."""

    @staticmethod
    def forward(ctx, values, W_dec, pattern: SparsePattern):
        ctx.save_for_backward(values, W_dec)
        ctx.pattern = pattern
        return pattern.bag(values, W_dec)

    @staticmethod
    def backward(ctx, grad_out):
        values, W_dec = ctx.saved_tensors
        p: SparsePattern = ctx.pattern
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = p.rows_dot_latents(grad_out, W_dec).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = p.latents_by_rows(values.detach(), grad_out.to(W_dec.dtype))
        return grad_values, grad_w, None


def preacts(x: Tensor, W_enc: Tensor, b_enc: Tensor, dtype: torch.dtype) -> Tensor:
    """x @ W_enc.T + b_enc, no grad, in ``dtype`` (bf16 while training)."""
    with torch.no_grad():
        flat = x.reshape(-1, x.shape[-1])
        return torch.addmm(b_enc.to(dtype), flat.to(dtype), W_enc.to(dtype).T)


def dense_preacts(x: Tensor, W_enc: Tensor, b_enc: Tensor, dtype: torch.dtype) -> Tensor:
    """x @ W_enc.T + b_enc with grad; the matmul in ``dtype``, the result fp32."""
    flat = x.reshape(-1, x.shape[-1])
    return (flat.to(dtype) @ W_enc.to(dtype).T).to(W_enc.dtype) + b_enc


class DeadLatentsDecode(torch.autograd.Function):
    """AuxK's reconstruction from a dense [rows, n_dead] block of dead-latent codes.

    ``acts`` holds the ReLU'd pre-activations of the selected (row, dead latent)
    pairs and zeros elsewhere; they come from the no-grad pre-activations, and
    backward sends the gradient through the nonzero entries to W_enc, b_enc and
    W_dec at the rows ``idx`` only, with [rows, n_dead] x [n_dead, d] matmuls in
    ``dtype`` (bf16 while training). AuxK selects k_aux = d/2 of the dead
    latents per row, so this block is dense whenever few latents are dead
    (k_aux / n_dead >= AUXK_DENSE_MIN_DENSITY), where it replaces CSR products
    over rows x k_aux entries that cost ~9x the main path's sparse work.
    """

    @staticmethod
    def forward(ctx, acts, x, W_enc, b_enc, W_dec, idx, dtype):
        W_dec_dead = W_dec.detach().index_select(0, idx).to(dtype)
        acts_m = acts.to(dtype)
        ctx.save_for_backward(acts, acts_m, x, W_dec_dead, idx)
        ctx.shapes = (W_enc.shape, b_enc.shape, W_dec.shape)
        ctx.dtype = dtype
        return (acts_m @ W_dec_dead).to(W_dec.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        acts, acts_m, x, W_dec_dead, idx = ctx.saved_tensors
        enc_shape, b_shape, dec_shape = ctx.shapes
        g = grad_out.to(ctx.dtype)
        grad_acts = (g @ W_dec_dead.T).to(acts.dtype).mul_(acts > 0)  # ReLU and selection in one mask
        grad_w = grad_b = grad_dec = None
        if ctx.needs_input_grad[2]:
            grad_w = torch.zeros(enc_shape, dtype=acts.dtype, device=acts.device)
            grad_w.index_copy_(0, idx, (grad_acts.to(ctx.dtype).T @ x.to(ctx.dtype)).to(acts.dtype))
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(b_shape, dtype=acts.dtype, device=acts.device)
            grad_b.index_copy_(0, idx, grad_acts.sum(0))
        if ctx.needs_input_grad[4]:
            grad_dec = torch.zeros(dec_shape, dtype=acts.dtype, device=acts.device)
            grad_dec.index_copy_(0, idx, (acts_m.T @ g).to(acts.dtype))
        return None, None, grad_w, grad_b, grad_dec, None, None


# AuxK uses the dense dead-latent block (``DeadLatentsDecode``) when k_aux is at
# least this fraction of the dead latents; CSR products below it.
AUXK_DENSE_MIN_DENSITY = 0.05


# ----- JumpReLU: straight-through estimators with a rectangle kernel (Rajamanoharan et al. 2024) -----

class _Rectangle:
    @staticmethod
    def kernel(u: Tensor) -> Tensor:
        return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a per-entry gradient to a broadcast threshold's shape."""
    return grad if grad.shape == shape else grad.sum(0)


class JumpReLUFn(torch.autograd.Function):
    """z * H(z - t); d/dz = H(z - t), d/dt = -(t / eps) K((z - t) / eps) (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth: float):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad):
        z, t = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > t)
        grad_t = -(t / eps) * _Rectangle.kernel((z - t) / eps) * grad
        return grad_z, _sum_to(grad_t, t.shape), None


class StepFn(torch.autograd.Function):
    """H(z - t); no gradient to z, d/dt = -(1 / eps) K((z - t) / eps)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth: float):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, t = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, _sum_to(-(1.0 / eps) * _Rectangle.kernel((z - t) / eps) * grad, t.shape), None
