"""The mask of a sparse Keras weight, applied inside the compiled train step and saved with the model.

Keras applies a variable's ``constraint`` right after the optimizer updates it, inside the compiled
train step, on every backend. :class:`SparseMask` is such a constraint: it holds the mask in a
non-trainable boolean ``keras.Variable`` and zeroes the weight outside it, so weights outside the
mask are exactly +0 after every batch with no Python work per batch.

The zeroing runs once per step on every sparse kernel, so its cost counts: it is a bitwise AND of
the weight's bits with a second, integer copy of the mask (all ones where active, 0 elsewhere),
one streaming pass that gives exactly +0 outside the mask (whatever the value there, NaN
included) and leaves active weights bit for bit. ``where(mask, w, 0)`` does the same but costs
2-4 times as much on CPU (TensorFlow's select kernel, and PyTorch's ``where`` far more), and a
product with a float mask would leave -0.0 and NaN behind.

Why a constraint carries the saved state: Keras 3 locks a built layer's variables, and a layer's
``save_own_variables`` (Dense, Embedding) writes only the variables the layer itself declares, so
an extra mask variable on the layer would be neither saved nor recreated by ``load_model``. A
constraint, though, is part of the layer's config (``kernel_constraint`` etc.). A registered
constraint class whose config holds the mask (bit-packed, base64) and the engine state is written
by ``model.save()`` and ``ModelCheckpoint`` and rebuilt by ``keras.models.load_model``, which
recreates the layer with the mask already in force; ``SparseCallback`` then finds the masks and the
engine state there and continues the run.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

__all__ = ["SparseMask", "pack_mask", "unpack_mask"]

# The integer type with the bit width of each floating type (for the bitwise mask).
_BITS = {"float16": "int16", "bfloat16": "int16", "float32": "int32", "float64": "int64"}


def pack_mask(mask: np.ndarray) -> str:
    """A boolean array as base64 of its C-order bits (1 bit per position)."""
    bits = np.packbits(np.asarray(mask, dtype=bool).reshape(-1))
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_mask(text: str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_mask` for an array of ``shape``."""
    n = int(np.prod(shape, dtype=np.int64))
    bits = np.frombuffer(base64.b64decode(text.encode("ascii")), dtype=np.uint8)
    if bits.size != (n + 7) // 8:
        raise ValueError(f"packed mask holds {bits.size * 8} bits, shape {shape} needs {n}")
    return np.unpackbits(bits, count=n).astype(bool).reshape(shape)


@keras.saving.register_keras_serializable(package="sparsecore", name="SparseMask")
class SparseMask(keras.constraints.Constraint):
    """Keeps a weight at exactly 0 outside its mask after every optimizer step.

    ``name`` is the sparse weight's name in the run, ``index`` its position among the run's sparse
    weights, ``axis`` its output axis, ``dtype`` the weight's dtype (for the bitwise mask). ``mask`` (packed) and ``ever_active`` (packed) and ``state``
    (the engine state, JSON, kept by the constraint of the first weight) are what a saved model
    needs to continue training; they are read from the live objects whenever the config is taken.
    """

    def __init__(
        self,
        shape: tuple[int, ...] | list[int],
        name: str = "",
        index: int = 0,
        axis: int = -1,
        mask: str | np.ndarray | None = None,
        ever_active: str | None = None,
        state: str | None = None,
        dtype: str = "float32",
    ) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.name = name
        self.index = int(index)
        self.axis = int(axis)
        if isinstance(mask, str):
            initial = unpack_mask(mask, self.shape)
        elif mask is None:
            initial = np.ones(self.shape, dtype=bool)
        else:
            initial = np.asarray(mask, dtype=bool)
        self.mask = keras.Variable(
            initial, dtype="bool", trainable=False, name="sparsecore_mask", aggregation="none"
        )
        self.dtype = keras.backend.standardize_dtype(dtype)
        bits = _BITS.get(self.dtype)
        # The mask as the weight's bits: -1 (all ones) where active, 0 elsewhere.
        self.keep = (
            None
            if bits is None
            else keras.Variable(
                _keep_bits(initial, bits),
                dtype=bits,
                trainable=False,
                name="sparsecore_keep",
                aggregation="none",
            )
        )
        self.ever_active = None if ever_active is None else unpack_mask(ever_active, self.shape)
        self.state: dict[str, Any] | None = None if state is None else json.loads(state)
        # Set by SparseCallback: gives the live (engine state, ever-active mask) of this weight.
        self.provider: Callable[[int], tuple[dict[str, Any] | None, np.ndarray | None]] | None = (
            None
        )

    def __call__(self, w: Any) -> Any:
        dtype = keras.backend.standardize_dtype(w.dtype)
        if self.keep is not None and _BITS.get(dtype) == self.keep.dtype:
            bits = ops.bitwise_and(ops.view(w, self.keep.dtype), self.keep)
            return ops.view(bits, dtype)
        return ops.where(self.mask, w, ops.zeros_like(w))

    def assign(self, mask: Any) -> None:
        """Set a new mask (boolean tensor or array of the weight's shape) in both its forms."""
        self.mask.assign(mask)
        if self.keep is not None:
            self.keep.assign(
                ops.negative(ops.cast(ops.convert_to_tensor(mask), self.keep.dtype))
                if not isinstance(mask, np.ndarray)
                else _keep_bits(mask, self.keep.dtype)
            )

    def mask_numpy(self) -> np.ndarray:
        return np.asarray(ops.convert_to_numpy(self.mask.value), dtype=bool)

    def snapshot(self) -> tuple[dict[str, Any] | None, np.ndarray | None]:
        """The engine state (first weight only) and ever-active mask, live if a run is attached."""
        if self.provider is not None:
            self.state, self.ever_active = self.provider(self.index)
        return self.state, self.ever_active

    def get_config(self) -> dict[str, Any]:
        self.snapshot()
        return {
            "shape": list(self.shape),
            "name": self.name,
            "index": self.index,
            "axis": self.axis,
            "mask": pack_mask(self.mask_numpy()),
            "ever_active": None if self.ever_active is None else pack_mask(self.ever_active),
            "state": None if self.state is None else json.dumps(self.state),
            "dtype": self.dtype,
        }


def _keep_bits(mask: np.ndarray, bits: str) -> np.ndarray:
    return -np.asarray(mask, dtype=bool).astype(bits)
