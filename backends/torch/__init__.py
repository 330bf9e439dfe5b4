"""PyTorch adapter and backend for sparsecore (imported as ``sparsecore.torch``).

``sparse = sparsecore.torch.attach(model, optimizer)`` makes a model train sparse with sparse
momentum; see :mod:`sparsecore.torch.adapter` and docs/torch.md.
"""

from .adapter import SparseTraining, attach
from .backend import TorchBackend
from .export import export_sparse, load_sparse
from .selection import Target, register_layer_type, select_targets

__all__ = [
    "SparseTraining",
    "Target",
    "TorchBackend",
    "attach",
    "export_sparse",
    "load_sparse",
    "register_layer_type",
    "select_targets",
]
