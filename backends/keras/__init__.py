"""Keras 3 adapter and backend for sparsecore (imported as ``sparsecore.keras``).

``model.fit(x, y, callbacks=[sparsecore.keras.SparseCallback()])`` trains the model's Dense and
convolution kernels sparse with sparse momentum; see ``docs/keras.md``. Works on the TensorFlow
and PyTorch backends of Keras 3.
"""

from .backend import KerasBackend
from .callback import SparseCallback
from .constraint import SparseMask
from .discovery import SparseWeight, find_sparse_weights, register_layer_type

__all__ = [
    "KerasBackend",
    "SparseCallback",
    "SparseMask",
    "SparseWeight",
    "find_sparse_weights",
    "register_layer_type",
]
