"""The position hash that breaks ties and draws random positions identically everywhere.

ALGORITHM.md fixes the function so that NumPy, Numba, PyTorch, TensorFlow and CUDA produce the same
bits: 32-bit unsigned arithmetic, ``mix`` is a well-known 32-bit finaliser (a bijection on 32-bit
words), and ``h(seed, u, layer, i) = mix(i ^ mix(layer ^ mix(u ^ mix(seed))))``. Because ``mix`` is a
bijection, positions of one layer (flat index below 2**32) never share a hash within an update.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

MASK32 = 0xFFFFFFFF
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B


def mix32(x: int) -> int:
    """The 32-bit mixing function on a Python integer (host side)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    x ^= x >> 16
    return x


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


def mix32_array(x: np.ndarray) -> np.ndarray:
    """``mix32`` elementwise on a uint32 array (wrapping multiplication).

    Only array methods and operators are used, so a CuPy array is hashed on its device.
    """
    x = x.astype(np.uint32, copy=True)
    x ^= x >> np.uint32(16)
    x *= np.uint32(MUL1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(MUL2)
    x ^= x >> np.uint32(16)
    return x


def position_hash(key: HashKey, ids: np.ndarray) -> np.ndarray:
    """Hash of the flat C-order positions ``ids`` of one layer, as uint32 (NumPy or CuPy)."""
    ids = ids if hasattr(ids, "astype") else np.asarray(ids)
    low = (ids.astype(np.int64) & MASK32).astype(np.uint32)
    return mix32_array(low ^ np.uint32(key.prefix()))


def layer_hash(key: HashKey, shape: tuple[int, ...]) -> np.ndarray:
    """Hash of every position of a layer of ``shape``, in that shape."""
    n = int(np.prod(shape, dtype=np.int64))
    return position_hash(key, np.arange(n, dtype=np.int64)).reshape(shape)
