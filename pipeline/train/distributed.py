"""Several processes training as one, on torch.distributed (torchrun, DDP, gloo or NCCL).

``nnd train --nproc N [--nnodes M --node-rank R --master-addr A]`` starts
``torchrun`` (``launch``), which runs the same command in N x M worker
processes. Each worker joins the process group (``ProcessGroup.start``: gloo
on CPU, NCCL on CUDA, one GPU per local rank) and reads its own disjoint
stream of store chunks (the loader's ``rank``/``world_size``), a slice of
``batch_size / world`` rows of each global batch.

What makes N processes equal one process reading the same rows (tested to fp32
tolerance, ``tests/test_distributed.py``):
- gradients are averaged by DistributedDataParallel (``step_function``);
  every loss term is a mean over rows, or normalised by a global sum
  (``pipeline.methods.collective``), so the average is the one-process gradient;
- what a method keeps from whole batches goes through ``collective`` too:
  firing counts, the L0 controllers, BatchTopK's global selection and threshold;
- the first batch (data-dependent init) and the calibration rows are gathered,
  so every rank initialises and calibrates on the global batch;
- only rank 0 logs, writes partial states and checkpoints (atomically, as in a
  single process); a restarted run resumes every rank from the same state.

A K sweep can instead be spread over the processes (``spread="sweep"``):
each rank trains its share of the dictionaries on its own full data stream,
as one process would, with no communication.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.core.errors import UserError
import pipeline.methods.collective as collective

SPREADS = ("ddp", "sweep")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,252}$")


@dataclass(frozen=True)
class Launch:
    """Where the processes of one run live: ``nproc`` per node on ``nnodes`` nodes."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def __post_init__(self):
        if not 1 <= self.nproc <= 256:
            raise UserError(f"NPROC={self.nproc} must be between 1 and 256 processes per node")
        if not 1 <= self.nnodes <= 1024:
            raise UserError(f"NNODES={self.nnodes} must be between 1 and 1024")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"NODE_RANK={self.node_rank} must be in 0..{self.nnodes - 1} (NNODES={self.nnodes})")
        if not _HOST.match(self.master_addr):
            raise UserError(f"MASTER_ADDR={self.master_addr!r} is not a host name or IP address")
        if not 1024 <= self.master_port <= 65535:
            raise UserError(f"MASTER_PORT={self.master_port} must be between 1024 and 65535")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def torchrun_command(self, module_args: list[str]) -> list[str]:
        """The torchrun command line (an argument list: no shell ever sees it)."""
        where = (["--standalone"] if self.nnodes == 1 else
                 ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank), "--rdzv-backend", "static",
                  "--master-addr", self.master_addr, "--master-port", str(self.master_port)])
        return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc-per-node", str(self.nproc),
                "--max-restarts", "0", "-m", *module_args]


def in_worker() -> bool:
    """This process was started by torchrun."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(launch_cfg: Launch, module_args: list[str]) -> int:
    """Run ``python -m <module_args>`` in every process of ``launch_cfg``; returns the exit code.

    The workers' output passes through. torchrun's own log lines and, after a worker failed, its
    traceback are dropped: the workers have said what went wrong, and the caller says what to do."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "LOGLEVEL": "ERROR"}
    proc = subprocess.Popen(launch_cfg.torchrun_command(module_args), env=env, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    failed = False
    for line in proc.stderr:
        if _AGENT_LOG.match(line):
            failed = failed or line.startswith("E")
            continue
        if failed and line.startswith("Traceback (most recent call last):"):
            break  # torchrun's ChildFailedError report, to the end
        sys.stderr.write(line)
    for _ in proc.stderr:
        pass
    return proc.wait()


# torchrun's log lines: "W1130 22:28:14.940000 22852 .../torch/distributed/elastic/...] ..."
_AGENT_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    world_size: int
    local_rank: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: str = "cpu") -> "ProcessGroup":
        return cls(0, 1, 0, device)

    @classmethod
    def start(cls, device: str) -> "ProcessGroup":
        """Join the process group torchrun set up (env://); gloo on CPU, NCCL with one GPU per local rank."""
        world, rank, local = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        on_gpu = device.startswith("cuda")
        if on_gpu:
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if on_gpu else "gloo")
        return cls(rank, world, local, device)

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


class _TrainingStep(nn.Module):
    """``training_step`` as a module's forward, so DDP can wrap it and average its gradients."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x, y, dead, with_metrics):
        return self.module.training_step(x, y, dead, with_metrics)


def step_function(module: nn.Module) -> Callable:
    """``module.training_step`` in one process; under a process group, the same call through
    DistributedDataParallel (buffers are kept equal by ``collective``, not broadcast)."""
    if collective.world_size() == 1:
        return module.training_step
    device = next(module.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    # every parameter of a Trainable gets a gradient at every step (DDP checks it); buffers are kept
    # equal by the methods' collectives, so DDP need not broadcast them at every forward
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
        return DistributedDataParallel(_TrainingStep(module), device_ids=ids, broadcast_buffers=False)


def gather_batch(batch: dict) -> dict:
    """The global batch (every rank's slice, in rank order) on every rank. Keys in sorted order:
    every rank must issue the same collectives in the same order (a set's order is per process)."""
    return {key: collective.gather(batch[key]) for key in sorted(batch)}


def any_rank_flags(flags: list[bool], device: str) -> list[bool]:
    """Each flag true on every rank when it is true on any."""
    if collective.world_size() == 1:
        return flags
    return collective.any_rank(torch.tensor(flags, device=device)).tolist()
