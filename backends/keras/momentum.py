"""Reading the momentum of a sparse weight from a Keras optimizer's slot variables.

SGD with momentum keeps a velocity ``v = momentum * v - lr * g`` (``-lr`` times PyTorch's buffer;
sign and a common factor do not matter for sparse momentum). Adam, AdamW, Nadam, Adamax, Lamb and
Lion keep the first moment ``m``; Adam-family optimizers that also keep a second moment can use the
reference implementation's normalised ``m / (sqrt(v) + eps)`` (``adam_momentum='normalized'``).
RMSprop with ``momentum > 0`` keeps a momentum slot too.

The slots are read from the optimizer by the weight's index, before anything is masked: the
momentum at inactive positions keeps accumulating because Keras computes dense kernel gradients.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from sparsecore.errors import SparseCoreError

__all__ = ["MomentumReader", "optimizer_slots"]

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


class MomentumReader:
    """Gets the momentum tensor of each sparse weight from ``optimizer``.

    :meth:`check` refuses, with a message naming what to use instead, an optimizer that keeps no
    momentum (plain SGD, Adagrad, RMSprop without momentum, ...).
    """

    def __init__(self, optimizer: Any, adam_momentum: str = "exp_avg") -> None:
        self.optimizer = optimizer
        self.adam_momentum = adam_momentum

    def check(self) -> None:
        """Raise if this optimizer will never hold momentum for the update to read."""
        opt = _inner(self.optimizer)
        if opt is None:
            raise SparseCoreError(
                "the model has no optimizer: compile it (e.g. optimizer=keras.optimizers.SGD("
                "learning_rate=0.1, momentum=0.9)) before fitting with SparseCallback"
            )
        kind = type(opt).__name__
        if isinstance(opt, keras.optimizers.SGD) and float(opt.momentum) == 0.0:
            raise SparseCoreError(
                "optimizer SGD has momentum=0, so it keeps no momentum for sparse momentum to "
                "read; use SGD(momentum=0.9) or Adam/AdamW/Nadam, or choose modes that need no "
                "momentum (growth='random', redistribution='magnitude' or 'nonzero')"
            )
        if isinstance(opt, keras.optimizers.RMSprop) and float(opt.momentum) == 0.0:
            raise SparseCoreError(
                "optimizer RMSprop has momentum=0 and keeps no momentum; pass momentum=0.9, use "
                "SGD(momentum=0.9) or Adam, or choose modes that need no momentum"
            )
        known = (
            keras.optimizers.SGD,
            keras.optimizers.RMSprop,
            keras.optimizers.Adam,
            keras.optimizers.AdamW,
            keras.optimizers.Nadam,
            keras.optimizers.Adamax,
            keras.optimizers.Lion,
            keras.optimizers.Lamb,
        )
        if not isinstance(opt, known):
            raise SparseCoreError(
                f"optimizer {kind} keeps no momentum sparsecore can read; use SGD(momentum=0.9), "
                f"Adam, AdamW, Nadam, Adamax, Lion, Lamb or RMSprop(momentum>0), or choose modes "
                f"that need no momentum (growth='random', redistribution='magnitude' or "
                f"'nonzero')"
            )
        if self.adam_momentum == "normalized" and kind not in _ADAM_LIKE:
            raise SparseCoreError(
                f"adam_momentum='normalized' needs an Adam-family optimizer (second moment); "
                f"{kind} has none. Use adam_momentum='exp_avg'"
            )

    def read(self, variable: Any, name: str) -> Any:
        """The momentum tensor for ``variable`` (named ``name`` in errors)."""
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
        if self.adam_momentum != "normalized":
            return m
        second = _slot_list(opt, _SECOND_MOMENT)
        if second is None or index >= len(second):
            raise SparseCoreError(
                f"layer {name!r}: adam_momentum='normalized' needs a second moment, optimizer "
                f"{_describe(self.optimizer)} has none"
            )
        v = ops.copy(second[index])
        eps = float(getattr(opt, "epsilon", 1e-7) or 1e-7)
        return ops.divide(m, ops.add(ops.sqrt(v), eps))
