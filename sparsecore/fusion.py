"""The fused mask update: one protocol a backend implements to run several steps in few reads.

Run as separate array operations, a mask update reads every layer about ten times. A backend that
can do better offers a :class:`FusedUpdate`: two calls that cover the update's array work for the
rules it declares, while the engine keeps every host decision (importance shares, prune counts,
budgets) and builds the same report as on its step-by-step path:

1. ``scan(layers, source=...)``: per layer the active count and the float64 sums of ``|source|``
   (``"momentum"``, ``"weight"`` or None for no sums) over the active and over all positions,
   with whether the arrays read hold NaN/Inf (:class:`~sparsecore.backend.LayerScan`). None:
   "not for these layers" (e.g. a dtype its kernels do not take); the engine then goes step by
   step.
2. ``prune_regrow(layers, nnz, prune_counts, grow_counts, keys)``: per layer, remove the
   ``prune_counts[l]`` active weights of smallest ``|weight|``, then activate the
   ``grow_counts[l]`` positions inactive after that with largest ``|momentum|``, ties as
   ``ArrayBackend.select`` breaks them; return new masks and the weights under them
   (:class:`~sparsecore.backend.FusedLayer`), or None, having changed nothing, if a weight is NaN
   or Inf.

Which updates it serves is declared by rule name, not found by comparing functions: ``prune``,
``growth`` and ``importance`` name the built-in rules it computes (a mode's
:attr:`~sparsecore.modes.ModeInfo.rule`; a user's mode, or a user function registered over a
built-in name, has none and always runs step by step). ``importance`` maps each importance rule
to the source its scan sums.

A backend offers the protocol in one of two ways: a method ``fused_update()`` returning an object
of this protocol (or None), or the older pair of methods ``fused_scan``/``fused_prune_regrow``
with ``supports_fused_update = True`` (:class:`sparsecore.backend.ArrayBackend`), which
:class:`MagnitudeMomentumFusion` wraps. The Numba backend's two compiled passes, the torch
backend's packed update and the sharded update over FSDP2 shards are offered this second way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .hashing import HashKey
from .layers import Layer
from .modes import ModeInfo

if TYPE_CHECKING:
    from .backend import FusedLayer, LayerScan


@runtime_checkable
class FusedUpdate(Protocol):
    """What a backend's fused update computes, and for which rules (module doc)."""

    #: Prune rules it computes: ``{"magnitude"}`` (smallest ``|weight|`` among active).
    prune: frozenset[str]
    #: Growth rules it computes: ``{"momentum"}`` (largest ``|momentum|`` among inactive).
    growth: frozenset[str]
    #: Importance rule -> the array whose ``|x|`` sums the scan returns (None: no sums needed).
    importance: Mapping[str, str | None]

    def scan(self, layers: Sequence[Layer], *, source: str | None) -> list[LayerScan] | None: ...

    def prune_regrow(
        self,
        layers: Sequence[Layer],
        nnz: Sequence[int],
        prune_counts: Sequence[int],
        grow_counts: Sequence[int],
        keys: Sequence[HashKey],
    ) -> list[FusedLayer] | None: ...


#: The rules of the paper's update, as the fused passes of the built-in backends compute them.
MAGNITUDE_MOMENTUM_RULES: dict[str, Any] = {
    "prune": frozenset({"magnitude"}),
    "growth": frozenset({"momentum"}),
    "importance": {"momentum": "momentum", "magnitude": "weight", "nonzero": None},
}


class MagnitudeMomentumFusion:
    """:class:`FusedUpdate` over a backend's ``fused_scan`` and ``fused_prune_regrow`` methods
    (magnitude pruning, momentum growth, any built-in redistribution)."""

    prune: frozenset[str] = MAGNITUDE_MOMENTUM_RULES["prune"]
    growth: frozenset[str] = MAGNITUDE_MOMENTUM_RULES["growth"]
    importance: Mapping[str, str | None] = MAGNITUDE_MOMENTUM_RULES["importance"]

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def scan(self, layers: Sequence[Layer], *, source: str | None) -> list[LayerScan] | None:
        result: list[LayerScan] | None = self.backend.fused_scan(layers, source=source)
        return result

    def prune_regrow(
        self,
        layers: Sequence[Layer],
        nnz: Sequence[int],
        prune_counts: Sequence[int],
        grow_counts: Sequence[int],
        keys: Sequence[HashKey],
    ) -> list[FusedLayer] | None:
        result: list[FusedLayer] | None = self.backend.fused_prune_regrow(
            layers, nnz, prune_counts, grow_counts, keys
        )
        return result


def fused_update_of(backend: Any) -> FusedUpdate | None:
    """The backend's fused update, or None when it offers none (module doc)."""
    offer = getattr(backend, "fused_update", None)
    if callable(offer):
        fused: FusedUpdate | None = offer()
        return fused
    if getattr(backend, "supports_fused_update", False):
        return MagnitudeMomentumFusion(backend)
    return None


@dataclass(frozen=True)
class Fusion:
    """A fused update chosen for one call: the implementation and the source its scan sums."""

    update: FusedUpdate
    source: str | None


def choose(
    backend: Any, prune: ModeInfo, growth: ModeInfo, importance: ModeInfo | None
) -> Fusion | None:
    """The backend's fused update if it serves these modes (``importance`` None: no
    redistribution), else None: the update then runs step by step."""
    fused = fused_update_of(backend)
    if fused is None or prune.rule not in fused.prune or growth.rule not in fused.growth:
        return None
    if importance is None:
        return Fusion(fused, None)
    if importance.rule is None or importance.rule not in fused.importance:
        return None
    return Fusion(fused, fused.importance[importance.rule])
