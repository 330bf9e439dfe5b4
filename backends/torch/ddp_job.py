"""The training job on several processes: ``torchrun ... -m sparsecore.cli train ...``.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment, or a process group a caller has
initialised) :func:`sparsecore.torch.train.run_training` trains data-parallel with
``DistributedDataParallel`` over gloo (the job trains on CPUs). What it keeps from the
single-process run, and how:

* **The same batches.** Every rank draws the epoch's global order from the same (seed, epoch)
  generator and takes its contiguous share of every global batch of ``batch_size``
  (``tensor_split``: shares differ by at most one example). ``--batch-size`` is therefore the
  global batch, the steps per epoch, the learning rate, the schedule and the mask-update steps
  are the single-process run's, and a checkpoint resumes on any number of ranks.
* **The same gradient.** Each rank's loss is its share's summed loss times ``world / B`` (``B``
  the global batch's size); DDP averages the gradients over the ranks, which gives the gradient
  of the global batch's mean loss also when the shares are uneven. A rank whose share is empty
  (a last batch smaller than the number of ranks) runs one stand-in example with weight 0 so
  that it still joins DDP's gradient all-reduce.
* **The same figures on every rank.** The training loss and accuracy of a batch are all-reduced
  (one small all-reduce per step, which also lets every rank stop alike on a non-finite loss);
  validation runs each rank's contiguous share of the held-out windows or images and all-reduces
  the sums. Buffers (batch-norm statistics) are rank 0's, broadcast before each evaluation, as
  DDP broadcasts them before each forward.
* **One writer.** Only rank 0 writes the run folder, checkpoints, TensorBoard files and the
  printed lines; every rank reads a checkpoint to resume, and no rank returns before rank 0 has
  written.
* **One process group per process.** A group initialised here stays for later runs in the same
  process and is destroyed at exit: initialising the default group a second time in a process
  that torchrun started waits forever on the launcher's store.

The masks agree across ranks by construction (``attach``'s own agreement, see docs/torch.md,
"Distributed training"): ``attach`` takes the unwrapped model, so layer names and checkpoints are
the single-process run's, without DDP's ``module.`` prefix.
"""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import lm_job

__all__ = ["Ranks", "join"]


@dataclass
class Ranks:
    """This process's place among the job's ranks."""

    rank: int
    world: int

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes and prints."""
        return self.rank == 0

    def describe(self, batch_size: int, threads: int) -> str:
        """The line rank 0 prints about the distribution of the work."""
        low, high = batch_size // self.world, -(-batch_size // self.world)
        share = f"{low}" if low == high else f"{low}-{high}"
        return (
            f"distributed: {self.world} ranks (DistributedDataParallel, gloo), each global "
            f"batch of {batch_size} split into {share} per rank, {threads} "
            f"thread{'s' if threads != 1 else ''} per rank"
        )

    def share(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of the global batch ``idx``."""
        return idx.tensor_split(self.world)[self.rank]

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks (float64), the same on every rank."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def wrap(self, model: nn.Module) -> nn.Module:
        """The DDP wrapper that trains ``model`` (its parameters are rank 0's from here on)."""
        return nn.parallel.DistributedDataParallel(model)

    def train_batch(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, float, float]:
        """Forward this rank's share of the global batch ``idx`` through ``net`` (the DDP
        wrapper): the loss to call ``backward()`` on, and the global batch's summed loss and
        summed correct predictions (the same on every rank)."""
        share = self.share(idx)
        weight = 1.0
        if share.numel() == 0:
            share, weight = idx[:1], 0.0  # a stand-in: DDP's all-reduce needs every rank
        xb, yb = x[share], y[share]
        logits = net(xb)
        part = lm_job.loss_sum(logits, yb) * weight
        correct = lm_job.correct_sum(logits.detach(), yb) * weight
        total_loss, total_correct = self.sum([part.item(), correct])
        return part * (self.world / idx.numel()), total_loss, total_correct

    def held_out_share(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` held-out examples."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch-norm statistics) on every rank."""
        with torch.no_grad():
            for buf in model.buffers():
                dist.broadcast(buf, 0)

    def barrier(self) -> None:
        dist.barrier()


def _destroy() -> None:
    if dist.is_initialized():
        # The model and its attached optimizer sit in reference cycles: free them while the
        # process group lives, since gloo objects freed at interpreter exit can abort the process.
        gc.collect()
        dist.destroy_process_group()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"invalid {name} in the environment: {value!r}") from None


def join() -> Ranks | None:
    """This process's :class:`Ranks`, or None when the job runs on one process.

    A process group already initialised (by a caller, or by an earlier run in this process) with
    more than one rank is used as it is; otherwise ``WORLD_SIZE`` > 1 in the environment (torchrun
    sets it, with ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) initialises one over gloo, kept
    until the process exits.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() <= 1:
            return None
        backend = str(dist.get_backend())
        if "gloo" not in backend:
            raise ValueError(
                f"the training job trains on CPUs and needs a gloo process group; the one "
                f"initialised uses {backend}"
            )
        return Ranks(dist.get_rank(), dist.get_world_size())
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return None
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world}, but this PyTorch has no torch.distributed")
    dist.init_process_group("gloo")
    atexit.register(_destroy)
    return Ranks(dist.get_rank(), dist.get_world_size())
