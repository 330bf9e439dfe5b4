"""Exceptions raised by sparsecore.

Every error raised for bad input is a :class:`SparseCoreError` (a ``ValueError``), so callers can
catch the library's own complaints without catching unrelated bugs. Messages name the layer and the
offending value; nothing is modified before the check that raises.
"""

from __future__ import annotations


class SparseCoreError(ValueError):
    """Bad input to sparsecore: the message says which layer, which value, and what to do."""


class NonFiniteError(SparseCoreError):
    """A weight, momentum or gradient array read by a mask update holds NaN or Inf."""


class DeadUnitsWarning(UserWarning):
    """Most output units of a sparse layer are dead: no active weight, or no gradient.

    Issued once per layer and run (:mod:`sparsecore.units`).
    """
