"""The checks of one mask update's inputs, made before any work; each failure names what is wrong.

:func:`check_structure` (types, dtypes, shapes, the arrays the chosen modes read) runs once per
update; :func:`check_finite` (NaN/Inf in the arrays read) runs before the step-by-step path, while
a fused update finds NaN/Inf in its own reads and calls it only to name the array it found.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .backend import ArrayBackend
from .errors import NonFiniteError, SparseCoreError
from .layers import Layer
from .validation import check_integer, check_real


def check_layers(
    backend: ArrayBackend,
    layers: Sequence[Layer],
    *,
    momentum: bool,
    grad: bool,
    finite: bool = True,
) -> None:
    """Raise :class:`SparseCoreError` for the first bad layer; change nothing.

    ``finite=False`` leaves out the NaN/Inf checks (:func:`check_finite`), which a fused update
    makes in its own passes.
    """
    check_structure(backend, layers, momentum=momentum, grad=grad)
    if finite:
        check_finite(backend, layers, momentum=momentum, grad=grad)


def check_finite(
    backend: ArrayBackend, layers: Sequence[Layer], *, momentum: bool, grad: bool
) -> None:
    """NaN/Inf in the arrays read (the weight; momentum and gradient when ``momentum`` and
    ``grad`` say they are read): the first one, in layer order, raises naming layer and array."""
    for layer in layers:
        for label, array, read in (
            ("weight", layer.weight, True),
            ("momentum", layer.momentum, momentum),
            ("grad", layer.grad, grad),
        ):
            if read and not backend.all_finite(array):
                raise NonFiniteError(
                    f"layer {layer.name!r}: {label} contains NaN or Inf; the mask update was not "
                    f"made (nothing changed)"
                )


def check_structure(
    backend: ArrayBackend, layers: Sequence[Layer], *, momentum: bool, grad: bool
) -> None:
    """Types, dtypes and shapes of every layer, and the presence of the arrays read.

    The first bad layer is the one named, as if each layer were checked in full in turn: on a
    bad layer, the layers before it are checked for NaN/Inf first (only then, on the way to an
    error; an update that goes on checks them once, in its own way).
    """
    if len(layers) == 0:
        raise SparseCoreError("no layers given: a mask update needs at least one sparse layer")
    seen: set[str] = set()
    for i, layer in enumerate(layers):
        try:
            _check_layer_structure(backend, layer, seen, momentum=momentum, grad=grad)
        except SparseCoreError:
            check_finite(backend, layers[:i], momentum=momentum, grad=grad)
            raise


def _check_layer_structure(
    backend: ArrayBackend, layer: Layer, seen: set[str], *, momentum: bool, grad: bool
) -> None:
    """One layer's structure (``seen``: the names of the layers before it)."""
    if not isinstance(layer, Layer):
        raise SparseCoreError(f"expected sparsecore.Layer objects, got {type(layer).__name__}")
    name = layer.name
    if name in seen:
        raise SparseCoreError(f"two layers are named {name!r}; layer names must be unique")
    seen.add(name)
    for label, array, kind in (("weight", layer.weight, "f"), ("mask", layer.mask, "b")):
        if array is None or not backend.owns(array):
            raise SparseCoreError(
                f"layer {name!r}: {label} must be a {backend.name} array, got {type(array).__name__}"
            )
        if backend.dtype_kind(array) != kind:
            want = "a floating-point" if kind == "f" else "a boolean"
            raise SparseCoreError(
                f"layer {name!r}: {label} must be {want} array, got dtype {array.dtype}"
            )
    shape = backend.shape(layer.weight)
    if backend.shape(layer.mask) != shape:
        raise SparseCoreError(
            f"layer {name!r}: mask shape {backend.shape(layer.mask)} differs from weight shape {shape}"
        )
    if len(shape) == 0 or math.prod(shape) == 0:
        raise SparseCoreError(f"layer {name!r}: weight of shape {shape} has no elements")
    if not -len(shape) <= layer.axis < len(shape):
        raise SparseCoreError(
            f"layer {name!r}: output axis {layer.axis} is out of range for shape {shape}"
        )
    for label, array, required in (
        ("momentum", layer.momentum, momentum),
        ("grad", layer.grad, grad),
    ):
        if array is None:
            if required:
                raise SparseCoreError(
                    f"layer {name!r}: this update needs its {label} (the chosen modes read it)"
                )
            continue
        if not backend.owns(array) or backend.dtype_kind(array) != "f":
            raise SparseCoreError(
                f"layer {name!r}: {label} must be a floating-point {backend.name} array"
            )
        if backend.shape(array) != shape:
            raise SparseCoreError(
                f"layer {name!r}: {label} shape {backend.shape(array)} differs from weight shape {shape}"
            )


def ablation_fractions(
    layers: Sequence[Layer], ablate_below: float | Sequence[float]
) -> tuple[float, ...]:
    """``ablate_below`` per layer: one value for all, or one per layer, each in [0, 1]."""
    if isinstance(ablate_below, (str, bytes)) or not isinstance(ablate_below, Sequence):
        value = check_real("ablate_below", ablate_below, low=0.0, high=1.0)
        return (value,) * len(layers)
    if len(ablate_below) != len(layers):
        raise SparseCoreError(
            f"ablate_below has {len(ablate_below)} values for {len(layers)} layers; give one "
            f"value, or one per layer"
        )
    return tuple(
        check_real(
            f"layer {getattr(layer, 'name', layer)!r}: ablate_below", value, low=0.0, high=1.0
        )
        for layer, value in zip(layers, ablate_below)
    )


def check_update_args(
    prune_rate: Any, update_index: Any, seed: Any, max_density: Any, min_density: Any, step: Any
) -> tuple[float, int, int, float, float, int | None]:
    """The update's options as plain Python values; a bad one raises naming it and its range."""
    rate = check_real("prune rate", prune_rate, low=0.0, high=1.0)
    index = check_integer(
        "update_index", update_index, minimum=1, what="an integer >= 1 (0 is the initial mask)"
    )
    seed = check_integer("seed", seed, minimum=0)
    max_density = check_real("max_density", max_density, low=0.0, high=1.0, low_open=True)
    min_density = check_real(
        f"min_density (at most max_density={max_density:g})",
        min_density,
        low=0.0,
        high=max_density,
    )
    step = None if step is None else check_integer("step", step, minimum=0)
    return rate, index, seed, max_density, min_density, step
