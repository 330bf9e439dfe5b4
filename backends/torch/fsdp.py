"""``attach`` on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Why a module of its own: under ``fully_shard`` every parameter is a DTensor of which each process
(rank) holds some rows (:mod:`sparsecore.torch.sharded_update`). The handle then keeps, per
sparse layer, only this rank's rows of the mask (a plain boolean tensor shaped like the local
shard), re-masks the local shard after every optimizer step, and runs the mask updates through
:class:`~sparsecore.torch.sharded_update.ShardedBackend`: no rank ever holds a whole layer's
weights, momentum or mask. Everything the handle reports (density, per-layer densities, the
update reports) is of the whole layers, summed over the ranks.

The helpers here turn between the three forms a layer's array takes: the DTensor the user and
``torch.distributed.checkpoint`` see, the local tensor the handle works on, and the
:class:`~sparsecore.torch.sharded_update.Shard` the update reads.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from sparsecore.backend import _REGISTRY, register_backend
from sparsecore.config import SparseConfig
from sparsecore.errors import SparseCoreError

from .sharded_update import Shard, ShardedBackend, shard_of

__all__ = [
    "Shard",
    "ShardedBackend",
    "as_dtensor",
    "as_shard",
    "check_config",
    "global_sums",
    "is_dtensor",
    "local",
    "shard_of",
    "sharded_targets",
    "to_local_part",
    "whole_mask",
]


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor (without importing DTensor where torch has none)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - every supported torch has DTensor
        return False
    return isinstance(x, DTensor)


def sharded_targets(names: list[str], params: list[torch.Tensor]) -> bool:
    """Whether the sparse parameters are sharded (all DTensors laid out as ``fully_shard`` lays
    them out) or plain (none is). A mixture, or another layout, raises naming the layer."""
    sharded = [is_dtensor(p) for p in params]
    if not any(sharded):
        return False
    if not all(sharded):
        plain = names[sharded.index(False)]
        dtensor = names[sharded.index(True)]
        raise SparseCoreError(
            f"sparse parameter {dtensor!r} is a DTensor (fully_shard) but {plain!r} is a plain "
            f"tensor: shard every sparse layer (or none), e.g. fully_shard each block and then "
            f"the model"
        )
    for name, p in zip(names, params):
        try:
            shard_of(p)
        except SparseCoreError as err:
            raise SparseCoreError(f"sparse parameter {name!r}: {err}") from None
    if "torch-sharded" not in _REGISTRY:  # saved-state checks look arrays' backends up
        register_backend(ShardedBackend())
    return True


#: The options a sharded update runs (the engine's fused update: sharded_update.py).
_SHARDED_MODES = {"prune": "magnitude", "growth": "momentum", "revive_dead_units": False}


def check_config(config: SparseConfig) -> None:
    """Refuse, before anything changes, the options the sharded update cannot run."""
    for option, value in _SHARDED_MODES.items():
        if getattr(config, option) != value:
            raise SparseCoreError(
                f"a model sharded with fully_shard takes prune='magnitude', growth='momentum' "
                f"and revive_dead_units=False (recipe='paper' sets them), got "
                f"{option}={getattr(config, option)!r}: the sharded mask update runs magnitude "
                f"pruning with momentum growth over the whole layers"
            )


def local(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``x`` (a DTensor's local tensor, same storage) or ``x`` itself,
    detached."""
    if is_dtensor(x):
        return x.to_local().detach()  # type: ignore[attr-defined]
    return x.detach()


def as_dtensor(local_part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local_part`` (this rank's rows of an array of ``like``'s layer) as a DTensor placed
    like the parameter ``like``: what ``torch.distributed.checkpoint`` saves and reshards."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_part,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=like.shape,
        stride=torch.empty(like.shape, device="meta").stride(),
    )


def to_local_part(x: Any, param: torch.Tensor) -> Any:
    """A saved array of ``param``'s layer as this rank's rows: a DTensor placed like ``param``
    gives its local tensor; a plain tensor of the whole layer (a state saved by one process)
    gives this rank's rows of it. Anything else is returned as is (the caller's checks name
    it)."""
    if is_dtensor(x):
        if tuple(x.placements) != tuple(param.placements) or x.shape != param.shape:  # type: ignore[attr-defined]
            return x  # reported by the caller as a wrong shape or placement
        return x.to_local().clone()  # the handle keeps it: not the loading template's storage
    if isinstance(x, torch.Tensor) and x.shape == param.shape:
        return shard_of(param).part(x.to(local(param).device)).clone()
    return x


def whole_mask(local_mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A layer's whole mask, gathered from the ranks (as bytes: gloo gathers no booleans).
    For reports only; the mask update never gathers."""
    gathered = as_dtensor(local_mask.to(torch.uint8), param).full_tensor()  # type: ignore[attr-defined]
    return gathered.to(torch.bool)


def as_shard(local_part: torch.Tensor, param: torch.Tensor) -> Shard:
    """``local_part`` placed as ``param``'s shard (for the sharded update and its checks)."""
    return shard_of(param).like(local_part)


def global_sums(values: list[int], device: torch.device) -> list[int]:
    """``values`` summed over the ranks (one all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def history_to_text(history: list[Any]) -> str:
    """The engine's history as one JSON string: ``torch.distributed.checkpoint`` saves and
    restores a string leaf of any length, while a list of dicts would be flattened into keys a
    fresh handle (with a shorter history) does not have."""
    return json.dumps(history)


def history_from_text(text: Any) -> Any:
    """:func:`history_to_text` read back (anything but a string is returned for the checks)."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError as err:
        raise SparseCoreError(
            f"sparsecore.torch state field 'engine.history' is not valid JSON ({err})"
        ) from None
