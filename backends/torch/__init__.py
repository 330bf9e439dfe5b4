"""PyTorch adapter and backend for sparsecore (imported as ``sparsecore.torch``).

``sparse = sparsecore.torch.attach(model, optimizer)`` makes a model train sparse with sparse
momentum; see :mod:`sparsecore.torch.adapter` and docs/torch.md. ``sparsecore.torch.compact``
turns a sparse model into a smaller dense one with the same outputs (docs/compaction.md).
"""

from .adapter import SparseTraining, attach
from .backend import TorchBackend
from .compaction import compact
from .export import export_sparse, load_sparse
from .selection import Target, register_layer_type, select_targets

__all__ = [
    "SparseTraining",
    "Target",
    "TorchBackend",
    "attach",
    "compact",
    "export_sparse",
    "load_sparse",
    "register_layer_type",
    "select_targets",
]
