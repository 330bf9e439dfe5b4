"""Keras 3 adapter and backend for sparsecore (imported as ``sparsecore.keras``)."""
