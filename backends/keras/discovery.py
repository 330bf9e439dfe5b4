"""Which weights of a Keras model are sparse, and along which axis their output units lie.

Keras kernels put the output units last (Dense ``(in, out)``, Conv ``(*k, in, out)``), except the
transposed convolutions ``(*k, out, in)`` and the depthwise kernels ``(*k, in, multiplier)`` whose
output units are the input channels (one group of ``multiplier`` per channel). Layers are found
anywhere in the model: nested models, functional graphs and subclassed models alike. Users declare
their own layer types, the weight to make sparse and its output axis, with
:func:`register_layer_type`.

``EinsumDense`` kernels are sparse by default (so are the query, key, value and output
projections of ``MultiHeadAttention``, which are EinsumDense layers); their output axis is the
last kernel axis that the equation's output has and its input has not (the units of
``attention_output``'s ``(heads, dim, out)`` kernel; for the query/key/value kernels
``(in, heads, dim)``, the ``dim`` axis, so a unit there groups one dimension of every head).

Recurrent layers (``LSTM``, ``GRU``, ``SimpleRNN``) and ``Embedding`` are dense unless included:
naming the recurrent layer (or its cell) in ``include`` makes its cell's ``kernel`` ``(in,
gates * units)`` and ``recurrent_kernel`` ``(units, gates * units)`` sparse, output axis -1, so
every gate's columns are separate output units; ``embeddings=True`` or including an Embedding
makes its table sparse.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import keras

from sparsecore.errors import SparseCoreError

__all__ = ["SparseWeight", "find_sparse_weights", "model_layers", "register_layer_type"]

# (layer class, attribute holding the variable, attribute holding its constraint, output axis);
# the first matching class wins, so subclasses come before their bases.
_L = keras.layers
_EINSUM_AXIS = 1 << 30  # marks "read the output axis from the layer's equation"
_RULES: list[tuple[type, str, str, int]] = [
    (_L.SeparableConv1D, "depthwise_kernel", "depthwise_constraint", -2),
    (_L.SeparableConv1D, "pointwise_kernel", "pointwise_constraint", -1),
    (_L.SeparableConv2D, "depthwise_kernel", "depthwise_constraint", -2),
    (_L.SeparableConv2D, "pointwise_kernel", "pointwise_constraint", -1),
    (_L.DepthwiseConv1D, "kernel", "depthwise_constraint", -2),
    (_L.DepthwiseConv2D, "kernel", "depthwise_constraint", -2),
    (_L.Conv1DTranspose, "kernel", "kernel_constraint", -2),
    (_L.Conv2DTranspose, "kernel", "kernel_constraint", -2),
    (_L.Conv3DTranspose, "kernel", "kernel_constraint", -2),
    (_L.Conv1D, "kernel", "kernel_constraint", -1),
    (_L.Conv2D, "kernel", "kernel_constraint", -1),
    (_L.Conv3D, "kernel", "kernel_constraint", -1),
    (_L.Dense, "kernel", "kernel_constraint", -1),
    (_L.EinsumDense, "kernel", "kernel_constraint", _EINSUM_AXIS),
]
# Sparse only when included (the cell, or the recurrent layer that holds it).
_CELL_RULES: list[tuple[type, str, str, int]] = [
    (cell, attr, constraint, -1)
    for cell in (_L.LSTMCell, _L.GRUCell, _L.SimpleRNNCell)
    for attr, constraint in (
        ("kernel", "kernel_constraint"),
        ("recurrent_kernel", "recurrent_constraint"),
    )
]
# Rules users declared (register_layer_type), searched before the built-in ones.
_USER_RULES: list[tuple[type, str, str, int]] = []


def register_layer_type(
    layer_type: type, *, attr: str = "kernel", constraint_attr: str | None = None, axis: int = -1
) -> None:
    """Make the weight ``attr`` of layers of ``layer_type`` sparse, with output axis ``axis``.

    ``constraint_attr``: the layer attribute that holds that weight's constraint, so that
    ``get_config()`` saves the mask (default ``f"{attr}_constraint"``). A later registration of
    the same type and weight replaces the earlier one. Applies to callbacks attached afterwards::

        sparsecore.keras.register_layer_type(MyDense, attr="w", axis=0)   # w is (out, in)
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, keras.layers.Layer)):
        raise SparseCoreError(
            f"layer_type must be a keras.layers.Layer subclass, got {layer_type!r}"
        )
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise SparseCoreError(f"axis must be an integer, got {axis!r}")
    if not isinstance(attr, str) or not attr:
        raise SparseCoreError(f"attr must be the name of the layer's weight, got {attr!r}")
    rule = (layer_type, attr, constraint_attr or f"{attr}_constraint", axis)
    _USER_RULES[:] = [r for r in _USER_RULES if (r[0], r[1]) != (layer_type, attr)] + [rule]


_EMBEDDING_RULE: tuple[type, str, str, int] = (
    _L.Embedding,
    "embeddings",
    "embeddings_constraint",
    -1,
)


@dataclass(frozen=True)
class SparseWeight:
    """One sparse weight: its layer, the variable, where its constraint lives, its output axis."""

    name: str
    layer: Any
    variable: Any
    attr: str
    constraint_attr: str
    axis: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.variable.shape)


def model_layers(model: Any) -> list[tuple[str, Any]]:
    """Every layer inside ``model`` (depth first, each once) with its path of layer names.

    The path (``"block/dense_1"``) names a layer by where it sits in the model, not by the
    session-dependent model name or variable path, so a saved and reloaded model (whose outer
    name may have changed, e.g. ``sequential`` -> ``sequential_1``) names its weights the same.
    """
    if not isinstance(model, keras.layers.Layer):
        raise SparseCoreError(f"expected a Keras model or layer, got {type(model).__name__}")
    out: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def visit(layer: Any, prefix: str) -> None:
        for child in layer._flatten_layers(include_self=False, recursive=False):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            out.append((path, child))
            visit(child, path + "/")

    visit(model, "")
    return out


def _matches(layer: Any, patterns: Sequence[Any]) -> bool:
    for pattern in patterns:
        if isinstance(pattern, type):
            if isinstance(layer, pattern):
                return True
        elif isinstance(pattern, str):
            if fnmatch.fnmatchcase(layer.name, pattern) or type(layer).__name__ == pattern:
                return True
        else:
            raise SparseCoreError(
                f"include/exclude entries must be layer names, name patterns, class names or "
                f"layer classes, got {pattern!r}"
            )
    return False


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, type)):
        return [value]
    if isinstance(value, Iterable):
        return list(value)
    return [value]


def einsum_output_axis(layer: Any) -> int:
    """The output axis of an EinsumDense kernel: the last kernel axis whose letter the
    equation's output has and its input has not (negative, as Keras kernels count from the
    end)."""
    equation = str(layer.equation).replace(" ", "")
    inputs, output = equation.split("->")
    data, kernel = inputs.split(",")
    axes = [i for i, c in enumerate(kernel) if c in output and c not in data]
    if not axes:
        raise SparseCoreError(
            f"layer {layer.name!r}: EinsumDense equation {equation!r} has no output axis in "
            f"its kernel"
        )
    return axes[-1] - len(kernel)


def _rule_for(layer: Any, embeddings: bool) -> list[tuple[type, str, str, int]]:
    if isinstance(layer, _L.RNN):
        return []  # its cell holds the weights (see _CELL_RULES)
    table = [*reversed(_USER_RULES), *_RULES]
    rules = [r for r in table if type(layer) is r[0]] or [
        r for r in table if isinstance(layer, r[0])
    ]
    if rules:
        first = rules[0][0]
        rules = [r for r in rules if r[0] is first]
    if not rules and embeddings and isinstance(layer, _EMBEDDING_RULE[0]):
        rules = [_EMBEDDING_RULE]
    return rules


# Layers whose weights live in sublayers: including (or excluding) one includes its sublayers.
_HOLDERS = (_L.RNN, _L.MultiHeadAttention)


def _cell_rules(layer: Any) -> list[tuple[type, str, str, int]]:
    return [r for r in _CELL_RULES if type(layer) is r[0]] or [
        r for r in _CELL_RULES if isinstance(layer, r[0])
    ]


def find_sparse_weights(
    model: Any,
    *,
    include: Any = None,
    exclude: Any = None,
    dense_first: bool = False,
    dense_last: bool = False,
    embeddings: bool = False,
) -> list[SparseWeight]:
    """The model's sparse weights, in layer order.

    By default: the kernels of Dense, EinsumDense (MultiHeadAttention's projections included),
    Conv1D/2D/3D (transposed, depthwise and separable too). ``include``/``exclude``: layer names,
    ``fnmatch`` patterns of names, class names or classes; with ``include`` only matching layers
    are sparse, and an included LSTM, GRU or SimpleRNN (or its cell) has its kernel and
    recurrent kernel sparse. ``embeddings=True`` adds Embedding tables.
    ``dense_first``/``dense_last`` keep the first/last such layer dense.
    """
    if not getattr(model, "built", False):
        raise SparseCoreError(
            f"model {getattr(model, 'name', model)!r} is not built yet: call it on data, "
            f"build(input_shape) it, or give it an Input before attaching sparsity"
        )
    includes, excludes = _as_list(include), _as_list(exclude)
    found: list[SparseWeight] = []
    seen_vars: set[int] = set()
    candidates = []
    layers = model_layers(model)
    by_path = dict(layers)

    def hit(path: str, layer: Any, patterns: list[Any]) -> bool:
        """``layer`` matches, or the recurrent or attention layer that holds it does."""
        if _matches(layer, patterns):
            return True
        parent = by_path.get(path.rpartition("/")[0])
        return isinstance(parent, _HOLDERS) and _matches(parent, patterns)

    for path, layer in layers:
        included = bool(includes) and hit(path, layer, includes)
        rules = _rule_for(layer, embeddings or included)
        if not rules and included:
            rules = _cell_rules(layer)
        if not rules:
            if included and not isinstance(layer, (keras.Model, *_HOLDERS)):
                has_weights = any(len(v.shape) >= 2 for v in layer.trainable_weights)
                if has_weights:
                    raise SparseCoreError(
                        f"layer {layer.name!r} ({type(layer).__name__}) was included but "
                        f"sparsecore does not know which of its weights to make sparse; "
                        f"supported: Dense, EinsumDense, Conv*, DepthwiseConv*, SeparableConv*, "
                        f"Conv*Transpose, Embedding, LSTM, GRU, SimpleRNN"
                    )
            continue
        if not layer.built:
            raise SparseCoreError(f"layer {layer.name!r} is not built yet; build the model first")
        candidates.append((path, layer, rules))
    if dense_first and candidates:
        candidates = candidates[1:]
    if dense_last and candidates:
        candidates = candidates[:-1]
    names: set[str] = set()
    for path, layer, rules in candidates:
        if includes and not hit(path, layer, includes):
            continue
        if excludes and hit(path, layer, excludes):
            continue
        if getattr(layer, "lora_enabled", False):
            raise SparseCoreError(
                f"layer {layer.name!r} has LoRA enabled; sparsecore masks plain kernels only"
            )
        for _, attr, constraint_attr, axis in rules:
            variable = getattr(layer, attr, None)
            if not isinstance(variable, keras.Variable) or not variable.trainable:
                continue
            if axis == _EINSUM_AXIS:
                axis = einsum_output_axis(layer)
            if not -len(variable.shape) <= axis < len(variable.shape):
                raise SparseCoreError(
                    f"layer {layer.name!r}: its weight {attr!r} of shape {tuple(variable.shape)} "
                    f"has no output axis {axis}"
                )
            if id(variable) in seen_vars:  # a layer shared between models
                continue
            seen_vars.add(id(variable))
            name = f"{path}/{attr}"
            base, n = name, 1
            while name in names:
                n += 1
                name = f"{base}_{n}"
            names.add(name)
            found.append(SparseWeight(name, layer, variable, attr, constraint_attr, axis))
    return found
