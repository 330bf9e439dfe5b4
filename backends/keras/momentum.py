"""Reading the momentum of a sparse weight: a Keras optimizer's slot, or the library's own average.

SGD with momentum keeps a velocity ``v = momentum * v - lr * g`` (``-lr`` times PyTorch's buffer;
sign and a common factor do not matter for sparse momentum). Adam, AdamW, Nadam, Adamax, Lamb and
Lion keep the first moment ``m``; Adam-family optimizers that also keep a second moment can use the
reference implementation's normalised ``m / (sqrt(v) + eps)`` (``adam_momentum='normalized'``).
RMSprop with ``momentum > 0`` keeps a momentum slot too.

The slots are read from the optimizer by the weight's index, before anything is masked: the
momentum at inactive positions keeps accumulating because Keras computes dense kernel gradients.

Optimizers that keep no momentum (SGD or RMSprop with ``momentum=0``, Adagrad, Adadelta, Adafactor,
Ftrl, any other): the library keeps its own exponential moving average of each sparse kernel's
gradient, ``P <- beta * P + (1 - beta) * g`` (``momentum_beta``), as the PyTorch adapter does.
:class:`OwnMomentum` folds the gradients in inside the optimizer's ``apply`` (the call every Keras
backend's train step makes with the gradients), before the optimizer uses them; under a
``tf.distribute`` strategy the buffers average the replicas' gradients. Keras' JAX trainer runs
``apply`` in a stateless scope that threads only the model's and the optimizer's variables, so on
JAX the compiled step takes the buffers as arguments and returns them (:mod:`.jax_step`;
:meth:`OwnMomentum.traced`). The buffers are not saved with the model: a run continued from a
checkpoint starts its average again.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops

from sparsecore.errors import SparseCoreError

__all__ = ["OWN", "MomentumReader", "OwnMomentum", "optimizer_slots"]

# While a JAX train step is traced: {id(OwnMomentum): the traced buffer values, read and replaced}.
_TRACED: contextvars.ContextVar[dict[int, list[Any]] | None] = contextvars.ContextVar(
    "sparsecore_own_momentum", default=None
)

#: The momentum source name of the library's own gradient average.
OWN = "own"

# Attribute names of the first-moment slot lists, then of the second-moment ones.
_FIRST_MOMENT = ("_momentums", "momentums", "_m")
_SECOND_MOMENT = ("_velocities", "velocities")
_OTHER_SLOTS = ("_u", "_accumulators")
# Adam-like optimizers: the second moment list is present and means E[g^2].
_ADAM_LIKE = ("Adam", "AdamW", "Nadam", "Lamb")


def _inner(optimizer: Any) -> Any:
    # LossScaleOptimizer wraps the optimizer that owns the slots.
    return getattr(optimizer, "inner_optimizer", optimizer)


def _slot_list(optimizer: Any, names: tuple[str, ...]) -> list[Any] | None:
    for name in names:
        slots = getattr(optimizer, name, None)
        if isinstance(slots, list) and slots:
            return slots
    return None


def optimizer_slots(optimizer: Any, variable: Any) -> list[Any]:
    """All slot variables the optimizer keeps for ``variable`` (to reset at changed positions)."""
    opt = _inner(optimizer)
    if not getattr(opt, "built", False):
        return []
    try:
        index = opt._get_variable_index(variable)
    except KeyError:
        return []
    out = []
    for names in (_FIRST_MOMENT, _SECOND_MOMENT, *((n,) for n in _OTHER_SLOTS)):
        slots = _slot_list(opt, names)
        if slots is not None and index < len(slots):
            out.append(slots[index])
    return out


def _describe(optimizer: Any) -> str:
    return type(_inner(optimizer)).__name__


_WITH_FIRST_MOMENT = (
    keras.optimizers.Adam,
    keras.optimizers.AdamW,
    keras.optimizers.Nadam,
    keras.optimizers.Adamax,
    keras.optimizers.Lion,
    keras.optimizers.Lamb,
)


def momentum_kind(optimizer: Any) -> str:
    """``'momentum'`` (SGD/RMSprop with momentum > 0), ``'first_moment'`` (Adam family, Lion) or
    :data:`OWN` (everything else: the library keeps its own gradient average)."""
    opt = _inner(optimizer)
    if isinstance(opt, (keras.optimizers.SGD, keras.optimizers.RMSprop)):
        return "momentum" if float(opt.momentum) > 0.0 else OWN
    if isinstance(opt, _WITH_FIRST_MOMENT):
        return "first_moment"
    return OWN


class OwnMomentum:
    """The library's own gradient average for the sparse kernels, for optimizers without momentum.

    One float32 buffer per sparse kernel, created in the model's distribution scope, updated by a
    wrapper around the optimizer's ``apply`` (so the update is part of the compiled train step;
    the train function must be rebuilt after :meth:`install`).
    """

    def __init__(self, optimizer: Any, variables: list[Any], beta: float, scope: Any) -> None:
        self.optimizer = _inner(optimizer)
        self.beta = float(beta)
        with scope:
            self.buffers = [
                keras.Variable(
                    ops.zeros(tuple(v.shape), dtype="float32"),
                    trainable=False,
                    aggregation="mean",
                    name=f"sparsecore_own_momentum_{i}",
                )
                for i, v in enumerate(variables)
            ]
        self._index = {id(v): i for i, v in enumerate(variables)}

    def install(self) -> None:
        """Wrap the optimizer's ``apply`` (replacing a wrapper an earlier callback installed)."""
        opt = self.optimizer
        original = getattr(opt.apply, "_sparsecore_original", opt.apply)

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            variables = opt._trainable_variables if trainable_variables is None else None
            self.fold(grads, variables if variables is not None else list(trainable_variables))
            return original(grads, trainable_variables)

        apply._sparsecore_original = original  # type: ignore[attr-defined]
        opt.apply = apply

    @contextlib.contextmanager
    def traced(self, values: list[Any]) -> Iterator[list[Any]]:
        """While a JAX train step is traced: :meth:`fold` reads and replaces ``values`` (the
        step's arguments) instead of assigning the buffers; the step returns the list."""
        box = list(values)
        token = _TRACED.set({id(self): box})
        try:
            yield box
        finally:
            _TRACED.reset(token)

    def fold(self, grads: Any, variables: Any) -> None:
        """``P <- beta * P + (1 - beta) * g`` for the sparse kernels among ``variables``."""
        current = _TRACED.get()
        box = None if current is None else current.get(id(self))
        values: list[Any] = list(self.buffers) if box is None else box
        grads = list(grads)
        new: dict[int, Any] = {}
        for g, v in zip(grads, variables):
            i = self._index.get(id(v))
            if i is None:
                continue
            if g is None:
                new[i] = ops.multiply(values[i], self.beta)
            else:
                g32 = ops.cast(g, "float32")
                new[i] = ops.add(
                    ops.multiply(values[i], self.beta), ops.multiply(g32, 1.0 - self.beta)
                )
        for i in range(len(self.buffers)):  # a kernel without a gradient this step
            if i not in new:
                new[i] = ops.multiply(values[i], self.beta)
        for i, value in new.items():
            if box is None:
                self.buffers[i].assign(value)
            else:
                box[i] = value

    def read(self, variable: Any) -> Any:
        return ops.copy(self.buffers[self._index[id(variable)]])

    def buffer(self, variable: Any) -> Any:
        return self.buffers[self._index[id(variable)]]


def normalizes(optimizer: Any, adam_momentum: str) -> bool:
    """Is the momentum read as m / (sqrt(v) + epsilon)? Only for Adam-family optimizers (a
    second moment meaning E[g^2]); any other optimizer's momentum is read as it is, as in the
    PyTorch adapter."""
    return adam_momentum == "normalized" and _describe(optimizer) in _ADAM_LIKE


def describe(optimizer: Any, adam_momentum: str, beta: float) -> str:
    """The momentum source in words (the callback's ``momentum_source``)."""
    opt = _inner(optimizer)
    name = type(opt).__name__
    kind = momentum_kind(optimizer)
    if kind == "momentum":
        return f"{name}'s momentum slot (momentums)"
    if kind == "first_moment":
        if normalizes(optimizer, adam_momentum):
            return f"{name}'s m / (sqrt(v) + epsilon)"
        return f"{name}'s first moment (m)"
    return f"the library's own gradient average (beta {beta:g}): {name} keeps no momentum"


class MomentumReader:
    """Gets the momentum tensor of each sparse weight: from the optimizer's slots, or from the
    library's own average (:class:`OwnMomentum`, given as ``own``) when the optimizer keeps no
    momentum."""

    def __init__(
        self, optimizer: Any, adam_momentum: str = "exp_avg", own: OwnMomentum | None = None
    ) -> None:
        self.optimizer = optimizer
        self.adam_momentum = adam_momentum
        self.own = own

    def check(self) -> None:
        """Raise if there is no optimizer, or if the options cannot be met by this one."""
        opt = _inner(self.optimizer)
        if opt is None:
            raise SparseCoreError(
                "the model has no optimizer: compile it (e.g. optimizer=keras.optimizers.SGD("
                "learning_rate=0.1, momentum=0.9)) before fitting with SparseCallback"
            )

    def read(self, variable: Any, name: str) -> Any:
        """The momentum tensor for ``variable`` (named ``name`` in errors)."""
        if self.own is not None:
            return self.own.read(variable)
        opt = _inner(self.optimizer)
        if not getattr(opt, "built", False):
            raise SparseCoreError(
                f"layer {name!r}: the optimizer has not taken a step yet, so there is no momentum "
                f"to read"
            )
        try:
            index = opt._get_variable_index(variable)
        except KeyError:
            raise SparseCoreError(
                f"layer {name!r}: the optimizer ({_describe(self.optimizer)}) does not train "
                f"this weight; is the layer frozen?"
            ) from None
        first = _slot_list(opt, _FIRST_MOMENT)
        if first is None or index >= len(first):
            raise SparseCoreError(
                f"layer {name!r}: optimizer {_describe(self.optimizer)} holds no momentum slot"
            )
        m = ops.copy(first[index])
        if not normalizes(opt, self.adam_momentum):
            return m
        second = _slot_list(opt, _SECOND_MOMENT)
        if second is None or index >= len(second):
            raise SparseCoreError(
                f"layer {name!r}: adam_momentum='normalized' needs a second moment, optimizer "
                f"{_describe(self.optimizer)} has none for this weight"
            )
        v = ops.copy(second[index])
        eps = float(getattr(opt, "epsilon", 1e-7) or 1e-7)
        return ops.divide(m, ops.add(ops.sqrt(v), eps))
