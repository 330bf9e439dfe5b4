"""Checks of the numbers, counts and flags users pass: one definition for every option.

Python's ``bool`` is an ``int`` and NumPy scalars are not Python numbers, so ``isinstance(x,
(int, float))`` lets ``density=True`` through and stops ``density=np.float32(0.05)``. These
helpers take what a user means by a number (Python and NumPy integers and floats, never a
boolean), refuse everything else with a :class:`~sparsecore.SparseCoreError` that names the option,
the value and the valid range, and return plain Python values, so that what is stored (configs,
checkpoints, JSON) never holds a NumPy scalar.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .errors import SparseCoreError

__all__ = ["check_flag", "check_integer", "check_real", "check_shape", "is_integer", "is_real"]


def is_integer(value: Any) -> bool:
    """An integer that is not a boolean (Python or NumPy)."""
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
        value, (bool, np.bool_)
    )


def is_real(value: Any) -> bool:
    """A real number that is not a boolean (Python or NumPy integers and floats)."""
    return isinstance(value, (numbers.Real, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "-inf" if low is None else f"{low:g}"
    right = "inf" if high is None else f"{high:g}"
    return f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a Python float if it is a finite real number in the interval, else raise.

    The message reads ``"<name> must lie in (0, 1], got 1.5"``.
    """
    valid = is_real(value) and math.isfinite(float(value))
    if valid:
        x = float(value)
        valid = (low is None or (x > low if low_open else x >= low)) and (
            high is None or (x < high if high_open else x <= high)
        )
    if not valid:
        raise SparseCoreError(
            f"{name} must lie in {_interval(low, high, low_open, high_open)}, got {value!r}"
        )
    return float(value)


def check_integer(name: str, value: Any, *, minimum: int | None = None, what: str = "") -> int:
    """``value`` as a Python int if it is an integer (not a boolean) >= ``minimum``, else raise.

    ``what`` replaces the default description ("an integer >= 0") in the message.
    """
    if not is_integer(value) or (minimum is not None and int(value) < minimum):
        wanted = what or ("an integer" + ("" if minimum is None else f" >= {minimum}"))
        raise SparseCoreError(f"{name} must be {wanted}, got {value!r}")
    return int(value)


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a Python bool if it is ``True`` or ``False`` (NumPy's too), else raise."""
    if not isinstance(value, (bool, np.bool_)):
        raise SparseCoreError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """A layer shape as a tuple of Python ints: at least one dimension, each an integer >= 1.

    ``()`` (a scalar, which has no rows to prune) and zero or negative sizes are refused, and so
    are sizes that are not integers (``2.5`` is not silently truncated to 2).
    """
    try:
        dims = tuple(shape)
    except TypeError:
        raise SparseCoreError(f"{name}: shape must be a sequence of sizes, got {shape!r}") from None
    if not dims:
        raise SparseCoreError(f"{name}: shape () has no elements; a sparse layer needs a shape")
    for d in dims:
        if not is_integer(d):
            raise SparseCoreError(
                f"{name}: shape {shape!r} has size {d!r}; every size must be an integer >= 1"
            )
        if int(d) < 1:
            raise SparseCoreError(
                f"{name}: shape {shape!r} has no elements (size {d!r}); every size must be an "
                f"integer >= 1"
            )
    return tuple(int(d) for d in dims)
