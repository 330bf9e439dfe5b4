"""The position hash that breaks ties and draws random positions identically everywhere.

ALGORITHM.md fixes the function so that NumPy, Numba, PyTorch, TensorFlow and CUDA produce the same
bits: 32-bit unsigned arithmetic, ``mix`` is a well-known 32-bit finaliser (a bijection on 32-bit
words), and ``h(seed, u, layer, i) = mix(i ^ mix(layer ^ mix(u ^ mix(seed))))``. Because ``mix`` is a
bijection, positions of one layer (flat index below 2**32) never share a hash within an update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

MASK32 = 0xFFFFFFFF
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B

#: The constants of :func:`mix` as Python ints: the two shifts, the two multipliers, the 32-bit mask.
MIX_CONSTANTS = (16, 15, MUL1, MUL2, MASK32)


def mix(x: Any, c: tuple[Any, ...] = MIX_CONSTANTS) -> Any:
    """The 32-bit mixing function, the one definition every backend runs.

    ``x`` holds 32-bit values in any integer type whose ``^ >> * &`` wrap: a Python int, a NumPy
    or CuPy ``uint32``/``int64`` array, a torch ``int64`` tensor, a Numba ``uint64`` (the Numba
    backend compiles this very function), a Keras tensor behind :class:`IntOps`-like operators.
    ``c`` gives :data:`MIX_CONSTANTS` in ``x``'s own type where mixing types would widen (Numba:
    ``uint64`` shifts, else it computes in float64). The mask after each product keeps the low 32
    bits in wider types (64-bit multiplication wraps, so those bits are exact).

    Arrays are updated in place where the type allows (no temporary per step): pass one you own.
    """
    s16, s15, m1, m2, low = c
    x ^= x >> s16
    x *= m1
    x &= low
    x ^= x >> s15
    x *= m2
    x &= low
    x ^= x >> s16
    return x


def mix32(x: int) -> int:
    """The 32-bit mixing function on a Python integer (host side)."""
    return int(mix(x & MASK32))


class HashKey(NamedTuple):
    """What a position hash depends on besides the position: run seed, update index, layer index.

    ``u = 0`` is the initial mask; mask update ``u`` uses ``u = 1, 2, ...``.
    """

    seed: int
    update: int
    layer: int

    def prefix(self) -> int:
        """``mix(layer ^ mix(u ^ mix(seed)))``: the part shared by every position of the layer."""
        return mix32(self.layer ^ mix32(self.update ^ mix32(self.seed)))


_UINT32_MIX = tuple(np.uint32(c) for c in MIX_CONSTANTS)


def mix32_array(x: np.ndarray) -> np.ndarray:
    """:func:`mix` elementwise on a copy of ``x`` as uint32 (wrapping multiplication).

    Only array methods and operators are used, so a CuPy array is hashed on its device.
    """
    return mix(x.astype(np.uint32, copy=True), _UINT32_MIX)


def position_hash(key: HashKey, ids: np.ndarray) -> np.ndarray:
    """Hash of the flat C-order positions ``ids`` of one layer, as uint32 (NumPy or CuPy)."""
    ids = ids if hasattr(ids, "astype") else np.asarray(ids)
    low = (ids.astype(np.int64) & MASK32).astype(np.uint32)
    return mix32_array(low ^ np.uint32(key.prefix()))


def layer_hash(key: HashKey, shape: tuple[int, ...]) -> np.ndarray:
    """Hash of every position of a layer of ``shape``, in that shape."""
    n = int(np.prod(shape, dtype=np.int64))
    return position_hash(key, np.arange(n, dtype=np.int64)).reshape(shape)
