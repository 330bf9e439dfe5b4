"""A mask update in a distributed job: agreed over data-parallel ranks, or sharded under FSDP2.

- **Agreed** (``torch.distributed`` initialised, world size > 1, every rank holding whole
  layers: DDP and the like): every rank checks its inputs and proposes the update, the ranks
  agree on update, skip or error in one small all-reduce (:mod:`sparsecore.torch.agreement`),
  then rank 0's masks, report and revived positions are broadcast and recorded everywhere, so all
  ranks hold identical masks and histories by construction.
- **Sharded** (a model sharded with ``fully_shard``): each rank passes its rows of every layer to
  :class:`~sparsecore.torch.sharded_update.ShardedBackend`, which agrees with the other ranks
  through per-layer sums and selection histograms only; each rank gets its own rows of the masks.

Both return what a single process's update returns (:class:`~sparsecore.engine.UpdateResult`,
masks as tensors), so the adapter applies them the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from sparsecore.backend import ArrayBackend
from sparsecore.engine import SparseEngine, UpdateResult
from sparsecore.errors import NonFiniteError, SparseCoreError
from sparsecore.layers import Layer
from sparsecore.modes import NEEDS_GRAD, NEEDS_MOMENTUM

from . import agreement, fsdp

__all__ = ["agreed_update", "broadcast_revived", "sharded_update"]


def agreed_update(
    engine: SparseEngine,
    layers: list[Layer],
    step: int,
    *,
    propose: Callable[[], UpdateResult],
    masks: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    backend: ArrayBackend,
) -> UpdateResult:
    """The update of ``layers`` agreed by every rank: ``propose()`` gives this rank's proposal
    (nothing recorded); ``masks`` are the current ones (kept on a skip), ``params`` the
    parameters (for the revived positions), ``backend`` the one the engine commits with."""
    cfg = engine.config
    names = [layer.name for layer in layers]
    codes = agreement.nonfinite_codes(
        layers,
        momentum=cfg.redistribution in NEEDS_MOMENTUM["importance"]
        or cfg.growth in NEEDS_MOMENTUM["growth"],
        grad=cfg.growth in NEEDS_GRAD["growth"],
    )
    proposal: UpdateResult | None = None
    error: Exception | None = None
    if not any(codes):
        try:
            proposal = propose()
        except Exception as err:  # every rank must learn of it before anyone broadcasts
            error = err
    verdict = agreement.agree(step, codes, failed=error is not None, device=masks[0].device)
    if verdict.nonfinite is not None:
        rank, j, label = verdict.nonfinite
        reason = (
            f"rank {rank}: layer {names[j]!r}: {label} contains NaN or Inf; the mask "
            f"update was not made on any of the {verdict.world} ranks"
        )
        if cfg.on_nonfinite == "raise":
            raise NonFiniteError(reason + " (nothing changed)")
        return UpdateResult(list(masks), engine.record_skip(step, reason))
    if verdict.failed:
        if error is not None:
            raise error
        raise SparseCoreError(
            f"the mask update after step {step} failed on rank(s) {verdict.failed}; it was "
            f"not made on any rank (nothing changed)"
        )
    assert proposal is not None
    new_masks, report = agreement.broadcast_result(proposal.masks, proposal.report)
    # rank 0's weights grown into dead units too: ranks whose momentum differs disagree
    revived = broadcast_revived(proposal.revived, list(params))
    return engine.commit(layers, UpdateResult(new_masks, report, revived=revived), backend=backend)


def sharded_update(
    engine: SparseEngine,
    layers: list[Layer],
    step: int,
    rate: float | None,
    backend: ArrayBackend,
) -> UpdateResult:
    """The update of a ``fully_shard`` model, ``layers`` holding this rank's rows (weights as
    shards, :func:`sparsecore.torch.fsdp.shard_of`); errors and skips come out the same on every
    rank. The masks come back as this rank's rows."""
    result = engine.update(layers, step, backend=backend, prune_rate=rate)
    masks = [m.local if isinstance(m, fsdp.Shard) else m for m in result.masks]
    return replace(result, masks=masks, weights=None)


def broadcast_revived(revived: list[Any] | None, params: list[torch.Tensor]) -> list[Any] | None:
    """In a distributed job, rank 0's positions grown into dead units (None where it has none).

    Ranks whose momentum differs may disagree on them; the weights must follow rank 0's masks.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return revived
    device = params[0].device
    has = [0 if revived is None or r is None else 1 for r in (revived or [None] * len(params))]
    flags = torch.tensor(has, dtype=torch.uint8, device=device)
    dist.broadcast(flags, src=0)
    out: list[Any] = []
    for i, param in enumerate(params):
        if not int(flags[i]):  # rank 0 revived nothing in this layer
            out.append(None)
            continue
        local = None if revived is None else revived[i]
        buf = (
            torch.zeros(param.shape, dtype=torch.uint8, device=param.device)
            if local is None
            else local.to(torch.uint8)
        )
        dist.broadcast(buf, src=0)
        out.append(buf.to(torch.bool))
    return out
