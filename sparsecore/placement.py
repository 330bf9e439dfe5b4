"""Where a mask update runs: one vocabulary for every framework.

Each adapter takes ``update_backend=`` with the same three values:

- ``"host"``: on the CPU, on NumPy arrays, with sparsecore's own backends. The PyTorch adapter
  reads CPU tensors in place as NumPy views and runs the compiled Numba backend
  (:mod:`sparsecore.torch.host_update`); the Keras callback copies the variables to NumPy and runs
  the NumPy reference backend (:mod:`sparsecore.keras.placement`). On a CPU this is the fast path
  (a few large compiled passes instead of hundreds of small framework calls).
- ``"device"``: on the framework's own tensors, where they live (the torch backend; ``keras.ops``),
  so that nothing leaves an accelerator.
- ``"auto"`` (the default): ``"host"`` when every array of the update is in CPU memory and the
  host path can read it, else ``"device"``.

Every choice gives the same masks, bit for bit (each backend is tested against the NumPy
reference). The words each adapter used before stay as aliases: ``"numba"`` and ``"torch"`` for
PyTorch, ``"numpy"`` and ``"keras"`` for Keras.
"""

from __future__ import annotations

from typing import Any

from .errors import SparseCoreError

__all__ = ["ALIASES", "PLACEMENTS", "placement_of"]

#: The values of ``update_backend=``, for every framework.
PLACEMENTS = ("auto", "host", "device")

#: Per framework, its earlier names of the placements (accepted as aliases).
ALIASES: dict[str, dict[str, str]] = {
    "torch": {"numba": "host", "torch": "device"},
    "keras": {"numpy": "host", "keras": "device"},
}


def placement_of(choice: Any, framework: str) -> str:
    """The placement (one of :data:`PLACEMENTS`) that ``update_backend=choice`` names for
    ``framework`` (``"torch"`` or ``"keras"``); raise :class:`SparseCoreError` naming the value
    and the accepted ones otherwise."""
    aliases = ALIASES[framework]
    if isinstance(choice, str):
        if choice in PLACEMENTS:
            return choice
        if choice in aliases:
            return aliases[choice]
    names = ", ".join(f"{old!r} for {new!r}" for old, new in aliases.items())
    raise SparseCoreError(
        f"update_backend must be one of {list(PLACEMENTS)} (or the earlier names {names}), "
        f"got {choice!r}"
    )
