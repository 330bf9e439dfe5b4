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

Where the mask and the run's state are saved: Keras 3 locks a built layer's variables, and a
layer's ``save_own_variables`` (Dense, Embedding) writes only the variables the layer declares, so
an extra mask variable on the layer would be neither saved nor recreated by ``load_model``. The
constraint, though, is reachable from the layer (``kernel_constraint`` etc.), and Keras' saving
walks every :class:`KerasSaveable` it reaches from a layer. So :class:`SparseMask` is one: its
*config* holds only small metadata (shape, name, position, axis, dtype), while the mask (packed,
one bit per weight), the "ever active" positions and, on the run's first sparse weight, the
engine state (options, update counter, history) go to the weights file next to the kernel
(``save_own_variables``/``load_own_variables``). ``model.save()``, ``ModelCheckpoint`` and
``save_weights`` write them; ``keras.models.load_model`` recreates every layer with its mask in
force, and ``SparseCallback`` finds the masks and the engine state there and continues the run.

Files written before this layout kept the mask and state in the config (base64); they still load:
:class:`SparseMask` accepts those config keys, and an empty entry in the weights file leaves the
values from the config in place.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
from keras import ops

from sparsecore.errors import SparseCoreError

from .jax_step import traced_masks

try:  # the base class Keras' saving walks; private, hence guarded
    from keras.src.saving.keras_saveable import KerasSaveable
except ImportError as err:  # pragma: no cover - depends on the installed Keras
    raise ImportError(
        f"sparsecore.keras needs Keras 3.10 or newer (found {keras.__version__})"
    ) from err
if not hasattr(ops, "view"):  # pragma: no cover - the in-step mask is a bitwise view
    raise ImportError(f"sparsecore.keras needs Keras 3.10 or newer (found {keras.__version__})")

__all__ = ["STORE_VERSION", "SparseMask", "pack_mask", "unpack_mask"]

#: Layout of what :meth:`SparseMask.save_own_variables` writes (bumped if it changes).
STORE_VERSION = 1

# The integer type with the bit width of each floating type (for the bitwise mask).
_BITS = {"float16": "int16", "bfloat16": "int16", "float32": "int32", "float64": "int64"}


def pack_mask(mask: np.ndarray) -> str:
    """A boolean array as base64 of its C-order bits (1 bit per position): the old config form."""
    return base64.b64encode(_pack(mask).tobytes()).decode("ascii")


def unpack_mask(text: str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_mask` for an array of ``shape``."""
    return _unpack(np.frombuffer(base64.b64decode(text.encode("ascii")), dtype=np.uint8), shape)


def _pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1))


def _unpack(bits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    bits = np.asarray(bits, dtype=np.uint8).reshape(-1)
    if bits.size != (n + 7) // 8:
        raise ValueError(f"packed mask holds {bits.size * 8} bits, shape {shape} needs {n}")
    return np.unpackbits(bits, count=n).astype(bool).reshape(shape)


@keras.saving.register_keras_serializable(package="sparsecore", name="SparseMask")
class SparseMask(keras.constraints.Constraint, KerasSaveable):
    """Keeps a weight at exactly 0 outside its mask after every optimizer step.

    ``name`` is the sparse weight's name in the run, ``index`` its position among the run's sparse
    weights, ``axis`` its output axis, ``dtype`` the weight's dtype (for the bitwise mask): that
    is the whole config. The mask, the ``ever_active`` positions and the engine ``state`` (kept
    by the first weight's constraint) are saved with the weights (:meth:`save_own_variables`),
    read from the live run whenever the model is saved. ``mask``, ``ever_active`` and ``state``
    are also accepted as arguments, packed as in files written before that layout.
    """

    def __init__(
        self,
        shape: tuple[int, ...] | list[int],
        name: str = "",
        index: int = 0,
        axis: int = -1,
        mask: str | np.ndarray | None = None,
        ever_active: str | np.ndarray | None = None,
        state: str | Mapping[str, Any] | None = None,
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
        if isinstance(ever_active, str):
            ever_active = unpack_mask(ever_active, self.shape)
        self.ever_active = None if ever_active is None else np.asarray(ever_active, dtype=bool)
        loaded = json.loads(state) if isinstance(state, str) else state
        self.state: dict[str, Any] | None = None if loaded is None else dict(loaded)
        # Set by SparseCallback: gives the live (engine state, ever-active mask) of this weight.
        self.provider: Callable[[int], tuple[dict[str, Any] | None, np.ndarray | None]] | None = (
            None
        )
        # Set by SparseCallback: told when load_weights()/load_model() refills this constraint.
        self.on_load: Callable[[SparseMask], None] | None = None

    def __call__(self, w: Any) -> Any:
        dtype = keras.backend.standardize_dtype(w.dtype)
        # A JAX train step traced by jax_step passes the masks in; elsewhere the variables'
        # tensors are read (``.value``: jax.numpy takes no Keras variable).
        traced = traced_masks(self)
        if self.keep is not None and _BITS.get(dtype) == self.keep.dtype:
            keep = self.keep.value if traced is None else traced[0]
            bits = ops.bitwise_and(ops.view(w, self.keep.dtype), keep)
            return ops.view(bits, dtype)
        mask = self.mask.value if traced is None else traced[1]
        return ops.where(mask, w, ops.zeros_like(w))

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

    # -- the config: small metadata only ------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "name": self.name,
            "index": self.index,
            "axis": self.axis,
            "dtype": self.dtype,
        }

    # -- the state: saved with the weights (Keras' saving walks every KerasSaveable) ---------
    def _obj_type(self) -> str:
        # Keras' saving looks up which attributes to skip by this kind; a constraint holds no
        # layers, so the plain layer's list serves.
        return "Layer"

    def save_own_variables(self, store: Any) -> None:
        """Write the mask, the ever-active positions and the engine state (bit-packed / JSON)."""
        state, ever = self.snapshot()
        store["version"] = np.array([STORE_VERSION], dtype=np.int32)
        store["shape"] = np.array(self.shape, dtype=np.int64)
        store["mask"] = _pack(self.mask_numpy())
        if ever is not None:
            store["ever_active"] = _pack(ever)
        if state is not None:
            store["state"] = np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8)

    def load_own_variables(self, store: Any) -> None:
        """Read what :meth:`save_own_variables` wrote; an empty entry (a file written before the
        mask moved out of the config) leaves the values given by the config."""
        if len(store) == 0:
            return
        where = f"sparse weight {self.name!r}"
        keys = set(store.keys())
        version = int(np.asarray(store["version"]).reshape(-1)[0]) if "version" in keys else 0
        if version != STORE_VERSION or "mask" not in keys:
            raise SparseCoreError(
                f"{where}: the saved mask entry has layout version {version} and keys "
                f"{sorted(keys)}; this sparsecore reads version {STORE_VERSION} (upgrade it)"
            )
        saved_shape = tuple(int(d) for d in np.asarray(store["shape"]).reshape(-1))
        if saved_shape != self.shape:
            raise SparseCoreError(
                f"{where}: the saved mask has shape {saved_shape}, the weight {self.shape}"
            )
        try:
            mask = _unpack(store["mask"], self.shape)
            ever = _unpack(store["ever_active"], self.shape) if "ever_active" in keys else None
            state = (
                json.loads(np.asarray(store["state"], dtype=np.uint8).tobytes().decode("utf-8"))
                if "state" in keys
                else None
            )
        except (ValueError, UnicodeDecodeError) as err:
            raise SparseCoreError(f"{where}: the saved mask entry is damaged ({err})") from err
        self.assign(mask)
        self.ever_active, self.state = ever, state
        if self.on_load is not None:
            self.on_load(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # KerasSaveable pickles an object by saving it as a whole model; a constraint is rebuilt
        # from its config and its current mask, state and ever-active positions instead.
        state, ever = self.snapshot()
        return (_rebuild, (self.get_config(), self.mask_numpy(), ever, state))


def _rebuild(
    config: dict[str, Any],
    mask: np.ndarray,
    ever: np.ndarray | None,
    state: dict[str, Any] | None,
) -> SparseMask:
    return SparseMask(**config, mask=mask, ever_active=ever, state=state)


def _keep_bits(mask: np.ndarray, bits: str) -> np.ndarray:
    return -np.asarray(mask, dtype=bool).astype(bits)
