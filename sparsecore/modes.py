"""The pluggable parts of a mask update: importance, pruning and growth modes.

A mode is a plain function registered under a name; the built-in ones are registered the same way a
user's would be, so a new mode needs no edit of the library::

    import sparsecore

    @sparsecore.register_growth("largest_grad_times_momentum")
    def my_growth(backend, layer, mask, k, key):
        ...  # return a boolean array with exactly k True entries where mask is False

Signatures (``backend`` is the layer's :class:`~sparsecore.backend.ArrayBackend`, ``layer`` a
:class:`~sparsecore.layers.Layer`, ``key`` the :class:`~sparsecore.hashing.HashKey` of this update and
layer, to be passed to ``backend.select`` so ties break like everywhere else):

- importance: ``fn(backend, layer, nnz) -> float``, a finite score >= 0 (``nnz`` is the layer's
  active count, already computed).
- prune: ``fn(backend, layer, rate, max_prune, key) -> boolean array``: the active positions to
  remove; the engine checks they are active and counts them. ``max_prune`` is how many the layer
  may lose without going under its minimum density.
- growth: ``fn(backend, layer, mask, k, key) -> boolean array``: exactly ``k`` positions that are
  inactive in ``mask`` (the mask after pruning) to activate.

The engine validates every result (subset and exact count) and raises naming the mode otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from .backend import ArrayBackend
from .errors import SparseCoreError
from .hashing import HashKey
from .layers import Layer
from .redistribute import split_budget

ImportanceFn = Callable[[ArrayBackend, Layer, int], float]
PruneFn = Callable[[ArrayBackend, Layer, float, int, HashKey], Any]
GrowthFn = Callable[[ArrayBackend, Layer, Any, int, HashKey], Any]

IMPORTANCE: dict[str, ImportanceFn] = {}
PRUNE: dict[str, PruneFn] = {}
GROWTH: dict[str, GrowthFn] = {}

# Which signal each built-in mode reads, so the engine can demand (and check) exactly that.
NEEDS_MOMENTUM = {"importance": {"momentum"}, "growth": {"momentum", "momentum_neuron"}}
NEEDS_GRAD = {"growth": {"gradient"}}

Mode = TypeVar("Mode", bound=Callable[..., Any])


def _register(table: dict[str, Any], kind: str, name: str, fn: Any) -> Any:
    if not callable(fn):
        raise SparseCoreError(f"{kind} mode {name!r} must be a function, got {fn!r}")
    table[name] = fn
    return fn


def register_importance(name: str) -> Callable[[Mode], Mode]:
    """Decorator: register ``fn(backend, layer, nnz) -> float`` as importance mode ``name``."""
    return lambda fn: _register(IMPORTANCE, "importance", name, fn)


def register_prune(name: str) -> Callable[[Mode], Mode]:
    """Decorator: register ``fn(backend, layer, rate, max_prune, key)`` as prune mode ``name``."""
    return lambda fn: _register(PRUNE, "prune", name, fn)


def register_growth(name: str) -> Callable[[Mode], Mode]:
    """Decorator: register ``fn(backend, layer, mask, k, key)`` as growth mode ``name``."""
    return lambda fn: _register(GROWTH, "growth", name, fn)


def lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise SparseCoreError(
            f"unknown {kind} mode {name!r}; available: {sorted(table)} "
            f"(register your own with sparsecore.register_{kind})"
        ) from None


def round_half_even(x: float) -> int:
    """Python's ``round`` is round-half-to-even on floats, as ALGORITHM.md specifies."""
    return int(round(x))


# -- importance (redistribution) ----------------------------------------------------------------


def _mean_abs_active(backend: ArrayBackend, x: Any, layer: Layer, nnz: int) -> float:
    if nnz == 0:  # an empty layer uses the mean over all its positions
        return backend.abs_sum(x, None) / math.prod(backend.shape(x))
    return backend.abs_sum(x, layer.mask) / nnz


@register_importance("momentum")
def momentum_importance(backend: ArrayBackend, layer: Layer, nnz: int) -> float:
    """Mean ``|momentum|`` over the active positions (the paper's redistribution)."""
    return _mean_abs_active(backend, layer.momentum, layer, nnz)


@register_importance("magnitude")
def magnitude_importance(backend: ArrayBackend, layer: Layer, nnz: int) -> float:
    """Mean ``|weight|`` over the active positions."""
    return _mean_abs_active(backend, layer.weight, layer, nnz)


@register_importance("nonzero")
def nonzero_importance(backend: ArrayBackend, layer: Layer, nnz: int) -> float:
    """The layer's active count: the freed weights go back in proportion to layer size."""
    return float(nnz)


# -- pruning ----------------------------------------------------------------------------------


def magnitude_prune_count(rate: float, nnz: int, max_prune: int) -> int:
    """How many of ``nnz`` active weights magnitude pruning removes: ``round_half_even(rate *
    nnz)``, at most ``max_prune`` (what ``min_density`` allows)."""
    return min(round_half_even(rate * nnz), max_prune)


@register_prune("magnitude")
def magnitude_prune(
    backend: ArrayBackend, layer: Layer, rate: float, max_prune: int, key: HashKey
) -> Any:
    """Remove ``round_half_even(rate * nnz)`` active weights, smallest ``|w|`` first."""
    r = magnitude_prune_count(rate, backend.count(layer.mask), max_prune)
    return backend.select(
        layer.weight, layer.mask, r, among_active=True, largest=False, magnitude=True, key=key
    )


@register_prune("SET")
def set_prune(
    backend: ArrayBackend, layer: Layer, rate: float, max_prune: int, key: HashKey
) -> Any:
    """SET (Mocanu et al. 2018): the same fraction of positive and of non-positive weights.

    Positive weights go smallest first; non-positive ones (-0.0 included) closest to zero first.
    """
    nnz = backend.count(layer.mask)
    positive = backend.count_positive(layer.weight, layer.mask)
    r_pos = round_half_even(rate * positive)
    r_neg = round_half_even(rate * (nnz - positive))
    if r_pos + r_neg > max_prune:  # the minimum density binds: scale both down, keep the total
        r_pos = min(r_pos, max_prune * r_pos // (r_pos + r_neg))
        r_neg = max_prune - r_pos
    pos = backend.select(
        layer.weight,
        layer.mask,
        r_pos,
        among_active=True,
        largest=False,
        magnitude=False,
        key=key,
        sign="positive",
    )
    neg = backend.select(
        layer.weight,
        layer.mask,
        r_neg,
        among_active=True,
        largest=True,
        magnitude=False,
        key=key,
        sign="nonpositive",
    )
    return backend.logical_or(pos, neg)


# -- growth -----------------------------------------------------------------------------------


@register_growth("momentum")
def momentum_growth(backend: ArrayBackend, layer: Layer, mask: Any, k: int, key: HashKey) -> Any:
    """Activate the ``k`` inactive positions with the largest ``|momentum|``."""
    return backend.select(
        layer.momentum, mask, k, among_active=False, largest=True, magnitude=True, key=key
    )


@register_growth("gradient")
def gradient_growth(backend: ArrayBackend, layer: Layer, mask: Any, k: int, key: HashKey) -> Any:
    """Activate the ``k`` inactive positions with the largest ``|dense gradient|`` (as RigL)."""
    return backend.select(
        layer.grad, mask, k, among_active=False, largest=True, magnitude=True, key=key
    )


@register_growth("random")
def random_growth(backend: ArrayBackend, layer: Layer, mask: Any, k: int, key: HashKey) -> Any:
    """Activate ``k`` inactive positions ranked by the position hash: random, reproducible."""
    scores = backend.position_hash(key, layer.weight)
    return backend.select(
        scores, mask, k, among_active=False, largest=True, magnitude=False, key=key
    )


@register_growth("momentum_neuron")
def momentum_neuron_growth(
    backend: ArrayBackend, layer: Layer, mask: Any, k: int, key: HashKey
) -> Any:
    """Split ``k`` over output units by their mean ``|momentum|``, then the largest inside each.

    The split is the same water-filling as the layer budgets, each unit's free slots being its
    capacity, so the layer gets exactly ``k``.
    """
    axis = layer.axis
    shape = backend.shape(layer.momentum)
    units = shape[axis]
    per_unit = math.prod(shape) // units
    unit_mean = backend.unit_abs_sum(layer.momentum, axis) / per_unit
    free = backend.unit_count(mask, axis, active=False)
    ks = split_budget(k, unit_mean, free)
    return backend.select_per_unit(
        layer.momentum,
        mask,
        ks,
        axis=axis,
        among_active=False,
        largest=True,
        magnitude=True,
        key=key,
    )
