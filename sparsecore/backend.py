"""The array-backend interface: a few array primitives, and the mask update's operations on them.

The algorithm (``sparsecore.engine``) is written once against :class:`ArrayBackend`. A backend
implements the *required primitives* (inspection, host <-> device, reshaping, ``abs``, ``x > 0``,
finiteness, ``where``, ``nonzero``, ``take``, ``mark``, a stable ``argsort`` and a ``sum`` read back
to the host); every operation the update needs (counts, masked sums, per-unit sums, selection with
its tie order, the position hash, applying masks) has a default written once on top of them, the
selection in :mod:`sparsecore.selection`. A backend may override any of those for speed (NumPy,
Numba, PyTorch, Keras and CuPy do); the shared property tests prove every override equal to the
default. Every decision that is not an array operation (budgets, the integer split, schedules) is
made on the host by shared code, so all backends agree.

Selection order (ALGORITHM.md, "Determinism and ties"): candidates are ordered by score (ascending
for ``largest=False``, descending for ``largest=True``), then by the position hash (larger first),
then by lower flat index; the first ``k`` are selected. Within one layer the hash is a bijection of
the flat index, so the last rule only matters beyond 2**32 positions.

Backends are found by name (:func:`get_backend`) or by array (:func:`backend_for`) in a registry
that names no backend module: the core's own backends register themselves
(:mod:`sparsecore.builtin_backends`), and a framework's package announces its backend in the
``sparsecore.backends`` entry-point group (``pyproject.toml``), loaded only when asked for.
"""

from __future__ import annotations

import abc
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np

from . import selection
from .errors import SparseCoreError
from .hashing import HashKey, layer_hash
from .selection import Sign

if TYPE_CHECKING:
    from .layers import Layer

__all__ = [
    "REQUIRED_PRIMITIVES", "ArrayBackend", "FusedLayer", "LayerScan", "Sign", "backend_for",
    "get_backend", "register_backend", "register_backend_factory",
]  # fmt: skip


@dataclass(frozen=True)
class LayerScan:
    """What one read of a layer gives the fused update before any budget is known.

    ``nnz`` counts the mask; the two sums are of ``|x|`` (x the importance source: momentum or
    weight) over the active positions and over all positions, accumulated in float64. ``finite``
    is False if the arrays read (momentum, and the weight when it is the source) hold NaN or Inf.
    """

    nnz: int
    active_abs_sum: float
    total_abs_sum: float
    finite: bool


@dataclass(frozen=True)
class FusedLayer:
    """One layer's result of the fused prune-and-regrow: new mask, new weights, net counts."""

    mask: Any
    weight: Any
    net_pruned: int
    net_grown: int


class ArrayBackend(abc.ABC):
    """Array operations of one framework. Arrays stay on their framework and device.

    Implement the primitives listed in :data:`REQUIRED_PRIMITIVES` (each about one line on an
    array library: ``tests/helpers/minimal_backend.py`` is a complete backend, and docs/core.md
    shows one); override any other method for speed. Host values (counts, float64 sums) are returned as Python ``int``/``float``
    or NumPy arrays; that is the only data that leaves the device during an update.
    """

    name: str = "abstract"

    # == the required primitives ===============================================================
    @abc.abstractmethod
    def owns(self, x: Any) -> bool:
        """True if ``x`` is an array of this backend's framework."""

    @abc.abstractmethod
    def shape(self, x: Any) -> tuple[int, ...]:
        """The shape as a tuple of Python ints."""

    @abc.abstractmethod
    def dtype_kind(self, x: Any) -> str:
        """``'f'`` floating, ``'b'`` boolean, ``'i'`` integer (signed or not), ``'c'`` complex."""

    # Not abstract so that a backend written against the earlier, wider interface (every
    # operation below implemented, no primitive) keeps working; a missing one raises by name.
    def from_numpy(self, a: np.ndarray, like: Any) -> Any:
        """The host array ``a`` as an array of this framework on ``like``'s device (same dtype,
        or the framework's equivalent)."""
        raise self._missing("from_numpy")

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        """``x`` in C order with ``shape`` (a view where the framework can)."""
        raise self._missing("reshape")

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        """``x`` with axis ``source`` moved to ``destination`` (NumPy's ``moveaxis``)."""
        raise self._missing("moveaxis")

    def abs(self, x: Any) -> Any:
        """``|x|`` elementwise, in ``x``'s dtype."""
        raise self._missing("abs")

    def positive(self, x: Any) -> Any:
        """``x > 0`` elementwise (boolean): -0.0 and +0.0 are not positive."""
        raise self._missing("positive")

    def isfinite(self, x: Any) -> Any:
        """Elementwise: neither NaN nor +-Inf (boolean)."""
        raise self._missing("isfinite")

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        """``a`` where ``cond`` else ``b``; one of ``a``/``b`` may be a Python scalar (bool or
        float), which takes the other operand's dtype."""
        raise self._missing("where")

    def nonzero(self, flat: Any) -> Any:
        """The positions (ascending, an int64 array) where the 1-d boolean ``flat`` is True."""
        raise self._missing("nonzero")

    def take(self, flat: Any, index: Any) -> Any:
        """``flat[index]`` for a 1-d array: ``index`` an int64 array of this framework, or a
        Python ``slice``."""
        raise self._missing("take")

    def mark(self, positions: Any, size: int, like: Any) -> Any:
        """A 1-d boolean array of ``size`` entries on ``like``'s device, True at ``positions``."""
        raise self._missing("mark")

    def argsort(self, flat: Any, *, descending: bool) -> Any:
        """A *stable* sort order (int64) of the 1-d ``flat``: equal values keep their order."""
        raise self._missing("argsort")

    def sum(self, x: Any, axis: int | None = None) -> np.ndarray:
        """Sum over all elements (``axis=None``) or along ``axis``, read back to the host:
        float64 (accumulated in float64) for floats, int64 for booleans (a count) and integers."""
        raise self._missing("sum")

    def _missing(self, primitive: str) -> NotImplementedError:
        return NotImplementedError(
            f"backend {self.name!r} does not implement the primitive {primitive!r} "
            f"(sparsecore.backend.REQUIRED_PRIMITIVES) nor the operation that uses it"
        )

    # == operations the update uses, with defaults on the primitives ============================
    # -- inspection ---------------------------------------------------------------------------
    def all_finite(self, x: Any) -> bool:
        """True if no element is NaN or +-Inf."""
        return self.count(self.isfinite(x)) == math.prod(self.shape(x))

    # -- reductions (host results) ------------------------------------------------------------
    def count(self, mask: Any) -> int:
        """Number of True entries."""
        return int(self.sum(mask))

    def counts(self, masks: Sequence[Any]) -> list[int]:
        """:meth:`count` of every mask. Backends of a device override it to bring all the
        counts back in one transfer: the engine counts every layer's mask twice per update."""
        return [self.count(m) for m in masks]

    def count_positive(self, x: Any, mask: Any) -> int:
        """Number of active positions (``mask`` True) whose value is > 0 (SET pruning)."""
        return self.count(self.where(mask, self.positive(x), False))

    def abs_sum(self, x: Any, mask: Any | None) -> float:
        """Sum of ``|x|`` over positions where ``mask`` is True (all if None), accumulated in float64."""
        values = self.abs(x)
        if mask is not None:
            values = self.where(mask, values, 0.0)
        return float(self.sum(values))

    def _units(self, x: Any, axis: int) -> Any:
        """``x`` as (units, rest): one row per index along ``axis``, the rest in C order."""
        shape = self.shape(x)
        return self.reshape(
            self.moveaxis(x, axis, 0), (shape[axis], math.prod(shape) // shape[axis])
        )

    def unit_abs_sum(self, x: Any, axis: int) -> np.ndarray:
        """Per output unit (index along ``axis``), the float64 sum of ``|x|``; a host array."""
        return np.asarray(self.sum(self._units(self.abs(x), axis), axis=1), dtype=np.float64)

    def unit_count(self, mask: Any, axis: int, active: bool) -> np.ndarray:
        """Per output unit, the number of positions where ``mask == active``; a host int64 array."""
        counts = np.asarray(self.sum(self._units(mask, axis), axis=1), dtype=np.int64)
        shape = self.shape(mask)
        return counts if active else math.prod(shape) // shape[axis] - counts

    def unit_nonzero(self, x: Any, axis: int) -> np.ndarray:
        """Per output unit, whether any of its entries is non-zero (True for a boolean mask);
        a host boolean array. Dead-unit counts read it at every update, so a backend may answer
        it faster than a sum (the Numba backend stops at the first non-zero entry of each unit).
        """
        if self.dtype_kind(x) == "b":
            return self.unit_count(x, axis, active=True) > 0
        return self.unit_abs_sum(x, axis) > 0

    def units_nonzero(self, xs: Sequence[Any], axes: Sequence[int]) -> list[np.ndarray]:
        """:meth:`unit_nonzero` of every array. Backends of a device override it to bring all
        the answers back in one transfer: the engine asks it of every layer at every update."""
        return [self.unit_nonzero(x, axis) for x, axis in zip(xs, axes)]

    # -- selection ----------------------------------------------------------------------------
    def select(
        self,
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
        """Boolean array (shape of ``x``) with exactly ``k`` selected candidates.

        Candidates are positions where ``mask == among_active`` and, for ``sign='positive'``,
        ``x > 0`` (``'nonpositive'``: ``x <= 0``, -0.0 included). The score is ``|x|`` if
        ``magnitude`` else ``x``. Order: module docstring. ``0 <= k <= #candidates`` is the
        caller's duty. Default: :func:`sparsecore.selection.select`.
        """
        return selection.select(
            self, x, mask, k, among_active=among_active, largest=largest, magnitude=magnitude,
            key=key, sign=sign,
        )  # fmt: skip

    def select_per_unit(
        self,
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
        """Like :meth:`select`, with ``ks[j]`` positions chosen inside each output unit ``j``.

        The tie hash uses the position's flat index in the whole layer, so a per-unit selection
        is the same as selecting within the unit's slice of the layer. Default:
        :func:`sparsecore.selection.select_per_unit`.
        """
        return selection.select_per_unit(
            self, x, mask, ks, axis=axis, among_active=among_active, largest=largest,
            magnitude=magnitude, key=key,
        )  # fmt: skip

    # -- optional capability: the fused update ------------------------------------------------
    # The engine runs magnitude pruning + momentum growth (any built-in redistribution) through
    # these two calls when a backend offers them, so that the update reads each layer twice
    # instead of a dozen times. Budgets stay with the engine's shared host routine in between.
    supports_fused_update: bool = False

    def fused_scan(self, layers: Sequence[Layer], *, source: str | None) -> list[LayerScan] | None:
        """Per layer: ``nnz``, and the ``|x|`` sums of ``source`` (``'momentum'``, ``'weight'``
        or None for no sums), checking momentum (and the source) for NaN/Inf on the way.

        None means "not for these layers" (e.g. a dtype the fused kernels do not handle); the
        engine then takes the generic path. Changes nothing.
        """
        return None

    def fused_prune_regrow(
        self,
        layers: Sequence[Layer],
        nnz: Sequence[int],
        prune_counts: Sequence[int],
        grow_counts: Sequence[int],
        keys: Sequence[HashKey],
    ) -> list[FusedLayer] | None:
        """Per layer (``nnz`` as :meth:`fused_scan` found it): remove the ``prune_counts[l]`` active weights of smallest ``|w|``, then
        activate the ``grow_counts[l]`` positions inactive after that with largest ``|momentum|``
        (ties as in :meth:`select`), and return the new masks and the weights under them (as
        :meth:`apply` would give). New arrays only: the inputs are not changed.

        Returns None, having changed nothing, if a weight is NaN or Inf (the engine then raises
        the generic path's error). The caller guarantees ``0 <= prune_counts[l] <= nnz`` and
        ``0 <= grow_counts[l] <= size - nnz + prune_counts[l]``.
        """
        return None

    # -- element-wise -----------------------------------------------------------------------
    def position_hash(self, key: HashKey, like: Any) -> Any:
        """Hash (integer array, the shape of ``like``) of every position; ranks like uint32.
        Default: hashed on the host (:func:`sparsecore.hashing.layer_hash`) and moved over."""
        return self.from_numpy(layer_hash(key, self.shape(like)), like)

    def and_not(self, a: Any, b: Any) -> Any:
        """``a & ~b`` on boolean arrays (a new array)."""
        return self.where(b, False, a)

    def logical_or(self, a: Any, b: Any) -> Any:
        """``a | b`` on boolean arrays (a new array)."""
        return self.where(a, True, b)

    def zeros_mask(self, like: Any) -> Any:
        """A boolean array of ``like``'s shape (and device), all False."""
        shape = self.shape(like)
        nothing = self.from_numpy(np.zeros(0, dtype=np.int64), like)
        return self.reshape(self.mark(nothing, math.prod(shape), like), shape)

    def apply(self, weight: Any, old_mask: Any, new_mask: Any) -> Any:
        """Weights under the new mask: kept where active before and after, exactly +0 elsewhere.

        Returns a new array; adapters that update parameters in place do so themselves.
        """
        return self.where(self.where(old_mask, new_mask, False), weight, 0.0)

    def signed_fill(self, x: Any, where: Any, value: float, key: HashKey) -> Any:
        """A copy of ``x`` with the positions where ``where`` is True set to ``+value`` or
        ``-value`` in ``x``'s dtype: ``+value`` where the position hash of ``key`` is odd.

        The values of weights grown into dead units (ALGORITHM.md, "Dead units"): random signs
        that every backend draws identically.
        """
        odd = self.from_numpy((layer_hash(key, self.shape(x)) & 1).astype(bool), x)
        plus = self.where(self.where(where, odd, False), value, x)
        return self.where(self.where(odd, False, where), -value, plus)


#: What a backend implements (one line each on an array library); everything else has a default.
REQUIRED_PRIMITIVES = (
    "owns", "shape", "dtype_kind", "from_numpy", "reshape", "moveaxis", "abs", "positive",
    "isfinite", "where", "nonzero", "take", "mark", "argsort", "sum",
)  # fmt: skip


# -- the registry ---------------------------------------------------------------------------------
# Backends by name, created on first use from a factory. The core registers its own
# (sparsecore.builtin_backends); a framework's package announces its backend as an entry point
# of the group "sparsecore.backends", named for the framework module whose arrays it takes
# ("torch" for the PyTorch adapter's), and registers it on import as well.
ENTRY_POINT_GROUP = "sparsecore.backends"

_REGISTRY: dict[str, ArrayBackend] = {}
_FACTORIES: dict[str, tuple[Callable[[], ArrayBackend], str | None]] = {}
_entry_points_read = False


def register_backend(backend: ArrayBackend) -> None:
    """Make ``backend`` available by name and to :func:`backend_for`."""
    _REGISTRY[backend.name] = backend


def register_backend_factory(
    name: str, factory: Callable[[], ArrayBackend], *, framework: str | None = None
) -> None:
    """Make backend ``name`` available, created by ``factory()`` when first asked for.

    ``framework``: the module whose arrays it takes (``"torch"``); :func:`backend_for` tries it
    only once that module is imported, so that looking up an array never imports a framework.
    An existing backend of that name is kept.
    """
    _FACTORIES.setdefault(name, (factory, framework))


def _read_entry_points() -> None:
    """Register the factories the installed packages announce (once)."""
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        register_backend_factory(entry.name, _loader(entry), framework=entry.name)


def _loader(entry: metadata.EntryPoint) -> Callable[[], ArrayBackend]:
    def load() -> ArrayBackend:
        backend = entry.load()()
        if not isinstance(backend, ArrayBackend):
            raise SparseCoreError(
                f"entry point {entry.name!r} of {ENTRY_POINT_GROUP!r} ({entry.value}) gave "
                f"{type(backend).__name__}, not an ArrayBackend"
            )
        return backend

    return load


def get_backend(name: str) -> ArrayBackend:
    """The backend called ``name`` (``'numpy'``, ``'numba'``, ``'torch'``, ...)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in _FACTORIES:
        _read_entry_points()
    if name not in _FACTORIES:
        known = sorted({*_REGISTRY, *_FACTORIES})
        raise SparseCoreError(f"unknown backend {name!r}; known backends: {known}")
    backend = _FACTORIES[name][0]()
    _REGISTRY.setdefault(name, backend)
    return _REGISTRY[name]


def backend_for(x: Any) -> ArrayBackend:
    """The backend that owns array ``x``.

    Like einops, a framework's backend is only considered when that framework is already imported
    (it is in ``sys.modules``), so looking up a NumPy array never imports torch or tensorflow.
    The backend named for the module that defines ``x``'s type is asked first (a torch tensor goes
    to the torch backend even when the Keras backend, which also accepts torch tensors, was
    loaded first); then every other backend, in registration order.
    """
    if isinstance(x, np.ndarray):
        return get_backend("numpy")
    _read_entry_points()
    home = type(x).__module__.partition(".")[0]
    names = [home] if home in _REGISTRY or home in _FACTORIES else []
    for name in [*_REGISTRY, *_FACTORIES]:
        framework = _FACTORIES[name][1] if name in _FACTORIES else None
        if name not in names and (framework is None or framework in sys.modules):
            names.append(name)
    for name in names:
        backend = get_backend(name)
        if backend.owns(x):
            return backend
    raise SparseCoreError(
        f"no sparsecore backend for arrays of type {type(x).__module__}.{type(x).__name__}"
    )
