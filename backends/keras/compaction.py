"""``sparsecore.keras.compact``: a sparse Keras model as a smaller dense one with the same outputs.

For Sequential and functional models. The model's graph (its layers and the tensors between
them) becomes the abstract graph of :mod:`sparsecore.compaction`, with the channel axis last
(Keras' ``channels_last``); the compact model is a new functional model of the same layer types
with fewer units and filters, built from the layers' configurations, with the kept weights.

Recognised: ``Dense`` (on any rank: it acts on the last axis), ``Conv2D`` (``channels_last``,
any strides, dilation, groups; ``padding="same"`` counts as zero padding when it pads), their
fused activations, ``BatchNormalization`` over the last axis, activation layers (``Activation``,
``ReLU``, ``LeakyReLU``, ``ELU``; softmax reads every channel), max and average pooling and their
global forms, ``Dropout``, ``Flatten`` and ``Add``. Anything else is copied whole and sees every
channel.

Removed constant channels are folded into the next layer's bias with their inference values, so
with the default ``for_training=False`` the compact model is exact in inference (what
``predict`` and ``training=False`` compute); in training mode a batch norm of a removed channel
would use batch statistics, and dropout would drop it, which the folded constant does not do.
``for_training=True`` keeps the channels that reach a batch norm or dropout as constants, which
makes the compact model exact in training mode too, at the price of fewer removals. A constant
channel that enters a zero-padded convolution is kept (no per-position bias maps in Keras).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import keras
import numpy as np
from keras import ops

from sparsecore.compaction import (
    CompactionPlan,
    CompactionReport,
    Op,
    flatten_channels,
    plan_compaction,
)
from sparsecore.errors import SparseCoreError

from .constraint import SparseMask

__all__ = ["compact", "compaction_plan"]

_L = keras.layers
_NOT_ELEMENTWISE = {"softmax", "log_softmax"}
_POOLS = (
    _L.MaxPooling2D,
    _L.AveragePooling2D,
    _L.GlobalAveragePooling2D,
    _L.GlobalMaxPooling2D,
)


@dataclass
class _Entry:
    """One node of the Keras graph: its operation (layer), its inputs' and output's tensors,
    its role and the abstract operations it stands for."""

    node: Any
    layer: Any
    role: str
    ops: list[Op]
    out: str  # the op whose channels the node's output tensor carries


def _is_functional(model: Any) -> bool:
    return hasattr(model, "_nodes_by_depth") and hasattr(model, "outputs") and model.outputs


def _graph_of(model: Any) -> Any:
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise SparseCoreError(
                f"Sequential model {model.name!r} has no input shape yet: build it (call it on "
                f"data, or start it with keras.Input) before compacting"
            )
        return functional
    if isinstance(model, keras.Model) and _is_functional(model):
        return model
    raise SparseCoreError(
        f"compact needs a Sequential or functional Keras model; {type(model).__name__} is a "
        f"subclassed model, whose graph Keras does not expose"
    )


def _nodes_in_order(graph: Any) -> list[Any]:
    """The graph's nodes, each once, inputs before the nodes that read them."""
    order: list[Any] = []
    seen: set[int] = set()

    def visit(tensor: Any) -> None:
        op, index, _ = tensor._keras_history
        node = op._inbound_nodes[index]
        if id(node) in seen:
            return
        seen.add(id(node))
        for t in node.input_tensors:
            visit(t)
        order.append(node)

    for t in graph.outputs:
        visit(t)
    return order


def _channels(tensor: Any) -> int:
    shape = tuple(tensor.shape)
    return int(shape[-1]) if len(shape) >= 2 and shape[-1] is not None else 0


def _activation_name(fn: Any) -> str | None:
    try:
        name = keras.activations.serialize(fn)
    except Exception:
        return None
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return name if isinstance(name, str) else None


def _conv_pads(layer: Any, in_shape: Sequence[Any]) -> bool:
    """Whether a Conv2D pads its input with zeros for this input size."""
    if layer.padding == "valid":
        return False
    for size, k, s, d in zip(in_shape[1:3], layer.kernel_size, layer.strides, layer.dilation_rate):
        if size is None:
            return True
        out = -(-int(size) // s)
        if max((out - 1) * s + (k - 1) * d + 1 - int(size), 0) > 0:
            return True
    return False


def _kernel_mask(layer: Any) -> np.ndarray:
    """Active kernel positions, in Keras layout: the SparseMask's, else the nonzero weights."""
    constraint = getattr(layer, "kernel_constraint", None)
    if isinstance(constraint, SparseMask):
        return constraint.mask_numpy()
    return np.asarray(ops.convert_to_numpy(layer.kernel)) != 0


def _out_first(kernel: np.ndarray) -> np.ndarray:
    """A Keras kernel ``(in, out)`` / ``(kh, kw, in, out)`` with the outputs first."""
    if kernel.ndim == 2:
        return kernel.T
    return np.transpose(kernel, (3, 2, 0, 1))


class _Reader:
    """Classifies the Keras graph's nodes into abstract operations."""

    def __init__(self, graph: Any, for_training: bool) -> None:
        self.graph = graph
        self.for_training = for_training
        self.tensor_op: dict[int, str] = {}
        self.uses: dict[int, int] = {}
        self.entries: list[_Entry] = []
        for node in _nodes_in_order(graph):
            self.uses[id(node.operation)] = self.uses.get(id(node.operation), 0) + 1

    def inputs(self, node: Any) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.tensor_op[id(t)] for t in node.input_tensors))

    def read(self) -> list[_Entry]:
        for node in _nodes_in_order(self.graph):
            if len(node.output_tensors) != 1:
                raise SparseCoreError(
                    f"layer {node.operation.name!r} has {len(node.output_tensors)} outputs; "
                    f"compact handles layers with one output"
                )
            entry = self.classify(node)
            self.tensor_op[id(node.output_tensors[0])] = entry.out
            self.entries.append(entry)
        outputs = tuple(dict.fromkeys(self.tensor_op[id(t)] for t in self.graph.outputs))
        self.entries.append(_Entry(None, None, "output", [Op("<outputs>", "output", outputs)], ""))
        return self.entries

    def entry(self, node: Any, role: str, ops_: list[Op]) -> _Entry:
        return _Entry(node, node.operation, role, ops_, ops_[-1].name)

    def opaque(self, node: Any) -> _Entry:
        layer = node.operation
        c = _channels(node.output_tensors[0])
        return self.entry(node, "opaque", [Op(layer.name, "opaque", self.inputs(node), c)])

    def classify(self, node: Any) -> _Entry:
        layer = node.operation
        out = node.output_tensors[0]
        c = _channels(out)
        if node.is_input:
            return self.entry(node, "input", [Op(layer.name, "input", (), c)])
        ins = self.inputs(node)
        if self.uses[id(layer)] > 1 or not ins:
            return self.opaque(node)
        single = len(node.input_tensors) == 1 and len(ins) == 1
        x = node.input_tensors[0] if node.input_tensors else None
        cin = _channels(x) if x is not None else 0
        if (
            single
            and isinstance(layer, (_L.Dense, _L.Conv2D))
            and type(layer)
            in (
                _L.Dense,
                _L.Conv2D,
            )
        ):
            return self.weighted(node, layer, x, c)
        if isinstance(layer, _L.Add) and len(ins) >= 2 and len(ins) == len(node.input_tensors):
            if all(tuple(t.shape) == tuple(out.shape) for t in node.input_tensors):
                return self.entry(node, "add", [Op(layer.name, "add", ins, c)])
            return self.opaque(node)
        if not single or cin == 0 or (cin != c and not isinstance(layer, _L.Flatten)):
            return self.opaque(node)
        assert x is not None
        if isinstance(layer, _L.BatchNormalization):
            axis = layer.axis if isinstance(layer.axis, int) else None
            if axis not in (-1, len(x.shape) - 1) or layer.renorm:
                return self.opaque(node)
            keeps = not self.for_training
            return self.entry(
                node, "batchnorm", [Op(layer.name, "channelwise", ins, c, uniform=keeps)]
            )
        if isinstance(layer, (_L.Activation, _L.ReLU, _L.LeakyReLU, _L.ELU)):
            name = (
                _activation_name(getattr(layer, "activation", None))
                if isinstance(layer, _L.Activation)
                else "builtin"
            )
            if name is None or name in _NOT_ELEMENTWISE:
                return self.opaque(node)
            return self.entry(node, "activation", [Op(layer.name, "channelwise", ins, c)])
        if isinstance(layer, _POOLS):
            if getattr(layer, "data_format", "channels_last") != "channels_last":
                return self.opaque(node)
            return self.entry(node, "same", [Op(layer.name, "channelwise", ins, c)])
        if isinstance(layer, _L.Dropout):
            keeps = not self.for_training
            return self.entry(node, "same", [Op(layer.name, "channelwise", ins, c, uniform=keeps)])
        if isinstance(layer, _L.Flatten):
            return self.flatten(node, layer, x, c)
        return self.opaque(node)

    def weighted(self, node: Any, layer: Any, x: Any, c: int) -> _Entry:
        in_shape = tuple(x.shape)
        if isinstance(layer, _L.Conv2D):
            if layer.data_format != "channels_last" or len(in_shape) != 4:
                return self.opaque(node)
            uniform = not _conv_pads(layer, in_shape)
            groups = int(layer.groups)
        else:
            uniform, groups = True, 1
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return self.opaque(node)
        mask = _out_first(_kernel_mask(layer))
        pre = Op(
            layer.name,
            "weighted",
            self.inputs(node),
            c,
            mask=mask,
            groups=groups,
            uniform=uniform,
        )
        act = _activation_name(layer.activation)
        if act == "linear":
            return self.entry(node, "weighted", [pre])
        kind = "opaque" if act is None or act in _NOT_ELEMENTWISE else "channelwise"
        post = Op(f"{layer.name}/activation", kind, (layer.name,), c)
        return self.entry(node, "weighted", [pre, post])

    def flatten(self, node: Any, layer: Any, x: Any, c: int) -> _Entry:
        shape = tuple(x.shape)
        ins = self.inputs(node)
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return self.opaque(node)
        if len(shape) == 2:
            return self.entry(node, "same", [Op(layer.name, "channelwise", ins, c)])
        spatial = shape[1:-1]
        if any(d is None for d in spatial):
            return self.opaque(node)
        positions = int(np.prod(spatial))
        op = Op(layer.name, "flatten", ins, c, positions=positions, channels_last=True)
        return self.entry(node, "flatten", [op])


def compaction_plan(model: Any, *, for_training: bool = False) -> CompactionPlan:
    """The compaction plan of a Sequential or functional Keras model (changes nothing)."""
    entries = _Reader(_graph_of(model), for_training).read()
    ops_ = [op for e in entries for op in e.ops]
    return plan_compaction(ops_, padded_constants="keep")


def _config(layer: Any, **changes: Any) -> dict[str, Any]:
    """The layer's config for a copy: sparsecore's mask constraints dropped, ``changes`` set."""
    cfg = dict(layer.get_config())
    for key, value in list(cfg.items()):
        if key.endswith("_constraint") and isinstance(getattr(layer, key, None), SparseMask):
            cfg[key] = None
        elif isinstance(value, dict) and value.get("registered_name") == "sparsecore>SparseMask":
            cfg[key] = None
    cfg.update(changes)
    return cfg


def _numpy(value: Any) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(value))


class _Builder:
    """Builds the compact functional model from the entries and the plan."""

    def __init__(self, entries: list[_Entry], plan: CompactionPlan) -> None:
        self.entries = entries
        self.plan = plan
        self.main: dict[str, Any] = {}
        self.side: dict[str, np.ndarray | None] = {}
        self.tensors: dict[int, Any] = {}  # original KerasTensor id -> new tensor

    def select(self, producer: str, channels: np.ndarray) -> np.ndarray | None:
        if channels.size == 0:
            return None
        values = self.side[producer]
        assert values is not None, producer
        return values[self.plan.side_positions(producer, channels)]

    def build(self, graph: Any, name: str) -> Any:
        inputs = []
        for entry in self.entries:
            if entry.role == "output":
                continue
            getattr(self, f"emit_{entry.role}")(entry)
            if entry.role == "input":
                inputs.append(self.main[entry.out])
            self.tensors[id(entry.node.output_tensors[0])] = self.main[entry.out]
        outputs = keras.tree.map_structure(
            lambda t: self.tensors[id(t)], getattr(graph, "_outputs_struct", graph.outputs)
        )
        return keras.Model(
            inputs=inputs if len(inputs) > 1 else inputs[0], outputs=outputs, name=name
        )

    def source(self, entry: _Entry) -> tuple[str, Any]:
        src = entry.ops[0].inputs[0]
        return src, self.main[src]

    def emit_input(self, entry: _Entry) -> None:
        t = entry.node.output_tensors[0]
        new = keras.Input(shape=tuple(t.shape)[1:], dtype=t.dtype, name=entry.layer.name)
        self.main[entry.out] = new
        self.side[entry.out] = None

    def emit_opaque(self, entry: _Entry) -> None:
        layer = entry.layer
        if isinstance(layer, keras.Model):
            copy = keras.models.clone_model(layer)
        elif isinstance(layer, keras.layers.Layer):
            copy = layer.__class__.from_config(_config(layer))
        else:
            copy = layer  # a keras.ops operation: stateless
        args, kwargs = entry.node.arguments.fill_in(self.tensors)
        self.main[entry.out] = copy(*args, **kwargs)
        if copy is not layer and layer.weights:
            copy.set_weights(layer.get_weights())
        self.side[entry.out] = None

    def emit_same(self, entry: _Entry) -> None:
        """Pooling, dropout, flatten of 2-D tensors: the layer on the kept channels; a constant
        stays the same constant."""
        src, x = self.source(entry)
        op = entry.ops[-1]
        self.main[op.name] = entry.layer.__class__.from_config(_config(entry.layer))(x)
        self.side[op.name] = self.select(src, self.plan[op.name].side)

    def emit_activation(self, entry: _Entry) -> None:
        src, x = self.source(entry)
        op = entry.ops[-1]
        copy = entry.layer.__class__.from_config(_config(entry.layer))
        self.main[op.name] = copy(x)
        values = self.select(src, self.plan[op.name].side)
        self.side[op.name] = None if values is None else _numpy(copy(values))

    def emit_batchnorm(self, entry: _Entry) -> None:
        src, x = self.source(entry)
        layer = entry.layer
        op = entry.ops[-1]
        layout = self.plan[op.name].layout
        copy = layer.__class__.from_config(_config(layer))
        self.main[op.name] = copy(x)
        for attr in ("gamma", "beta", "moving_mean", "moving_variance"):
            var = getattr(layer, attr, None)
            if var is not None:
                getattr(copy, attr).assign(_numpy(var)[layout])
        values = self.select(src, self.plan[op.name].side)
        if values is None:
            self.side[op.name] = None
            return
        idx = self.plan[op.name].side
        out = (values - _numpy(layer.moving_mean)[idx]) / np.sqrt(
            _numpy(layer.moving_variance)[idx] + layer.epsilon
        )
        if layer.scale:
            out = out * _numpy(layer.gamma)[idx]
        if layer.center:
            out = out + _numpy(layer.beta)[idx]
        self.side[op.name] = out

    def emit_flatten(self, entry: _Entry) -> None:
        src, x = self.source(entry)
        op = entry.ops[-1]
        self.main[op.name] = entry.layer.__class__.from_config(_config(entry.layer))(x)
        channel_of = flatten_channels(len(self.plan[src].constant), op.positions, True)
        self.side[op.name] = self.select(src, channel_of[self.plan[op.name].side])

    def emit_add(self, entry: _Entry) -> None:
        op = entry.ops[0]
        xs = [self.main[i] for i in op.inputs]
        self.main[op.name] = entry.layer.__class__.from_config(_config(entry.layer))(xs)
        side = self.plan[op.name].side
        parts = [v for v in (self.select(i, side) for i in op.inputs) if v is not None]
        self.side[op.name] = np.sum(parts, axis=0) if parts else None

    def emit_weighted(self, entry: _Entry) -> None:
        layer = entry.layer
        pre = entry.ops[0]
        src, x = self.source(entry)
        p = self.plan[pre.name]
        assert pre.mask is not None
        kernel = _numpy(layer.kernel).astype(np.float64) * _kernel_mask(layer)
        w = _out_first(kernel)  # (out, in[/groups], *taps)
        bias = _numpy(layer.bias).astype(np.float64) if layer.use_bias else None
        summed = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)
        self.side[pre.name] = self.weighted_side(pre, summed, bias)
        out_idx = p.layout
        new_bias = None if bias is None else bias[out_idx]
        if pre.groups > 1:
            new_w = w[out_idx]
            changes: dict[str, Any] = {"groups": int(p.groups_kept.size)}
        else:
            new_w = w[out_idx][:, p.in_layout]
            changes = {}
            if p.fold.size:
                values = self.select(src, p.fold)
                assert values is not None
                extra = summed[out_idx][:, p.fold] @ values
                new_bias = extra if new_bias is None else new_bias + extra
        width = "units" if isinstance(layer, _L.Dense) else "filters"
        changes[width] = int(len(out_idx))
        changes["use_bias"] = new_bias is not None
        copy = layer.__class__.from_config(_config(layer, **changes))
        y = copy(x)
        dtype = keras.backend.standardize_dtype(layer.kernel.dtype)
        keras_kernel = new_w.T if new_w.ndim == 2 else np.transpose(new_w, (2, 3, 1, 0))
        copy.kernel.assign(keras_kernel.astype(dtype))
        if new_bias is not None:
            copy.bias.assign(new_bias.astype(dtype))
        self.main[pre.name] = None
        if len(entry.ops) == 2:
            post = entry.ops[1]
            self.main[post.name] = y
            values = self.select(pre.name, self.plan[post.name].side)
            self.side[post.name] = (
                None if values is None else _numpy(layer.activation(values.astype(dtype)))
            )
        else:
            self.main[pre.name] = y

    def weighted_side(
        self, op: Op, summed: np.ndarray, bias: np.ndarray | None
    ) -> np.ndarray | None:
        side = self.plan[op.name].side
        if side.size == 0:
            return None
        values = np.zeros(side.size) if bias is None else bias[side].copy()
        src = op.inputs[0]
        src_side = self.plan[src].side
        if src_side.size:
            full = summed
            if op.groups > 1:
                per_out, per_in = op.channels // op.groups, summed.shape[1]
                full = np.zeros((op.channels, per_in * op.groups))
                for g in range(op.groups):
                    rows = slice(g * per_out, (g + 1) * per_out)
                    full[rows, g * per_in : (g + 1) * per_in] = summed[rows]
            used = full[side][:, src_side]
            if used.any():
                assert self.side[src] is not None
                values = values + used @ self.side[src]
        return values


def compact(
    model: Any,
    example_input: Any = None,
    *,
    for_training: bool = False,
    check: bool = True,
) -> tuple[Any, CompactionReport]:
    """A smaller Keras model with the same outputs as ``model``, and what was removed.

    ``model``: a built Sequential or functional model. Active weights: the masks of a model
    trained with :class:`sparsecore.keras.SparseCallback` (its ``SparseMask`` constraints), else
    the nonzero kernel entries. Returns ``(compact_model, report)``: a functional model of the
    same layer types with fewer units and filters (no sparsecore constraints), and a
    :class:`sparsecore.compaction.CompactionReport`. ``for_training``: see the module docstring
    (default: exact in inference). With ``check=True`` both models run once on
    ``example_input`` (default: 4 random samples of the model's input shape) with
    ``training=False``; the report holds the largest difference, and a difference beyond rounding
    raises :class:`sparsecore.SparseCoreError`. The original model is not changed.
    """
    graph = _graph_of(model)
    entries = _Reader(graph, for_training).read()
    plan = plan_compaction([op for e in entries for op in e.ops], padded_constants="keep")
    small = _Builder(entries, plan).build(graph, name=f"compact_{model.name}")
    report = plan.report()
    notes = (
        [
            "kept whole (not analysed): "
            + ", ".join(e.layer.name for e in entries if e.role == "opaque")
        ]
        if any(e.role == "opaque" for e in entries)
        else []
    )
    report = replace(report, notes=tuple(notes))
    if check:
        report = _check(model, small, example_input, report)
    return small, report


def _example(model: Any) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for t in model.inputs:
        shape = tuple(t.shape)[1:]
        if any(d is None for d in shape):
            raise SparseCoreError(
                f"input {t.name!r} has shape {tuple(t.shape)} with unknown sizes; pass "
                f"example_input to compact()"
            )
        dtype = keras.backend.standardize_dtype(t.dtype)
        out.append(rng.standard_normal((4, *shape)).astype(dtype))
    return out


def _check(
    model: Any, small: Any, example_input: Any, report: CompactionReport
) -> CompactionReport:
    inputs = _example(model) if example_input is None else example_input
    if isinstance(inputs, list) and len(inputs) == 1:
        inputs = inputs[0]
    want = [_numpy(t) for t in keras.tree.flatten(model(inputs, training=False))]
    got = [_numpy(t) for t in keras.tree.flatten(small(inputs, training=False))]
    diff = scale = tolerance = 0.0
    for w, g in zip(want, got):
        if w.shape != g.shape:
            raise SparseCoreError(
                f"compaction changed an output's shape from {w.shape} to {g.shape}"
            )
        finite = np.isfinite(w)
        if np.any(finite):
            diff = max(diff, float(np.max(np.abs(w[finite] - g[finite]))))
            scale = max(scale, float(np.max(np.abs(w[finite]))))
        if np.issubdtype(w.dtype, np.floating):
            tolerance = max(tolerance, float(np.sqrt(np.finfo(w.dtype).eps)))
    if diff > tolerance * max(scale, 1.0):
        raise SparseCoreError(
            f"the compact model's outputs differ from the model's by up to {diff:.3g} (outputs up "
            f"to {scale:.3g}); please report it with the model"
        )
    return replace(report, max_abs_difference=diff, output_scale=scale)
