"""Keras 3 adapter and backend for sparsecore (imported as ``sparsecore.keras``).

``model.fit(x, y, callbacks=[sparsecore.keras.SparseCallback()])`` trains the model's Dense and
convolution kernels sparse with sparse momentum; ``strip(model)`` gives the trained model back as
a plain Keras model, and ``compact(model)`` turns a sparse model into a smaller dense one with the
same outputs (``docs/compaction.md``); see ``docs/keras.md``. Works on the TensorFlow, PyTorch and
JAX backends of Keras 3.
"""

from .backend import KerasBackend
from .callback import SparseCallback
from .compaction import compact
from .constraint import SparseMask
from .discovery import SparseWeight, find_sparse_weights, register_layer_type
from .strip import strip

__all__ = [
    "KerasBackend",
    "SparseCallback",
    "SparseMask",
    "SparseWeight",
    "compact",
    "find_sparse_weights",
    "register_layer_type",
    "strip",
]
