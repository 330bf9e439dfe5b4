"""The array-backend interface: the few array operations a mask update needs.

The algorithm (``sparsecore.engine``) is written once against this interface. Each framework
implements it natively on its own tensors and device (NumPy and Numba here; PyTorch, Keras/TensorFlow
and CuPy in their packages), while every decision that is not an array operation (budgets, the
integer split, schedules) is made on the host by shared code, so all backends agree.

Selection order (ALGORITHM.md, "Determinism and ties"): candidates are ordered by score (ascending
for ``largest=False``, descending for ``largest=True``), then by the position hash (larger first),
then by lower flat index; the first ``k`` are selected. Within one layer the hash is a bijection of
the flat index, so the last rule only matters beyond 2**32 positions.
"""

from __future__ import annotations

import abc
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import SparseCoreError
from .hashing import HashKey

if TYPE_CHECKING:
    from .layers import Layer

Sign = Literal["any", "positive", "nonpositive"]


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

    Host values (counts, float64 sums) are returned as Python ``int``/``float`` or NumPy arrays;
    that is the only data that leaves the device during an update.
    """

    name: str = "abstract"

    # -- inspection -------------------------------------------------------------------------
    @abc.abstractmethod
    def owns(self, x: Any) -> bool:
        """True if ``x`` is an array of this backend's framework."""

    @abc.abstractmethod
    def shape(self, x: Any) -> tuple[int, ...]:
        """The shape as a tuple of Python ints."""

    @abc.abstractmethod
    def dtype_kind(self, x: Any) -> str:
        """``'f'`` floating, ``'b'`` boolean, ``'i'`` integer (signed or not), ``'c'`` complex."""

    @abc.abstractmethod
    def all_finite(self, x: Any) -> bool:
        """True if no element is NaN or +-Inf."""

    # -- reductions (host results) ------------------------------------------------------------
    @abc.abstractmethod
    def count(self, mask: Any) -> int:
        """Number of True entries."""

    def counts(self, masks: Sequence[Any]) -> list[int]:
        """:meth:`count` of every mask. Backends of a device override it to bring all the
        counts back in one transfer: the engine counts every layer's mask twice per update."""
        return [self.count(m) for m in masks]

    @abc.abstractmethod
    def count_positive(self, x: Any, mask: Any) -> int:
        """Number of active positions (``mask`` True) whose value is > 0 (SET pruning)."""

    @abc.abstractmethod
    def abs_sum(self, x: Any, mask: Any | None) -> float:
        """Sum of ``|x|`` over positions where ``mask`` is True (all if None), accumulated in float64."""

    @abc.abstractmethod
    def unit_abs_sum(self, x: Any, axis: int) -> np.ndarray:
        """Per output unit (index along ``axis``), the float64 sum of ``|x|``; a host array."""

    @abc.abstractmethod
    def unit_count(self, mask: Any, axis: int, active: bool) -> np.ndarray:
        """Per output unit, the number of positions where ``mask == active``; a host int64 array."""

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
    @abc.abstractmethod
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
        caller's duty.
        """

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
        is the same as selecting within the unit's slice of the layer.
        """
        raise NotImplementedError(f"backend {self.name!r} does not implement select_per_unit")

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
    @abc.abstractmethod
    def position_hash(self, key: HashKey, like: Any) -> Any:
        """Hash (integer array, the shape of ``like``) of every position; ranks like uint32."""

    @abc.abstractmethod
    def and_not(self, a: Any, b: Any) -> Any:
        """``a & ~b`` on boolean arrays (a new array)."""

    @abc.abstractmethod
    def logical_or(self, a: Any, b: Any) -> Any:
        """``a | b`` on boolean arrays (a new array)."""

    @abc.abstractmethod
    def zeros_mask(self, like: Any) -> Any:
        """A boolean array of ``like``'s shape (and device), all False."""

    @abc.abstractmethod
    def apply(self, weight: Any, old_mask: Any, new_mask: Any) -> Any:
        """Weights under the new mask: kept where active before and after, exactly +0 elsewhere.

        Returns a new array; adapters that update parameters in place do so themselves.
        """

    def signed_fill(self, x: Any, where: Any, value: float, key: HashKey) -> Any:
        """A copy of ``x`` with the positions where ``where`` is True set to ``+value`` or
        ``-value`` in ``x``'s dtype: ``+value`` where the position hash of ``key`` is odd.

        The values of weights grown into dead units (ALGORITHM.md, "Dead units"): random signs
        that every backend draws identically.
        """
        raise NotImplementedError(f"backend {self.name!r} does not implement signed_fill")


_REGISTRY: dict[str, ArrayBackend] = {}
_FACTORIES: list[tuple[str, str, str]] = [
    # (backend name, module that defines the framework type, module:attribute of the factory)
    ("torch", "torch", "sparsecore.torch.backend:TorchBackend"),
    ("cupy", "cupy", "sparsecore.cupy.backend:CupyBackend"),
    ("keras", "keras", "sparsecore.keras.backend:KerasBackend"),
]


def register_backend(backend: ArrayBackend) -> None:
    """Make ``backend`` available by name and to :func:`backend_for`."""
    _REGISTRY[backend.name] = backend


def get_backend(name: str) -> ArrayBackend:
    """The backend called ``name`` (``'numpy'``, ``'numba'``, ``'torch'``, ...)."""
    if name not in _REGISTRY:
        _load_builtin(name)
    if name not in _REGISTRY:
        known = sorted({*_REGISTRY, "numpy", "numba", *(f[0] for f in _FACTORIES)})
        raise SparseCoreError(f"unknown backend {name!r}; known backends: {known}")
    return _REGISTRY[name]


def backend_for(x: Any) -> ArrayBackend:
    """The backend that owns array ``x``.

    Like einops, a framework's backend is only considered when that framework is already imported
    (it is in ``sys.modules``), so looking up a NumPy array never imports torch or tensorflow.
    """
    if isinstance(x, np.ndarray):
        return get_backend("numpy")
    # Built-in backends first, in a fixed preference order (a torch tensor goes to the torch
    # backend even when the Keras backend, which also accepts torch tensors, was loaded first).
    for name, framework, _ in _FACTORIES:
        if framework in sys.modules:
            backend = get_backend(name)
            if backend.owns(x):
                return backend
    for backend in list(_REGISTRY.values()):
        if backend.owns(x):
            return backend
    raise SparseCoreError(
        f"no sparsecore backend for arrays of type {type(x).__module__}.{type(x).__name__}"
    )


def _load_builtin(name: str) -> None:
    import importlib

    if name == "numpy":
        from .backend_numpy import NumpyBackend

        register_backend(NumpyBackend())
        return
    if name == "numba":
        from .backend_numba import NumbaBackend

        register_backend(NumbaBackend())
        return
    for fname, _, target in _FACTORIES:
        if fname == name:
            module_name, attr = target.split(":")
            module = importlib.import_module(module_name)
            register_backend(getattr(module, attr)())
            return
