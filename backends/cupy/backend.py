"""The CuPy backend: a mask update on GPU arrays, equal to the NumPy reference.

The operations are those of the NumPy reference, written once against an *array module* ``xp``
(:class:`sparsecore.backend_numpy.ArrayModuleBackend`): :class:`CupyBackend` runs them with
``xp = cupy`` on the arrays' device; with ``xp = numpy`` they are the reference itself, so the
CuPy path is tested on machines without a GPU too. Only counts and float64 sums come back to the
host.
"""

from __future__ import annotations

from sparsecore.backend_numpy import ArrayModuleBackend

__all__ = ["ArrayModuleBackend", "CupyBackend"]


class CupyBackend(ArrayModuleBackend):
    """The backend interface on ``cupy.ndarray`` (arrays on the current CuPy device)."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy

        super().__init__(cupy)
