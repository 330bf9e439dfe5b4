"""On JAX, the compiled train step takes the masks as arguments.

Keras' JAX trainer compiles ``train_step`` with ``jax.jit`` and threads only the model's and the
optimizer's variables through it as state; the optimizer applies a variable's constraint inside
its own stateless scope, where a :class:`~.constraint.SparseMask`'s mask variable is not mapped.
Read there, the mask would be a constant of the compiled step: a mask update would not reach
training until the step was compiled again (about half a second for LeNet-300-100 on a CPU, far
more for large models, at every update).

:func:`install` therefore gives the model a train function that compiles ``model.train_step``
with one more argument, the current masks, and passes the constraints' mask values on every call;
while the step is traced, each ``SparseMask`` reads its traced mask (:func:`traced_masks`). A mask
update assigns the variables, the next step passes the new values: nothing is compiled again.
Where Keras builds the step differently (a ``keras.distribution``, Flax NNX, no ``jit_compile``),
:func:`install` returns False and the callback recompiles the step after each update instead
(without ``jit_compile`` the step reads the variables directly and nothing is needed).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["install", "traced_masks"]

# During tracing: {id(constraint): (keep bits or None, boolean mask)} as traced values.
_TRACED: contextvars.ContextVar[dict[int, tuple[Any, Any]] | None] = contextvars.ContextVar(
    "sparsecore_traced_masks", default=None
)
_MARK = "_sparsecore_masks_as_arguments"


def traced_masks(constraint: Any) -> tuple[Any, Any] | None:
    """The (keep bits, mask) a traced train step passes for ``constraint``; None elsewhere."""
    current = _TRACED.get()
    return None if current is None else current.get(id(constraint))


@contextlib.contextmanager
def _using(constraints: Sequence[Any], masks: Sequence[tuple[Any, Any]]) -> Iterator[None]:
    token = _TRACED.set({id(c): m for c, m in zip(constraints, masks)})
    try:
        yield
    finally:
        _TRACED.reset(token)


def _supported(model: Any, *, compiled: bool = True) -> bool:
    from keras.src.backend.config import is_nnx_enabled
    from keras.src.distribution import distribution_lib

    return (
        (not compiled or (not model.run_eagerly and bool(model.jit_compile)))
        and not is_nnx_enabled()
        and distribution_lib.distribution() is None
        and callable(getattr(model, "_make_function", None))
    )


def is_installed(model: Any, constraints: Sequence[Any], own: Any = None) -> bool:
    """True if ``model.train_function`` is one :func:`install` made for these constraints (and
    this own-momentum average)."""
    made_for = getattr(getattr(model, "train_function", None), _MARK, None)
    want = [id(c) for c in constraints] + ([id(own)] if own is not None else [])
    return made_for is not None and made_for == want


def needs_nothing(model: Any) -> bool:
    """True when the train step is not compiled (it reads the mask variables at every step)."""
    return bool(model.run_eagerly or not model.jit_compile)


def install(model: Any, constraints: Sequence[Any], own: Any = None) -> bool:
    """Give ``model`` a train function that passes the constraints' masks as arguments, and
    the buffers of ``own`` (an :class:`~.momentum.OwnMomentum`, for optimizers without momentum)
    as arguments that the step returns updated.

    Returns False (and changes nothing) where Keras builds its step in a way this does not
    reproduce; the caller then recompiles after each mask update (and refuses ``own``, whose
    updates a stateless step would drop). With ``own``, a step that is not compiled
    (``run_eagerly``, ``jit_compile=False``) gets the same function, run eagerly.
    """
    import jax

    compiled_step = own is None or not needs_nothing(model)
    if not _supported(model, compiled=compiled_step):
        return False
    constraints = list(constraints)
    step = model.train_step  # a user's override of train_step is kept

    def with_masks(state: Any, data: Any, masks: Any, buffers: Any) -> Any:
        with _using(constraints, masks):
            if own is None:
                return step(state, data), buffers
            with own.traced(buffers) as box:
                out = step(state, data)
            return out, box

    compiled = jax.jit(with_masks, donate_argnums=0) if compiled_step else with_masks

    def train_step(state: Any, data: Any) -> Any:
        masks = [(None if c.keep is None else c.keep.value, c.mask.value) for c in constraints]
        buffers = [] if own is None else [b.value for b in own.buffers]
        out, new = compiled(state, data, masks, buffers)
        if own is not None:
            for b, value in zip(own.buffers, new):
                b.assign(value)
        return out

    function = model._make_function(train_step)
    setattr(function, _MARK, [id(c) for c in constraints] + ([id(own)] if own is not None else []))
    model.train_function = function
    return True
