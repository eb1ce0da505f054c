"""The few collective operations a method needs so that N processes train as one.

A distributed run (``pipeline.train.distributed``) splits each global batch
into equal slices, one per rank. Gradients are averaged by DDP, which is
exact for losses that are means over rows. Everything else a method computes
from the whole batch must see the whole batch too, or the ranks would drift
apart and the run would differ from a single process reading the same rows:

- which latents fired (dead latents, AuxK): ``any_rank``;
- the batch's mean L0 (the vanilla and JumpReLU controllers): ``mean_over_ranks``;
- AuxK's normaliser, a sum over rows: ``mean_over_ranks`` of each rank's sum;
- BatchTopK's selection over the global batch and its threshold estimate:
  ``gather`` and ``min_over_ranks``.

Each function is the identity in a single process (no process group), so the
methods call them unconditionally and a single process pays nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _reduce(t: Tensor, op) -> Tensor:
    out = t.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def mean_over_ranks(t: Tensor) -> Tensor:
    """The mean over ranks of a (no-grad) tensor each rank computed on its slice."""
    if world_size() == 1:
        return t
    return _reduce(t.float(), dist.ReduceOp.SUM).div_(world_size()).to(t.dtype)


def sum_over_ranks(t: Tensor) -> Tensor:
    return t if world_size() == 1 else _reduce(t, dist.ReduceOp.SUM)


def min_over_ranks(t: Tensor) -> Tensor:
    return t if world_size() == 1 else _reduce(t, dist.ReduceOp.MIN)


def any_rank(mask: Tensor) -> Tensor:
    """Element-wise OR of a bool tensor over ranks."""
    if world_size() == 1:
        return mask
    return _reduce(mask.to(torch.uint8), dist.ReduceOp.MAX).bool()


def gather(t: Tensor) -> Tensor:
    """Every rank's ``t`` (same shape on every rank) concatenated along dim 0, in rank order."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)
