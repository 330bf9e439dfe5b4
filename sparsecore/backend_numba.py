"""The Numba backend's former import path, kept for users: it lives in :mod:`sparsecore.numba_backend`
(a package split by concern: rank keys, threads, passes, selection, fused update, the class)."""

from .numba_backend import BufferPool, NumbaBackend, rank_params, select_flat, warm_up

__all__ = ["BufferPool", "NumbaBackend", "rank_params", "select_flat", "warm_up"]
