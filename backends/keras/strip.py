"""``strip(model)``: the trained sparse model as a plain Keras model, with no sparsecore object in it.

During a run every sparse kernel carries a :class:`~.constraint.SparseMask` (the mask, applied
after each optimizer step, and the run's saved state). A model to ship needs none of that: its
weights are already exactly 0 outside the masks. :func:`strip` rebuilds the model from its config
with every ``SparseMask`` removed and copies the weights over (masked once more, so that the copy
is sparse even if a weight was changed outside ``fit``). The result saves and loads with plain
Keras where sparsecore is not installed, like ``tfmot.sparsity.keras.strip_pruning``. The PyTorch
counterpart is ``SparseTraining.detach()``.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from sparsecore.errors import SparseCoreError

from .constraint import SparseMask
from .discovery import model_layers

__all__ = ["strip"]

_REGISTERED_NAME = "sparsecore>SparseMask"


def strip(model: Any, *, in_place: bool = False) -> Any:
    """``model`` without its sparsecore masks: a plain Keras model with the same weights.

    By default a new model is built from ``model``'s config (its compile settings included, with
    a fresh optimizer, like ``keras.models.clone_model``) and given ``model``'s weights, zero
    outside the masks; ``model`` itself is left as it is, so a run can go on. A subclassed model
    without a usable ``get_config()`` cannot be rebuilt: pass ``in_place=True`` to remove the
    masks from ``model`` itself instead (its weights stay, masked; a ``SparseCallback`` attached
    to it must not be used again). Either way the returned model holds no sparsecore object.
    """
    if not isinstance(model, keras.Model):
        raise SparseCoreError(f"strip() takes a Keras model, got {type(model).__name__}")
    masked = _masked_values(model)
    if in_place:
        _remove_masks(model, masked)
        return model
    try:
        config = keras.saving.serialize_keras_object(model)
    except (NotImplementedError, TypeError, ValueError) as err:
        raise SparseCoreError(
            f"strip() rebuilds model {model.name!r} from its config, which it cannot give "
            f"({type(err).__name__}: {str(err)[:200]}); implement get_config()/from_config() on "
            f"{type(model).__name__}, or call strip(model, in_place=True)"
        ) from err
    # The classes of the model itself, so that unregistered custom layers and models rebuild.
    classes = {
        keras.saving.get_registered_name(type(layer)): type(layer)
        for _, layer in [("", model), *model_layers(model)]
    }
    try:
        plain = keras.saving.deserialize_keras_object(_drop_masks(config), custom_objects=classes)
    except (NotImplementedError, TypeError, ValueError) as err:
        raise SparseCoreError(
            f"strip() could not rebuild model {model.name!r} from its config "
            f"({type(err).__name__}: {str(err)[:200]}); call strip(model, in_place=True)"
        ) from err
    if len(plain.weights) != len(model.weights):
        raise SparseCoreError(
            f"strip(): the model rebuilt from {model.name!r}'s config has {len(plain.weights)} "
            f"weights, the model {len(model.weights)}; call strip(model, in_place=True)"
        )
    plain.set_weights([masked.get(id(v), _host(v)) for v in model.weights])
    return plain


def _host(variable: Any) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(variable.value))


def _masked_values(model: Any) -> dict[int, np.ndarray]:
    """``{id(variable): value with zeros outside the mask}`` for every masked variable."""
    out: dict[int, np.ndarray] = {}
    for variable in model.weights:
        constraint = getattr(variable, "constraint", None)
        if isinstance(constraint, SparseMask):
            value = _host(variable)
            out[id(variable)] = np.where(constraint.mask_numpy(), value, np.zeros_like(value))
    return out


def _remove_masks(model: Any, masked: dict[int, np.ndarray]) -> None:
    for variable in model.weights:
        if id(variable) in masked:
            variable.assign(masked[id(variable)])
            variable.constraint = None
    for _, layer in [("", model), *model_layers(model)]:
        for attr, value in list(vars(layer).items()):
            if isinstance(value, SparseMask):
                setattr(layer, attr, None)


def _drop_masks(config: Any) -> Any:
    """The serialized model with every SparseMask entry replaced by ``None``."""
    if isinstance(config, dict):
        if config.get("registered_name") == _REGISTERED_NAME or (
            config.get("class_name") == "SparseMask"
            and str(config.get("module", "")).startswith("sparsecore")
        ):
            return None
        return {k: _drop_masks(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_drop_masks(v) for v in config]
    return config
