"""The core's own backends, registered with :mod:`sparsecore.backend`'s registry by
``import sparsecore``: the NumPy reference at once, the Numba backend when first asked for (its
import compiles nothing, but importing Numba itself takes a moment)."""

from __future__ import annotations

from .backend import ArrayBackend, register_backend, register_backend_factory
from .backend_numpy import NumpyBackend


def _numba() -> ArrayBackend:
    from .numba_backend import NumbaBackend

    return NumbaBackend()


def register_builtin_backends() -> None:
    """Register ``"numpy"`` and ``"numba"`` (idempotent)."""
    register_backend(NumpyBackend())
    # Tried by backend_for only once numba is imported; NumPy arrays go to "numpy" first anyway.
    register_backend_factory("numba", _numba, framework="numba")
