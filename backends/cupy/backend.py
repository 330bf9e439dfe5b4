"""The CuPy backend: a mask update on GPU arrays, equal to the NumPy reference.

The operations are those of the NumPy reference, written once against an *array module* ``xp``
(:class:`sparsecore.backend_numpy.ArrayModuleBackend`), with one difference that matters on a GPU:
CUDA code may flush subnormal ``float32`` values to zero in arithmetic and comparisons, so
``x > 0``, ``|x|`` and a float64 sum would see 0 where NumPy sees 1.4e-45. Selection, the sign
test of SET pruning and the sums therefore go through the floats' bit patterns (integers are never
flushed): :class:`BitPatternBackend` holds that logic for any array module, and
:class:`CupyBackend` is it with ``xp = cupy``. With ``xp = numpy`` it is tested against the
reference on every machine; on a GPU, with CuPy itself. Only counts and float64 sums come back to
the host.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsecore.backend import Sign, register_backend_factory
from sparsecore.backend_numpy import ArrayModuleBackend
from sparsecore.hashing import HashKey

__all__ = ["ArrayModuleBackend", "BitPatternBackend", "CupyBackend"]

# float32 bit patterns below this (exponent field 0) are +0 or subnormal.
_F32_MIN_NORMAL_BITS = 0x00800000
_F32_SUBNORMAL_UNIT = 2.0**-149  # value of the subnormal float32 with mantissa 1 (a normal float64)


class BitPatternBackend(ArrayModuleBackend):
    """:class:`ArrayModuleBackend` that orders, sign-tests and sums floats by their bit patterns.

    The rank key of a score is an int64 whose order is the score's order: ``|x|`` is the bit
    pattern with the sign bit cleared (non-negative floats order like their bit patterns), signed
    ``x`` is that magnitude negated when the sign bit is set (so -0.0 and +0.0 tie, as in the
    reference). Equal floats have equal keys and vice versa (NaN is refused before any update),
    so every selection, tie group included, is the reference's.
    """

    name = "bit-pattern"

    def _magnitude_bits(self, x: Any) -> Any:
        """``|x|`` as an int64 array of bit patterns (float16, float32 or float64 input)."""
        xp = self.xp
        width = x.dtype.itemsize * 8
        unsigned = {16: xp.uint16, 32: xp.uint32, 64: xp.uint64}[width]
        magnitude = x.view(unsigned) & unsigned((1 << (width - 1)) - 1)
        return magnitude.astype(xp.int64)

    def _sign_bit(self, x: Any) -> Any:
        xp = self.xp
        width = x.dtype.itemsize * 8
        signed = {16: xp.int16, 32: xp.int32, 64: xp.int64}[width]
        return x.view(signed) < 0

    def _positive(self, x: Any) -> Any:
        """``x > 0`` decided on the bit pattern (a subnormal positive value counts)."""
        return ~self._sign_bit(x) & (self._magnitude_bits(x) != 0)

    def _abs_float64(self, x: Any) -> Any:
        """``|x|`` converted exactly to float64, subnormal float32 values included."""
        xp = self.xp
        if x.dtype != xp.float32:
            return xp.abs(x).astype(xp.float64)
        bits = self._magnitude_bits(x)
        normal = bits.astype(xp.uint32).view(xp.float32).astype(xp.float64)
        subnormal = bits.astype(xp.float64) * _F32_SUBNORMAL_UNIT
        return xp.where(bits < _F32_MIN_NORMAL_BITS, subnormal, normal)

    # -- primitives and reductions -------------------------------------------------------
    def positive(self, x: Any) -> Any:
        return self._positive(x) if x.dtype.kind == "f" else super().positive(x)

    def count_positive(self, x: Any, mask: Any) -> int:
        return int(self.xp.count_nonzero(mask & self._positive(x)))

    def abs_sum(self, x: Any, mask: Any | None) -> float:
        values = x if mask is None else x[mask]
        return float(self._abs_float64(values).sum())

    def unit_abs_sum(self, x: Any, axis: int) -> np.ndarray:
        xp = self.xp
        units = xp.moveaxis(self._abs_float64(x), axis, 0).reshape(x.shape[axis], -1)
        return np.asarray(self._host(units.sum(axis=1)), dtype=np.float64)

    # -- selection ----------------------------------------------------------------------
    def _scores(self, flat: Any, positions: Any, magnitude: bool) -> Any:
        values = flat[positions]
        if values.dtype.kind != "f":  # integer scores (random growth ranks the hash): exact already
            return super()._scores(flat, positions, magnitude)
        keys = self._magnitude_bits(values)
        return keys if magnitude else self.xp.where(self._sign_bit(values), -keys, keys)

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
        if sign in ("positive", "nonpositive"):
            # Fold the sign filter into the candidate mask, decided on bit patterns.
            keep = self._positive(x) if sign == "positive" else ~self._positive(x)
            mask = mask & keep if among_active else mask | ~keep
        return super().select(
            x, mask, k, among_active=among_active, largest=largest, magnitude=magnitude, key=key
        )


class CupyBackend(BitPatternBackend):
    """The backend interface on ``cupy.ndarray`` (arrays on the current CuPy device)."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy

        super().__init__(cupy)


# Also announced as the "cupy" entry point (pyproject.toml); registered here too, so that importing
# sparsecore.cupy is enough even where the package metadata lacks it.
register_backend_factory("cupy", CupyBackend, framework="cupy")
