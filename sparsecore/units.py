"""Dead output units: which units of a layer are dead, and how a mask update revives them.

A layer's *output units* are its rows along the output axis (a Dense/Linear unit, a convolution
filter). A unit is **dead** at a mask update when it has no active weight, or when its momentum is
exactly 0 at every position (no gradient reached it while the momentum accumulated) although the
layer's momentum is not 0 everywhere. A filter with no weight outputs its bias; behind a ReLU with
a zero bias it passes no gradient, so its momentum stays 0 and growth by momentum never chooses it:
weights grown into it at 0 stay 0 (ALGORITHM.md, "Dead units").

Revival (``revive_dead_units=True``): before the growth mode places a layer's regrowth budget
``g``, the dead units receive their equal share of it, ``round(g * dead / units)`` weights split
evenly over them (water-filling, each unit's free slots as capacity), at the inactive positions of
largest ``|momentum|`` (the position hash where all are 0); the growth mode places the rest. A
weight grown into a dead unit that was not active before the update starts at ``+-1/sqrt(fan_in)``
(the bound of PyTorch's default initialisation; ``fan_in`` = positions per unit) with the sign of
the position hash, not at 0, so the unit computes something and gets a gradient again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .backend import ArrayBackend
from .layers import Layer
from .records.updates import UpdateReport
from .redistribute import split_budget

__all__ = ["dead_unit_counts", "dead_units", "dead_units_of", "revival_quotas", "revival_scale"]


def dead_units(backend: ArrayBackend, layer: Layer) -> np.ndarray:
    """Per output unit of ``layer`` (a host boolean array): is it dead?

    Without momentum (modes that do not read it), or when the layer's momentum is 0 everywhere
    (no gradient yet, or no state), only units with no active weight count.
    """
    empty = ~backend.unit_nonzero(layer.mask, layer.axis)
    if layer.momentum is None:
        return empty
    moving = backend.unit_nonzero(layer.momentum, layer.axis)
    if not moving.any():
        return empty
    return empty | ~moving


def dead_units_of(backend: ArrayBackend, layers: Sequence[Layer]) -> list[np.ndarray]:
    """:func:`dead_units` of every layer, asked of the backend in one call (one host read on a
    device backend)."""
    arrays = [layer.mask for layer in layers]
    axes = [layer.axis for layer in layers]
    with_momentum = [i for i, layer in enumerate(layers) if layer.momentum is not None]
    arrays += [layers[i].momentum for i in with_momentum]
    axes += [layers[i].axis for i in with_momentum]
    answers = backend.units_nonzero(arrays, axes)
    moving: dict[int, np.ndarray] = dict(zip(with_momentum, answers[len(layers) :]))
    out = []
    for i in range(len(layers)):
        empty = ~answers[i]
        m = moving.get(i)
        out.append(empty if m is None or not m.any() else empty | ~m)
    return out


def dead_unit_counts(
    history: Sequence[UpdateReport],
    masks: Sequence[np.ndarray],
    names: Sequence[str],
    axes: Sequence[int],
) -> dict[str, tuple[int, int]]:
    """Per layer, ``(dead units, units)`` as the last applied update in ``history`` found them;
    before any update, the units of the (host) ``masks`` that have no active weight."""
    last = next((r for r in reversed(history) if not r.skipped), None)
    if last is not None:
        return {r.name: (r.dead_units, r.units) for r in last.layers}
    out = {}
    for name, mask, axis in zip(names, masks, axes):
        units = mask.shape[axis]
        active = np.moveaxis(np.asarray(mask), axis, 0).reshape(units, -1).any(axis=1)
        out[name] = (int(units - active.sum()), int(units))
    return out


def revival_quotas(budget: int, dead: np.ndarray, free: np.ndarray) -> np.ndarray:
    """How many of a layer's ``budget`` grown weights go to each dead unit (0 for live ones).

    The dead units' equal share of the budget, ``round_half_even(budget * #dead / #units)``,
    split evenly over them with each unit's ``free`` slots as its capacity (no more than they
    can hold).
    """
    capacity = np.where(dead, free, 0).astype(np.int64)
    share = int(round(budget * int(dead.sum()) / dead.size))
    total = min(share, int(capacity.sum()))
    return split_budget(total, dead.astype(np.float64), capacity)


def revival_scale(shape: tuple[int, ...], axis: int) -> float:
    """``1/sqrt(fan_in)``, ``fan_in`` = positions per output unit: the magnitude of weights grown
    into a dead unit."""
    fan_in = math.prod(shape) // shape[axis]
    return 1.0 / math.sqrt(fan_in)
