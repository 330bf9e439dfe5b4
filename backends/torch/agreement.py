"""Distributed ranks agree on every mask update before any collective that depends on it.

Why: with plain ``torch.distributed`` (no DDP wrapper) each rank has its own gradients and
momentum. If one rank finds NaN/Inf and skips an update while the others go on to broadcast
rank 0's masks, the others wait in that broadcast until the process group times out (30 minutes
by default), and a rank that raised leaves them waiting for good. So a due update starts with one
small all-reduce: a table with one row per rank (each rank fills its own row, the sum gives
everyone the whole table) holding, per sparse layer, whether the arrays the update reads hold
NaN/Inf, whether the rank's own computation of the update failed, and the rank's step count.
From the same table every rank takes the same decision: all skip (or all raise) with the same
reason, naming the first rank and layer at fault; or all raise if a computation failed somewhere
or the step counts differ; or all take rank 0's masks and rank 0's report, which every rank then
records, so histories agree too. ``SparseTraining.step()`` agrees the same way on whether a step
with non-finite gradients counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparsecore.errors import SparseCoreError
from sparsecore.layers import Layer
from sparsecore.records.updates import UpdateReport

__all__ = ["Verdict", "agree", "broadcast_result", "nonfinite_codes", "world_size"]

#: What a nonzero code in the agreement table means.
LABELS = {1: "weight", 2: "momentum", 3: "gradient"}


def world_size() -> int:
    """The number of ranks when ``torch.distributed`` is initialised, else 1."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size())


def nonfinite_codes(layers: list[Layer], *, momentum: bool, grad: bool) -> list[int]:
    """Per layer, 0 if the arrays an update reads are finite, else the code of the first that is
    not (1 weight, 2 momentum, 3 gradient). One host synchronisation for all layers."""
    checks: list[tuple[int, int, torch.Tensor]] = []
    for j, layer in enumerate(layers):
        for code, array, needed in (
            (1, layer.weight, True),
            (2, layer.momentum, momentum),
            (3, layer.grad, grad),
        ):
            if needed and array is not None:
                checks.append((j, code, array))
    codes = [0] * len(layers)
    if not checks:
        return codes
    finite = torch.stack([torch.isfinite(a).all() for _, _, a in checks]).tolist()
    for (j, code, _), ok in zip(checks, finite):
        if not ok and codes[j] == 0:
            codes[j] = code
    return codes


@dataclass(frozen=True)
class Verdict:
    """What every rank learned from the agreement table (the same on every rank)."""

    world: int
    nonfinite: tuple[int, int, str] | None  # (rank, layer index, array label) of the first fault
    failed: list[int]  # ranks whose computation of the update raised


def agree(step: int, codes: list[int], *, failed: bool, device: torch.device) -> Verdict:
    """The all-reduce described in the module doc. Raises :class:`SparseCoreError` on every
    rank alike when the ranks are at different step counts."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    table = torch.zeros(world, len(codes) + 2, dtype=torch.int64, device=device)
    table[rank, : len(codes)] = torch.tensor(codes, dtype=torch.int64)
    table[rank, -2] = int(failed)
    table[rank, -1] = step
    dist.all_reduce(table)  # each row is written by one rank: the sum is the whole table
    rows = table.cpu().tolist()
    steps = [row[-1] for row in rows]
    if len(set(steps)) > 1:
        raise SparseCoreError(
            f"the ranks are at different step counts {steps} at a mask update: they must take "
            f"the same optimizer steps (a GradScaler that skips a step on one rank only, "
            f"without DDP averaging the gradients, makes them drift apart)"
        )
    nonfinite = next(
        (
            (r, j, LABELS[row[j]])
            for r, row in enumerate(rows)
            for j in range(len(codes))
            if row[j] != 0
        ),
        None,
    )
    return Verdict(world, nonfinite, [r for r, row in enumerate(rows) if row[-2]])


def broadcast_result(
    masks: list[torch.Tensor], report: UpdateReport
) -> tuple[list[torch.Tensor], UpdateReport]:
    """Rank 0's masks and report, on every rank (the update every rank then records)."""
    import torch.distributed as dist

    out = []
    for m in masks:
        buf = m.to(torch.uint8)
        dist.broadcast(buf, src=0)
        out.append(buf.to(torch.bool))
    box: list[Any] = [report]
    dist.broadcast_object_list(box, src=0)
    return out, box[0]
