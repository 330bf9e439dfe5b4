"""CuPy backend for the sparsecore engine (imported as ``sparsecore.cupy``).

``sparsecore.update`` picks :class:`CupyBackend` by itself for layers whose arrays are
``cupy.ndarray``. Importing this package does not import CuPy (the backend does, when created).
"""

from .backend import ArrayModuleBackend, BitPatternBackend, CupyBackend

__all__ = ["ArrayModuleBackend", "BitPatternBackend", "CupyBackend"]
