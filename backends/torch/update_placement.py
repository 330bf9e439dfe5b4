"""Where the PyTorch adapter's mask updates run: on the host (Numba) or on the device (torch).

``attach(update_backend=...)`` takes the placements of :mod:`sparsecore.placement`. On the host,
the update runs through the Numba backend on NumPy views of CPU tensors (no copies; the masks
come back as tensors, :mod:`sparsecore.torch.host_update`); on the device, through the torch
backend on the tensors where they live. ``"auto"`` takes the host whenever every array of the
update can be read there. Both give the NumPy reference's masks bit for bit. A model sharded
with ``fully_shard`` runs its updates sharded instead (:mod:`sparsecore.torch.distributed_update`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sparsecore.backend import ArrayBackend
from sparsecore.engine import SparseEngine, UpdateResult
from sparsecore.errors import SparseCoreError
from sparsecore.layers import Layer
from sparsecore.placement import placement_of

from . import fsdp
from . import host_update as hu
from .selection import Target
from .threads import kernel_threads

__all__ = ["UpdatePlacement", "check_placement"]


def check_placement(update_backend: Any, targets: Sequence[Target]) -> None:
    """At ``attach``: the value is known, and ``"host"`` (``"numba"``) can take every sparse
    parameter (dtype, Numba importable); raise :class:`SparseCoreError` naming why not."""
    if placement_of(update_backend, "torch") != "host" or any(
        fsdp.is_dtensor(t.param) for t in targets
    ):
        return  # a sharded model refuses the host in attach
    problem = next(
        (
            f"layer {t.name!r}: weight {why}"
            for t in targets
            if (why := hu.why_not_viewable_tensor(t.param)) is not None
        ),
        None,
    )
    problem = problem or hu.numba_backend()[1]
    if problem is not None:
        raise SparseCoreError(f"update_backend={update_backend!r} cannot be used: {problem}")


class UpdatePlacement:
    """Runs each mask update on the host or on the device, as ``update_backend`` says.

    ``last`` names the array backend that computed the last update (``'numba'``, ``'torch'``,
    ``'torch-sharded'``), None before the first.
    """

    def __init__(self, update_backend: str) -> None:
        self.given = update_backend  # as the user wrote it, for messages
        self.placement = placement_of(update_backend, "torch")
        self.last: str | None = None

    def host_backend(self, layers: Sequence[Layer]) -> ArrayBackend | None:
        """The Numba backend when this update runs on NumPy views of the tensors, else None."""
        if self.placement == "device":
            return None
        problem = hu.why_not_viewable(layers)
        if problem is None:
            return hu.numba_backend()[0]
        if self.placement == "host":
            raise SparseCoreError(f"update_backend={self.given!r} cannot be used: {problem}")
        return None

    def update(
        self,
        engine: SparseEngine,
        layers: list[Layer],
        step: int,
        rate: float | None,
        device: ArrayBackend,
    ) -> UpdateResult:
        """The engine's update of ``layers`` (recorded in ``engine``), on the host when it can
        and may run there, else on ``device``. The masks come back as tensors either way."""
        host = self.host_backend(layers)
        if host is None:
            self.last = device.name
            return engine.update(layers, step, backend=device, prune_rate=rate)
        self.last = host.name
        kernel_threads()  # Numba's pool as large as PyTorch's, PyTorch's count kept
        # The engine keeps its ever-active masks in its backend's arrays; the adapter keeps tensors.
        engine.ever_active = hu.as_arrays(engine.ever_active)
        try:
            result = engine.update(hu.numpy_views(layers), step, backend=host, prune_rate=rate)
        finally:
            engine.ever_active = hu.as_tensors(engine.ever_active)
        if result.revived is None:
            return replace(result, masks=hu.as_tensors(result.masks), weights=None)
        return replace(
            result,
            masks=hu.as_tensors(result.masks),
            weights=hu.as_tensors(result.weights),
            revived=hu.as_tensors(result.revived),
        )

    def propose(
        self,
        engine: SparseEngine,
        layers: list[Layer],
        step: int,
        rate: float | None,
        device: ArrayBackend,
    ) -> UpdateResult:
        """The engine's proposal for this update (nothing recorded), masks as tensors."""
        host = self.host_backend(layers)
        if host is None:
            self.last = device.name
            return engine.propose(layers, step, backend=device, prune_rate=rate)
        self.last = host.name
        kernel_threads()
        result = engine.propose(hu.numpy_views(layers), step, backend=host, prune_rate=rate)
        revived = None if result.revived is None else hu.as_tensors(result.revived)
        return replace(result, masks=hu.as_tensors(result.masks), weights=None, revived=revived)
