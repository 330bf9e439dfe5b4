"""The selection and its tie order, written once on a backend's required primitives.

ALGORITHM.md, "Determinism and ties": among the candidates, order by score (descending when
``largest``), then by the position hash (larger first), then by lower flat position, and take the
first ``k``. Here that order is built from stable sorts, least significant key first: the
candidates come in ascending position (``nonzero``), a stable sort by hash (descending) keeps
position order among equal hashes, and a stable sort by score keeps the hash order among equal
scores. A per-unit selection adds one more stable sort, by unit, and takes the first ``ks[j]``
of unit ``j``'s run; the run offsets are host arithmetic on per-unit candidate counts.

This is the default behind :meth:`ArrayBackend.select <sparsecore.backend.ArrayBackend.select>`
and ``select_per_unit``: O(n log n) in sorts, with the hash computed for every candidate. The
built-in backends override both with O(n) selections (a partition or a sampled interval finds the
k-th score, and only the positions tied with it are ranked by hash); ``tests/core/
test_backend_interface.py`` proves them equal to this on random and tie-heavy inputs.

Only the operations of :class:`Primitives` are used, through the backend passed in, so this
module imports no backend (and no framework): ``sparsecore.backend`` builds on it, not the reverse.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol

import numpy as np

from .hashing import HashKey

Sign = Literal["any", "positive", "nonpositive"]


class Primitives(Protocol):
    """What the selection uses of a backend (:class:`sparsecore.backend.ArrayBackend` has it all)."""

    def shape(self, x: Any) -> tuple[int, ...]: ...
    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any: ...
    def from_numpy(self, a: np.ndarray, like: Any) -> Any: ...
    def abs(self, x: Any) -> Any: ...
    def positive(self, x: Any) -> Any: ...
    def where(self, cond: Any, a: Any, b: Any) -> Any: ...
    def nonzero(self, flat: Any) -> Any: ...
    def take(self, flat: Any, index: Any) -> Any: ...
    def mark(self, positions: Any, size: int, like: Any) -> Any: ...
    def argsort(self, flat: Any, *, descending: bool) -> Any: ...
    def position_hash(self, key: HashKey, like: Any) -> Any: ...
    def unit_count(self, mask: Any, axis: int, active: bool) -> np.ndarray: ...
    def zeros_mask(self, like: Any) -> Any: ...


def candidates(be: Primitives, flat: Any, flat_mask: Any, among_active: bool, sign: Sign) -> Any:
    """The 1-d boolean candidate filter: ``mask == among_active``, and the sign filter."""
    chosen = flat_mask if among_active else be.where(flat_mask, False, True)
    if sign == "positive":
        chosen = be.where(be.positive(flat), chosen, False)
    elif sign == "nonpositive":  # -0.0 included: it is not positive
        chosen = be.where(be.positive(flat), False, chosen)
    return chosen


def selection_order(
    be: Primitives, scores: Any, hashes: Any, *, largest: bool, groups: Any = None
) -> Any:
    """Indices that sort candidates (given in ascending position) into selection order:
    ``groups`` ascending if given, then score (descending if ``largest``), then hash
    (descending), then position (ascending)."""
    order = be.argsort(hashes, descending=True)
    order = be.take(order, be.argsort(be.take(scores, order), descending=largest))
    if groups is not None:
        order = be.take(order, be.argsort(be.take(groups, order), descending=False))
    return order


def _ranked(
    be: Primitives, x: Any, flat: Any, positions: Any, magnitude: bool, key: HashKey
) -> tuple[Any, Any]:
    """The candidates' scores and position hashes."""
    scores = be.take(flat, positions)
    if magnitude:
        scores = be.abs(scores)
    n = math.prod(be.shape(x))
    hashes = be.take(be.reshape(be.position_hash(key, x), (n,)), positions)
    return scores, hashes


def select(
    be: Primitives,
    x: Any,
    mask: Any,
    k: int,
    *,
    among_active: bool,
    largest: bool,
    magnitude: bool,
    key: HashKey,
    sign: Sign = "any",
) -> Any:
    """:meth:`ArrayBackend.select <sparsecore.backend.ArrayBackend.select>` on ``be``'s primitives."""
    shape = be.shape(x)
    n = math.prod(shape)
    flat = be.reshape(x, (n,))
    filt = candidates(be, flat, be.reshape(mask, (n,)), among_active, sign)
    if k <= 0:
        return be.zeros_mask(x)
    positions = be.nonzero(filt)
    if k < be.shape(positions)[0]:
        scores, hashes = _ranked(be, x, flat, positions, magnitude, key)
        order = selection_order(be, scores, hashes, largest=largest)
        positions = be.take(positions, be.take(order, slice(0, k)))
    return be.reshape(be.mark(positions, n, x), shape)


def select_per_unit(
    be: Primitives,
    x: Any,
    mask: Any,
    ks: np.ndarray,
    *,
    axis: int,
    among_active: bool,
    largest: bool,
    magnitude: bool,
    key: HashKey,
) -> Any:
    """:meth:`ArrayBackend.select_per_unit <sparsecore.backend.ArrayBackend.select_per_unit>` on
    ``be``'s primitives: one ordering of all candidates by (unit, selection order), of which the
    first ``ks[j]`` of each unit's run are taken."""
    shape = be.shape(x)
    n = math.prod(shape)
    axis %= len(shape)
    units = shape[axis]
    inner = math.prod(shape[axis + 1 :])
    flat = be.reshape(x, (n,))
    filt = candidates(be, flat, be.reshape(mask, (n,)), among_active, "any")
    positions = be.nonzero(filt)
    unit_of = be.from_numpy(np.arange(n, dtype=np.int64) // inner % units, x)
    scores, hashes = _ranked(be, x, flat, positions, magnitude, key)
    order = selection_order(be, scores, hashes, largest=largest, groups=be.take(unit_of, positions))
    # Unit j's candidates are the run [starts[j], starts[j] + per_unit[j]) of ``order``.
    per_unit = np.asarray(be.unit_count(mask, axis, active=among_active), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(per_unit)[:-1]])
    want = np.minimum(np.asarray(ks, dtype=np.int64).reshape(units), per_unit)
    runs = [np.arange(s, s + w, dtype=np.int64) for s, w in zip(starts, want) if w > 0]
    taken = np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)
    chosen = be.take(positions, be.take(order, be.from_numpy(taken, x)))
    return be.reshape(be.mark(chosen, n, x), shape)
