"""The sparsecore array backend on ``keras.ops``: one implementation for every Keras 3 backend.

Everything is written with ``keras.ops``, so the same code runs on TensorFlow and PyTorch tensors
(and JAX) and stays on their device; only counts and float64 sums come back to the host.

Selection follows the order fixed by ALGORITHM.md (score, then position hash larger first) without
a stable sort: for each row the k-th best score is found by sorting, everything strictly better is
taken, and among the positions tied with it the ones with the largest hashes are taken. Hashes of
one layer are distinct (the hash is a bijection of the flat index), so that second cut is exact.
Scores are compared in float64, which holds every float16/32 value and every 32-bit hash exactly.

JAX computes in 32 bits unless ``jax_enable_x64`` is set, and would silently turn those float64
sums and int64 hashes into float32/int32 ones (other masks than the reference's). Every method of
:class:`KerasBackend` therefore runs under JAX's 64-bit mode (:func:`wide_scope`), which changes
nothing for the user's own arrays and nothing on the other Keras backends.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import keras
import numpy as np
from keras import ops

from sparsecore.backend import ArrayBackend, Sign, register_backend_factory
from sparsecore.hashing import MASK32, HashKey, mix

__all__ = ["KerasBackend", "wide_scope"]

_F = TypeVar("_F", bound=Callable[..., Any])


@contextlib.contextmanager
def wide_scope() -> Iterator[None]:
    """Within it, JAX computes with float64 and int64 (``jax_enable_x64``); elsewhere a no-op."""
    if keras.backend.backend() != "jax":
        yield
        return
    import jax

    if jax.config.read("jax_enable_x64"):
        yield
        return
    enable = getattr(jax, "enable_x64", None)
    if enable is not None:  # JAX >= 0.6
        with enable(True):
            yield
    else:  # older JAX
        from jax.experimental import enable_x64

        with enable_x64():
            yield


def _wide(method: _F) -> _F:
    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        with wide_scope():
            return method(*args, **kwargs)

    return run  # type: ignore[return-value]


def _to_host(x: Any) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x))


class _KerasInt:
    """An int64 Keras tensor with the operators :func:`sparsecore.hashing.mix` uses (``^ >> * &``),
    which TensorFlow tensors do not all have: the hash keeps its one definition."""

    __slots__ = ("t",)

    def __init__(self, t: Any) -> None:
        self.t = t

    @staticmethod
    def _of(other: Any) -> Any:
        return other.t if isinstance(other, _KerasInt) else ops.convert_to_tensor(other, "int64")

    def __xor__(self, other: Any) -> _KerasInt:
        return _KerasInt(ops.bitwise_xor(self.t, self._of(other)))

    def __rshift__(self, bits: int) -> _KerasInt:
        return _KerasInt(ops.right_shift(self.t, bits))

    def __mul__(self, other: Any) -> _KerasInt:
        return _KerasInt(ops.multiply(self.t, self._of(other)))

    def __and__(self, other: Any) -> _KerasInt:
        return _KerasInt(ops.bitwise_and(self.t, self._of(other)))


def _mix32(x: Any) -> Any:
    """:func:`sparsecore.hashing.mix` on an int64 tensor holding values in [0, 2**32)."""
    return mix(_KerasInt(x)).t


def _select_rows(keys: Any, hashes: Any, candidates: Any, ks: np.ndarray) -> Any:
    """In each row, the ``ks[row]`` candidates with the largest key (ties: largest hash).

    ``keys`` is float64 (rows, cols), ``hashes`` int64 in [0, 2**32), ``candidates`` boolean;
    ``0 <= ks[row] <= #candidates in row`` is the caller's duty. Returns a boolean (rows, cols).
    """
    rows = int(ops.shape(keys)[0])
    neg_inf = ops.full_like(keys, -np.inf)
    keys = ops.where(candidates, keys, neg_inf)
    ks_arr = np.asarray(ks, dtype=np.int64).reshape(rows)
    take = ks_arr > 0
    # k-th largest key per row (rows taking nothing use column 0, then are masked out).
    sorted_desc = ops.flip(ops.sort(keys, axis=1), axis=1)
    kth_index = ops.convert_to_tensor(np.maximum(ks_arr - 1, 0).reshape(rows, 1), dtype="int32")
    threshold = ops.take_along_axis(sorted_desc, kth_index, axis=1)
    better = ops.logical_and(ops.greater(keys, threshold), candidates)
    tied = ops.logical_and(ops.equal(keys, threshold), candidates)
    n_better = _to_host(ops.sum(ops.cast(better, "int64"), axis=1)).astype(np.int64)
    need = np.where(take, ks_arr - n_better, 0)
    # Among tied positions, the ``need`` largest hashes (hashes are distinct within a layer).
    tied_hashes = ops.where(tied, hashes, ops.full_like(hashes, -1))
    hashes_desc = ops.flip(ops.sort(tied_hashes, axis=1), axis=1)
    need_index = ops.convert_to_tensor(np.maximum(need - 1, 0).reshape(rows, 1), dtype="int32")
    hash_threshold = ops.take_along_axis(hashes_desc, need_index, axis=1)
    tied_taken = ops.logical_and(tied, ops.greater_equal(tied_hashes, hash_threshold))
    tied_taken = ops.logical_and(
        tied_taken, ops.convert_to_tensor((need > 0).reshape(rows, 1), dtype="bool")
    )
    selected = ops.logical_or(better, tied_taken)
    return ops.logical_and(selected, ops.convert_to_tensor(take.reshape(rows, 1), dtype="bool"))


def _select_flat(keys: Any, hashes: Callable[[], Any], candidates: Any, k: int) -> Any:
    """:func:`_select_rows` for one row, with partial selection (``top_k``) instead of a sort.

    A mask update picks a few percent of a layer, so finding the k-th key with ``top_k`` is much
    cheaper than sorting every position. ``hashes`` is called only when ties at the boundary
    must be broken (rare with float32 momentum), sparing the hash of the whole layer otherwise.
    """
    keys = ops.where(candidates, keys, ops.full_like(keys, -np.inf))
    n = int(ops.shape(keys)[0])
    n_candidates = int(_to_host(ops.sum(ops.cast(candidates, "int32"))))
    if 4 * n_candidates < n:
        # Few candidates (pruning among the active few percent): find the k-th key among
        # them only; the comparisons below still run on the whole layer.
        (where,) = ops.nonzero(candidates)
        pool = ops.take(keys, where)
    else:
        pool = keys
    values, _ = ops.top_k(pool, k, sorted=True)
    threshold = values[k - 1]
    better = ops.logical_and(ops.greater(keys, threshold), candidates)
    tied = ops.logical_and(ops.equal(keys, threshold), candidates)
    need = k - int(_to_host(ops.sum(ops.cast(better, "int32"))))
    n_tied = int(_to_host(ops.sum(ops.cast(tied, "int32"))))
    if need >= n_tied:
        return ops.logical_or(better, tied)
    # Hashes are below 2**32, exact in float64 (top_k does not take int64 on every backend).
    tied_hashes = ops.where(
        tied, ops.cast(hashes(), "float64"), ops.full_like(tied, -1.0, "float64")
    )
    hash_values, _ = ops.top_k(tied_hashes, need, sorted=True)
    chosen = ops.logical_and(tied, ops.greater_equal(tied_hashes, hash_values[need - 1]))
    return ops.logical_or(better, chosen)


class KerasBackend(ArrayBackend):
    """:class:`~sparsecore.ArrayBackend` on the tensors of the active Keras 3 backend."""

    name = "keras"

    # -- inspection -------------------------------------------------------------------------
    def owns(self, x: Any) -> bool:
        if isinstance(x, np.ndarray) or isinstance(x, keras.Variable):
            return False
        return bool(ops.is_tensor(x))

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in ops.shape(x))

    def dtype_kind(self, x: Any) -> str:
        dtype = keras.backend.standardize_dtype(x.dtype)
        if dtype == "bool":
            return "b"
        if dtype.startswith(("int", "uint")):
            return "i"
        if dtype.startswith("complex"):
            return "c"
        return "f"

    def all_finite(self, x: Any) -> bool:
        return bool(_to_host(ops.all(ops.isfinite(x))))

    # -- the required primitives (the rest is overridden below, for speed) ------------------
    def from_numpy(self, a: np.ndarray, like: Any) -> Any:
        if a.dtype == np.uint32:  # hashes: int64 sorts and compares on every Keras backend
            a = a.astype(np.int64)
        return ops.convert_to_tensor(a)

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return ops.reshape(x, shape)

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        return ops.moveaxis(x, source, destination)

    def abs(self, x: Any) -> Any:
        return ops.abs(x)

    def positive(self, x: Any) -> Any:
        return ops.greater(x, ops.zeros_like(x))

    def isfinite(self, x: Any) -> Any:
        return ops.isfinite(x)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return ops.where(cond, a, b)

    def nonzero(self, flat: Any) -> Any:
        return ops.cast(ops.nonzero(flat)[0], "int64")

    def take(self, flat: Any, index: Any) -> Any:
        return flat[index] if isinstance(index, slice) else ops.take(flat, index)

    def mark(self, positions: Any, size: int, like: Any) -> Any:
        ones = ops.ones(self.shape(positions), dtype="int32")
        marks = ops.scatter(ops.reshape(positions, (-1, 1)), ones, (size,))
        return ops.greater(marks, ops.zeros_like(marks))

    def argsort(self, flat: Any, *, descending: bool) -> Any:
        if keras.backend.backend() == "tensorflow":  # Keras' argsort is not stable there
            import tensorflow as tf

            direction = "DESCENDING" if descending else "ASCENDING"
            return ops.cast(tf.argsort(flat, direction=direction, stable=True), "int64")
        # torch and JAX sort stably; negated scores keep ties tied (-0.0 == +0.0)
        return ops.cast(ops.argsort(ops.negative(flat) if descending else flat), "int64")

    def sum(self, x: Any, axis: int | None = None) -> np.ndarray:
        dtype = "float64" if self.dtype_kind(x) == "f" else "int64"
        return _to_host(ops.sum(ops.cast(x, dtype), axis=axis))

    # -- reductions -------------------------------------------------------------------------
    def count(self, mask: Any) -> int:
        return int(_to_host(ops.sum(ops.cast(mask, "int64"))))

    def count_positive(self, x: Any, mask: Any) -> int:
        positive = ops.logical_and(mask, ops.greater(x, ops.zeros_like(x)))
        return self.count(positive)

    def abs_sum(self, x: Any, mask: Any | None) -> float:
        values = ops.abs(ops.cast(x, "float64"))
        if mask is not None:
            values = ops.where(mask, values, ops.zeros_like(values))
        return float(_to_host(ops.sum(values)))

    def _units(self, x: Any, axis: int) -> Any:
        shape = self.shape(x)
        moved = ops.moveaxis(x, axis, 0)
        return ops.reshape(moved, (shape[axis], -1))

    def unit_abs_sum(self, x: Any, axis: int) -> np.ndarray:
        units = self._units(ops.abs(ops.cast(x, "float64")), axis)
        return _to_host(ops.sum(units, axis=1)).astype(np.float64)

    def unit_count(self, mask: Any, axis: int, active: bool) -> np.ndarray:
        units = self._units(mask if active else ops.logical_not(mask), axis)
        return _to_host(ops.sum(ops.cast(units, "int64"), axis=1)).astype(np.int64)

    # -- selection --------------------------------------------------------------------------
    def _keys_and_candidates(
        self, x: Any, mask: Any, *, among_active: bool, largest: bool, magnitude: bool, sign: Sign
    ) -> tuple[Any, Any]:
        # Floating scores keep their dtype when it holds every value exactly after negation
        # (float16/32/64); integer scores (hashes below 2**32) go to float64, exact too.
        kind = self.dtype_kind(x)
        dtype = keras.backend.standardize_dtype(x.dtype)
        if kind != "f" or dtype == "bfloat16":
            values = ops.cast(x, "float64")
        elif dtype == "float16":
            values = ops.cast(x, "float32")
        else:
            values = x
        candidates = mask if among_active else ops.logical_not(mask)
        if sign != "any":
            positive = ops.greater(values, ops.zeros_like(values))
            candidates = ops.logical_and(
                candidates, positive if sign == "positive" else ops.logical_not(positive)
            )
        scores = ops.abs(values) if magnitude else values
        return (scores if largest else ops.negative(scores)), candidates

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
        shape = self.shape(x)
        if k <= 0:
            return self.zeros_mask(x)
        keys, candidates = self._keys_and_candidates(
            x, mask, among_active=among_active, largest=largest, magnitude=magnitude, sign=sign
        )
        chosen = _select_flat(
            ops.reshape(keys, (-1,)),
            lambda: ops.reshape(self.position_hash(key, x), (-1,)),
            ops.reshape(candidates, (-1,)),
            k,
        )
        return ops.reshape(chosen, shape)

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
        shape = self.shape(x)
        keys, candidates = self._keys_and_candidates(
            x, mask, among_active=among_active, largest=largest, magnitude=magnitude, sign="any"
        )
        hashes = self.position_hash(key, x)
        chosen = _select_rows(
            self._units(keys, axis),
            self._units(hashes, axis),
            self._units(candidates, axis),
            np.asarray(ks, dtype=np.int64),
        )
        # Undo the (move axis to front, flatten) of _units.
        moved_shape = (shape[axis], *(d for i, d in enumerate(shape) if i != axis % len(shape)))
        return ops.moveaxis(ops.reshape(chosen, moved_shape), 0, axis)

    # -- element-wise -----------------------------------------------------------------------
    def position_hash(self, key: HashKey, like: Any) -> Any:
        shape = self.shape(like)
        n = int(np.prod(shape, dtype=np.int64))
        ids = ops.bitwise_and(
            ops.arange(n, dtype="int64"), ops.convert_to_tensor(MASK32, dtype="int64")
        )
        prefix = ops.convert_to_tensor(key.prefix(), dtype="int64")
        return ops.reshape(_mix32(ops.bitwise_xor(ids, prefix)), shape)

    def and_not(self, a: Any, b: Any) -> Any:
        return ops.logical_and(a, ops.logical_not(b))

    def logical_or(self, a: Any, b: Any) -> Any:
        return ops.logical_or(a, b)

    def zeros_mask(self, like: Any) -> Any:
        return ops.zeros(self.shape(like), dtype="bool")

    def apply(self, weight: Any, old_mask: Any, new_mask: Any) -> Any:
        keep = ops.logical_and(old_mask, new_mask)
        return ops.where(keep, weight, ops.zeros_like(weight))

    def signed_fill(self, x: Any, where: Any, value: float, key: HashKey) -> Any:
        one = ops.convert_to_tensor(1, dtype="int64")
        odd = ops.equal(ops.bitwise_and(self.position_hash(key, x), one), one)
        magnitude = ops.full(self.shape(x), value, dtype=x.dtype)
        return ops.where(where, ops.where(odd, magnitude, ops.negative(magnitude)), x)


def _widen(cls: type) -> None:
    """Run every public method of ``cls`` under :func:`wide_scope`."""
    for attr, value in list(vars(cls).items()):
        if callable(value) and not attr.startswith("_"):
            setattr(cls, attr, _wide(value))


_widen(KerasBackend)


# Also announced as the "keras" entry point (pyproject.toml); registered here too, so that
# importing sparsecore.keras is enough even where the package metadata lacks it.
register_backend_factory("keras", KerasBackend, framework="keras")
