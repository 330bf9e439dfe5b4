"""Where ``SparseCallback`` runs a mask update: on the host with NumPy, or on the device with ``keras.ops``.

``update_backend`` takes the placements of :mod:`sparsecore.placement` (``"auto"``, ``"host"``,
``"device"``), the same words as the PyTorch adapter's; ``"numpy"`` and ``"keras"``, the earlier
names, are aliases of ``"host"`` and ``"device"``.

A mask update is a few hundred small array operations (counts, selections, boolean algebra) on
tensors of a few hundred thousand elements. On a CPU, each eager ``keras.ops`` call costs tens of
microseconds of dispatch (TensorFlow's eager executor, or PyTorch's) and every count is a
device-to-host read, so the update of LeNet-300-100 takes 20 to 35 ms on ``keras.ops`` (TensorFlow)
against about 4 ms when the kernels, masks and momentum are copied to NumPy (on a CPU a memcpy)
and the update runs on sparsecore's NumPy reference backend (docs/keras.md, "Overhead"). On an accelerator the opposite holds: the
tensors stay on the device and ``keras.ops`` (:class:`~.backend.KerasBackend`) avoids moving them.

Both paths give the same masks: the Keras backend is checked against the NumPy reference bit for
bit (``tests/keras/test_backend.py``), and a run with each path is compared end to end
(``tests/keras/test_placement.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from sparsecore.backend import ArrayBackend, get_backend
from sparsecore.placement import ALIASES, PLACEMENTS, placement_of

__all__ = [
    "UPDATE_BACKENDS",
    "as_update_array",
    "check_update_backend",
    "on_host",
    "resolve_update_backend",
]

#: Values of ``SparseCallback(update_backend=...)``: the placements, then Keras' earlier names.
UPDATE_BACKENDS = (*PLACEMENTS, *ALIASES["keras"])


def on_host(variable: Any) -> bool:
    """True if the Keras variable's value lives in CPU memory (TensorFlow, PyTorch or JAX)."""
    value = getattr(variable, "value", variable)
    try:
        device = value.device
    except (AttributeError, RuntimeError, ValueError):
        return False
    if callable(device):  # JAX arrays expose ``devices()``; some versions a ``device()`` method
        device = device()
    # torch.device has ``type``, a JAX device ``platform``; TensorFlow gives a string such as
    # '/job:localhost/replica:0/task:0/device:CPU:0'.
    kind = getattr(device, "type", None) or getattr(device, "platform", None) or str(device)
    return "cpu" in str(kind).lower()


def check_update_backend(choice: str) -> None:
    """Raise :class:`~sparsecore.SparseCoreError` naming the value unless it is one of
    :data:`UPDATE_BACKENDS`."""
    placement_of(choice, "keras")


def resolve_update_backend(choice: str, variables: Sequence[Any]) -> ArrayBackend:
    """The backend a mask update runs on: ``'auto'`` picks the host (NumPy) when every variable
    is on the CPU, else the device (``keras.ops``)."""
    placement = placement_of(choice, "keras")
    if placement == "auto":
        placement = "host" if all(on_host(v) for v in variables) else "device"
    return get_backend("numpy" if placement == "host" else "keras")


def as_update_array(x: Any, backend: ArrayBackend) -> Any:
    """A private copy of tensor or variable ``x`` for ``backend`` (NumPy array or Keras tensor).

    The copy matters: on the PyTorch backend ``convert_to_numpy`` may share the variable's memory,
    and the update assigns the variables it has read.
    """
    if backend.name == "numpy":
        return np.array(_numpy_view(x), copy=True)
    return ops.copy(x)


def _numpy_view(x: Any) -> np.ndarray:
    # TensorFlow: ``.numpy()`` of the tf.Variable or tensor, which spares the deprecated
    # ``__array__`` path that ``convert_to_numpy`` takes for a Keras variable under NumPy 2.
    value = x.value if isinstance(x, keras.Variable) else x
    if keras.backend.backend() == "tensorflow" and hasattr(value, "numpy"):
        return np.asarray(value.numpy())
    return np.asarray(ops.convert_to_numpy(value))
