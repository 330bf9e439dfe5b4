"""Raw bits in compiled code: the rank key of a score, the candidate test, the position hash,
the array layout the kernels read, and the tuning constants every part shares.

A score's *rank key* is an unsigned integer whose order is the selection order (see the
package docstring); :func:`rank_params` prepares the constants that compute it without branches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from ..backend import Sign
from ..hashing import MASK32, MIX_CONSTANTS, mix

DIGIT_BITS = 16  # key bits counted by the full-layer histogram of the guaranteed path
MIN_CHUNK = 1 << 16  # a pass gets one thread per this many elements, at most the thread count
# A fused update of fewer weights than this runs on the calling thread alone: handing work to the
# pool and back costs more than it saves there (measured on 2 cores: 0.93 ms serial against
# 1.30 ms on two threads for LeNet-300-100's 266k weights; even at 2.1M weights; 2 threads
# win from about 3M).
PARALLEL_MIN = 1 << 21
SMALL_LAYER = 1 << 14  # layers up to this size are selected by one serial gather and narrowing
SAMPLE_SHIFT, MIN_SAMPLES, MAX_SAMPLES = 7, 2048, 65536  # sample n/128 positions, clipped
DECIDE_BLOCK = 2048  # fused pass 2 works in blocks that stay in L1 for their second look
DENSE_MIN, DENSE_RATE = 1 << 16, 32  # layers this large refine the intervals on n/32 samples
LANES = 8  # sample runs read side by side, so that their cache misses overlap
SPREAD = 3.5  # half-width of the sampled interval in standard deviations of the k-th rank

_U64_MASK32 = np.uint64(MASK32)
_U64_MIX = tuple(np.uint64(c) for c in MIX_CONSTANTS)  # uint64 shifts: no float64 detour
_REASSOC = {"reassoc", "contract", "nsz"}  # lets exact float64 sums vectorise (order is free)

# Indices into the rank-parameter tuple built by :func:`rank_params` (all uint64).
_AMONG, _ANY, _WANT_POS, _POS_SIGN, _MAG, _BASE, _SIGNED, _FLIP, _SIGN_SHIFT = range(9)


def _jit(**options: Any) -> Callable[[Any], Any]:
    """``numba.njit(cache=True, ...)``, without the cache where no cache directory is writable."""

    def decorate(fn: Any) -> Any:
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # Numba found no writable cache location for this file
            return numba.njit(cache=False, **options)(fn)

    return decorate


# -- scalar helpers (inlined into the kernels) --------------------------------------------------


_mix_u64 = _jit(inline="always")(mix)  # hashing.mix itself, compiled


@_jit(inline="always")
def _mix(x):  # pragma: no cover - jitted
    """hashing.mix on a uint64 holding a 32-bit value."""
    return _mix_u64(x, _U64_MIX)


@_jit(inline="always")
def _hash(i, prefix):  # pragma: no cover - jitted
    return _mix((np.uint64(i) & _U64_MASK32) ^ prefix)


@_jit(inline="always")
def _key(b, p):  # pragma: no cover - jitted
    """Rank key of raw value ``b`` (uint64): a larger key comes earlier in the selection order.

    ``base + (+-magnitude)``, the sign taken from the sign bit when ranking signed floats
    (``(m ^ s) - s`` negates ``m`` when ``s`` is all ones), then complemented for "smallest first".
    """
    s = (np.uint64(0) - ((b >> p[_SIGN_SHIFT]) & np.uint64(1))) & p[_SIGNED]
    return (p[_BASE] + (((b & p[_MAG]) ^ s) - s)) ^ p[_FLIP]


@_jit(inline="always")
def _candidate(b, m, p):  # pragma: no cover - jitted
    """Is raw value ``b`` with mask bit ``m`` a candidate (mask side and sign filter)?"""
    positive = (b != np.uint64(0)) & ((b & p[_POS_SIGN]) == np.uint64(0))
    sign_ok = (p[_ANY] != np.uint64(0)) | (np.uint64(positive) == p[_WANT_POS])
    return (np.uint64(m) == p[_AMONG]) & sign_ok


@_jit(inline="always")
def _half_abs(b):  # pragma: no cover - jitted
    """``|x|`` of a float16 given by its bits, exactly, as float64 (Numba has no CPU float16)."""
    exponent = (b >> np.uint64(10)) & np.uint64(0x1F)
    mantissa = np.float64(b & np.uint64(0x3FF))
    if exponent == np.uint64(0):
        return mantissa * 2.0**-24
    return (1024.0 + mantissa) * 2.0 ** (np.float64(exponent) - 25.0)


_UINT_OF_SIZE = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_EXPONENT_MASK = {2: 0x7C00, 4: 0x7F800000, 8: 0x7FF0000000000000}


def _flat(x: Any) -> np.ndarray:
    """``x`` as a flat C-order array the kernels can read as raw bits.

    Strided, Fortran-order and 0-d inputs are copied to C order (``ascontiguousarray``), floats
    in the other byte order are converted to the native one (the kernels read raw bits, which
    would be byte-swapped otherwise), and read-only arrays are copied, so that one compiled
    specialisation per dtype serves every input. Boolean masks need nothing: the kernels read
    any nonzero byte as True, as NumPy does.
    """
    a = np.ascontiguousarray(x)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    elif not a.flags.writeable:
        a = a.copy()
    return a.reshape(-1)


def rank_params(
    dtype: np.dtype, *, among_active: bool, largest: bool, magnitude: bool, sign: Sign
) -> tuple[np.uint64, ...] | None:
    """The constants of the branch-free rank key and candidate test, or None if unsupported.

    Floats and unsigned integers are supported; other dtypes use the NumPy reference.
    """
    if dtype.kind not in "fu" or dtype.itemsize not in _UINT_OF_SIZE:
        return None
    width = 8 * dtype.itemsize
    top = 1 << (width - 1)
    full = (1 << width) - 1
    is_float = dtype.kind == "f"
    signed = is_float and not magnitude
    values = {
        _AMONG: int(bool(among_active)),
        _ANY: int(sign == "any"),
        _WANT_POS: int(sign == "positive"),
        _POS_SIGN: top if is_float else 0,  # unsigned values are positive when non-zero
        _MAG: top - 1 if is_float else full,
        _BASE: top if signed else 0,
        _SIGNED: (1 << 64) - 1 if signed else 0,
        _FLIP: 0 if largest else full,
        _SIGN_SHIFT: width - 1,
    }
    return tuple(np.uint64(values[i]) for i in range(len(values)))
