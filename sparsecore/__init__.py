"""sparsecore: train neural networks that stay sparse from the first step to the last.

The framework-free core: sparse momentum (Dettmers & Zettlemoyer 2019) on plain arrays. Importing it
imports NumPy only; framework adapters live in ``sparsecore.torch`` and ``sparsecore.keras``.
"""

from .backend import ArrayBackend, backend_for, get_backend, register_backend
from .builtin_backends import register_builtin_backends
from .config import SparseConfig, option_names
from .engine import SparseEngine, UpdateResult, apply_masks, check_layers, new_weights, update
from .errors import DeadUnitsWarning, NonFiniteError, SparseCoreError
from .hashing import HashKey, layer_hash, mix32, position_hash
from .init import (
    init_scales,
    initial_mask,
    initial_masks,
    layer_counts,
    layer_densities,
    target_count,
)
from .layers import Layer
from .modes import register_growth, register_importance, register_prune
from .records.updates import LayerReport, UpdateReport
from .redistribute import capacities, importance_shares, split_budget
from .schedules import UpdateSchedule, prune_rate_at

register_builtin_backends()

__version__ = "0.1.0"

__all__ = [
    "ArrayBackend",
    "DeadUnitsWarning",
    "HashKey",
    "Layer",
    "LayerReport",
    "NonFiniteError",
    "SparseConfig",
    "SparseCoreError",
    "SparseEngine",
    "UpdateReport",
    "UpdateResult",
    "UpdateSchedule",
    "apply_masks",
    "backend_for",
    "capacities",
    "check_layers",
    "get_backend",
    "importance_shares",
    "init_scales",
    "initial_mask",
    "initial_masks",
    "layer_counts",
    "layer_densities",
    "layer_hash",
    "mix32",
    "new_weights",
    "option_names",
    "position_hash",
    "prune_rate_at",
    "register_backend",
    "register_growth",
    "register_importance",
    "register_prune",
    "split_budget",
    "target_count",
    "update",
]
