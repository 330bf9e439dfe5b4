"""Which models and parameters are under an attached :class:`~.adapter.SparseTraining` now.

A parameter can be sparse under one handle only: a second ``attach`` of the same model, or of a
model sharing one of its sparse parameters, is refused before anything changes. The registry is
weak: it never keeps a model or a handle alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from torch import nn

from sparsecore.errors import SparseCoreError

from .selection import Target

__all__ = ["check_not_attached", "handle_of", "register", "unregister"]

# Models and parameters currently under an attached SparseTraining (weak: never keep a model alive).
_ATTACHED_MODELS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
# Parameters by id (tensors compare elementwise, so they cannot be weak dictionary keys); an entry
# counts only while its handle is alive, attached, and still holds that very parameter.
_ATTACHED_PARAMS: dict[int, Any] = {}


def check_not_attached(model: nn.Module, targets: Sequence[Target]) -> None:
    """Raise :class:`SparseCoreError` if ``model`` or one of the ``targets`` is attached already."""
    live = _ATTACHED_MODELS.get(model)
    if live is not None and live() is not None:
        raise SparseCoreError(
            f"model {type(model).__name__} is already attached to sparsecore; call detach() on "
            f"the existing handle before attaching again"
        )
    for t in targets:
        ref = _ATTACHED_PARAMS.get(id(t.param))
        owner = None if ref is None else ref()
        held = [] if owner is None else [o.name for o in owner.targets if o.param is t.param]
        if owner is not None and held:
            raise SparseCoreError(
                f"parameter {t.name!r} is already sparse (as {held[0]!r} of "
                f"{type(owner.model).__name__}) under another attach(); detach that one first"
            )


def handle_of(model: nn.Module) -> Any:
    """The live handle attached to ``model``, or None."""
    ref = _ATTACHED_MODELS.get(model)
    return None if ref is None else ref()


def register(handle: Any) -> None:
    """Record ``handle`` (a SparseTraining) as the owner of its model and sparse parameters."""
    ref = weakref.ref(handle)
    _ATTACHED_MODELS[handle.model] = ref
    for t in handle.targets:
        _ATTACHED_PARAMS[id(t.param)] = ref


def unregister(handle: Any) -> None:
    """Forget ``handle``'s model and parameters (on detach)."""
    _ATTACHED_MODELS.pop(handle.model, None)
    for t in handle.targets:
        _ATTACHED_PARAMS.pop(id(t.param), None)
