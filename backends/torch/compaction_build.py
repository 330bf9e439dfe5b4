"""Build the compact ``nn.Module`` from a traced model and its compaction plan.

The new model is a ``torch.fx.GraphModule`` over smaller copies of the original layers, node for
node in the original order. Every node gets up to two values:

- its *main* tensor: the channels of its layout (the plan's ``layout``), computed by the smaller
  layer (``nn.Linear``/``nn.Conv2d`` with the kept rows and columns, ``BatchNorm`` over the kept
  channels; parameterless operations as they were);
- its *side* vector: one value per constant channel that a later layer folds in (the plan's
  ``side``). Side values that do not depend on the mode are computed here, once, and stored as
  buffers (or folded straight into a bias); those that pass a batch norm are computed on every
  call by :class:`~.compaction_modules.ConstantChannelNorm`, because batch norm maps a constant
  to its shift in training mode and through the running statistics in evaluation mode.

A layer folds the constant channels it reads into its bias (linear layers, convolutions without
zero padding: the sum of the weights over the taps times the value) or adds their per-position
map (zero-padded convolutions, :func:`~.compaction_modules.constant_map`). Whatever compaction
removes is frozen: weights that read constants and the statistics of removed channels become
buffers; the compact model's parameters are the kept weights.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from sparsecore.compaction import CompactionPlan, Op, flatten_channels

from .compaction_graph import DROPOUT_FUNCTIONS, NodeRole, TracedModel
from .compaction_modules import ConstantChannelNorm, constant_map

__all__ = ["build_compact"]

Side = torch.Tensor | fx.Node | None


def _put(root: nn.Module, path: str, value: Any) -> None:
    """Install a module, parameter or buffer at a dotted path, creating containers on the way."""
    *parents, leaf = path.split(".")
    here = root
    for part in parents:
        child = getattr(here, part, None)
        if child is None:
            child = nn.Module()
            here.add_module(part, child)
        here = child
    if isinstance(value, nn.Module):
        here.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        here.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        here.register_buffer(leaf, value)
    else:
        setattr(here, leaf, value)


def _param(value: torch.Tensor, like: torch.Tensor | None) -> nn.Parameter:
    requires_grad = True if like is None else like.requires_grad
    return nn.Parameter(value.detach().clone(), requires_grad=requires_grad)


def _fresh_copy(module: nn.Module | None) -> nn.Module:
    """A copy of a module for the compact model. A ``forward`` installed on an instance (sparse
    kernels under ``attach(kernels=...)``) belongs to the original and does not follow."""
    assert module is not None
    new = copy.deepcopy(module)
    for sub in new.modules():
        sub.__dict__.pop("forward", None)
    return new


def _side_copy(module: nn.Module) -> nn.Module:
    """A copy of an elementwise module for side vectors: never in place, its parameters (a
    one-parameter PReLU) frozen like everything else compaction removes."""
    new = _fresh_copy(module)
    if getattr(new, "inplace", False):
        new.inplace = False  # type: ignore[assignment]
    for p in new.parameters():
        p.requires_grad_(False)
    return new


def _sum_over_taps(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in)``: a layer's weights summed over the kernel taps, in float64."""
    return weight.detach().to(torch.float64).reshape(weight.shape[0], weight.shape[1], -1).sum(2)


class _Builder:
    def __init__(self, traced: TracedModel, plan: CompactionPlan, masks: dict[str, np.ndarray]):
        self.traced = traced
        self.plan = plan
        self.masks = masks
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.constants = nn.Module()
        self.root.add_module("constants", self.constants)
        self.main: dict[str, Any] = {}
        self.side: dict[str, Side] = {}
        self.ops: dict[str, Op] = {op.name: op for op in traced.ops}
        tensors = [*traced.graph_module.parameters(), *traced.graph_module.buffers()]
        self.device = tensors[0].device if tensors else torch.device("cpu")

    # -- emitting -----------------------------------------------------------------------------
    def buffer(self, name: str, value: torch.Tensor) -> fx.Node:
        """A constant tensor of the compact model (registered as a buffer), as a graph node."""
        key = name
        n = 1
        while hasattr(self.constants, key):
            n += 1
            key = f"{name}_{n}"
        self.constants.register_buffer(key, value.detach().clone())
        return self.graph.get_attr(f"constants.{key}")

    def module(self, path: str, module: nn.Module) -> str:
        _put(self.root, path, module)
        return path

    def side_module(self, name: str, module: nn.Module) -> str:
        key, n = name, 1
        while hasattr(self.constants, key):
            n += 1
            key = f"{name}_{n}"
        self.constants.add_module(key, module)
        return f"constants.{key}"

    def call(
        self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> fx.Node:
        return self.graph.create_node(kind, target, args, kwargs or {})

    def as_node(self, value: Side, name: str) -> Any:
        if isinstance(value, torch.Tensor):
            return self.buffer(name, value)
        return value

    def select(self, producer: str, channels: np.ndarray, name: str) -> Side:
        """The side values of ``channels`` of ``producer``, in that order."""
        if channels.size == 0:
            return None
        pos = self.plan.side_positions(producer, channels)
        value = self.side[producer]
        if value is None:
            raise AssertionError(f"{producer!r} carries no side values")
        if isinstance(value, torch.Tensor):
            return value[torch.as_tensor(pos, device=value.device)].clone()
        if np.array_equal(pos, np.arange(len(self.plan[producer].side))):
            return value
        index = self.buffer(
            f"{name}_index", torch.as_tensor(pos, dtype=torch.long, device=self.device)
        )
        return self.call("call_function", torch.index_select, (value, 0, index))

    def mapped(self, value: Any) -> Any:
        def lookup(n: fx.Node) -> Any:
            new = self.main.get(n.name)
            if new is None:
                raise AssertionError(f"node {n.name!r} is read but was not computed")
            return new

        return fx.node.map_arg(value, lookup)

    def copy_node(self, node: fx.Node) -> fx.Node:
        new = self.graph.node_copy(node, lambda n: self.mapped(n))
        if isinstance(new.type, str):
            # a string annotation (``from __future__ import annotations``) cannot be pickled
            new.type = None
        return new

    def replace_arg(
        self, node: fx.Node, arg: int | str | None, value: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The node's arguments mapped to the compact graph, with ``value`` at ``arg``."""
        args, kwargs = list(node.args), dict(node.kwargs)
        if isinstance(arg, int):
            args[arg] = None
        elif isinstance(arg, str):
            kwargs[arg] = None
        args, kwargs = list(self.mapped(tuple(args))), dict(self.mapped(kwargs))
        if isinstance(arg, int):
            args[arg] = value
        elif isinstance(arg, str):
            kwargs[arg] = value
        return tuple(args), kwargs

    # -- the walk ------------------------------------------------------------------------------
    def build(self, class_name: str, training: bool) -> fx.GraphModule:
        for node in self.traced.graph_module.graph.nodes:
            role = self.traced.roles[node.name]
            getattr(self, f"emit_{role.action}")(node, role)
        gm = fx.GraphModule(self.root, self.graph, class_name=class_name)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        constants = getattr(gm, "constants", None)
        if isinstance(constants, nn.Module):  # buffers of code that turned out to be dead
            for name in [b for b in constants._buffers if f"constants.{b}" not in used]:
                del constants._buffers[name]
        gm.recompile()
        gm.training = training
        for module in gm.modules():
            if type(module) is nn.Module:  # containers made on the way: the model's mode
                module.training = training
        return gm

    def layout(self, node: fx.Node) -> np.ndarray:
        return self.plan[node.name].layout

    def check_full(self, role: NodeRole) -> None:
        assert role.op is not None
        for name in role.op.inputs:
            op = self.ops[name]
            if self.plan[name].layout.size != op.channels:
                raise AssertionError(f"{name!r} reaches {role.op.name!r} without all its channels")

    def emit_input(self, node: fx.Node, role: NodeRole) -> None:
        self.main[node.name] = self.copy_node(node)
        self.side[node.name] = None

    def emit_copy(self, node: fx.Node, role: NodeRole) -> None:
        try:
            self.main[node.name] = self.copy_node(node)
        except AssertionError:
            self.main[node.name] = None  # reads a tensor that compaction removed: dead code

    def emit_output(self, node: fx.Node, role: NodeRole) -> None:
        self.check_full(role)
        self.copy_node(node)

    def emit_opaque(self, node: fx.Node, role: NodeRole) -> None:
        self.check_full(role)
        gm = self.traced.graph_module
        if node.op == "call_module":
            self.module(str(node.target), _fresh_copy(gm.get_submodule(str(node.target))))
        elif node.op == "get_attr":
            value = _attr(gm, str(node.target))
            if isinstance(value, nn.Parameter):
                _put(self.root, str(node.target), _param(value, value))
            elif isinstance(value, torch.Tensor):
                _put(self.root, str(node.target), value.detach().clone())
            elif isinstance(value, nn.Module):
                _put(self.root, str(node.target), _fresh_copy(value))
            else:
                _put(self.root, str(node.target), copy.deepcopy(value))
        self.main[node.name] = self.copy_node(node)
        self.side[node.name] = None

    # channelwise operations -------------------------------------------------------------------
    def channel_source(self, role: NodeRole) -> str:
        assert role.op is not None and len(role.op.inputs) == 1
        return role.op.inputs[0]

    def emit_same(self, node: fx.Node, role: NodeRole) -> None:
        """Pooling, mean, upsampling, dropout: applied to the kept channels as they are; a
        constant stays the same constant."""
        src = self.channel_source(role)
        if self.layout(node).size:
            if node.op == "call_module":
                self.module(str(node.target), _fresh_copy(role.module))
            args, kwargs = self.replace_arg(node, role.arg, self.main[src])
            self.main[node.name] = self.call(node.op, node.target, args, kwargs)
        else:
            self.main[node.name] = None
        self.side[node.name] = self.select(src, self.plan[node.name].side, node.name)

    def emit_identity(self, node: fx.Node, role: NodeRole) -> None:
        """A reshape that changes nothing (``(N, F)`` to ``(N, F)``)."""
        src = self.channel_source(role)
        self.main[node.name] = self.main[src]
        self.side[node.name] = self.select(src, self.plan[node.name].side, node.name)

    def emit_dropout(self, node: fx.Node, role: NodeRole) -> None:
        """Functional dropout becomes its module, which follows the compact model's mode (the
        trace froze the original call's ``training`` argument)."""
        src = self.channel_source(role)
        self.side[node.name] = None
        if not self.layout(node).size:
            self.main[node.name] = None
            return
        kw = node.normalized_arguments(self.traced.graph_module, normalize_to_only_use_kwargs=True)
        params = dict(kw.kwargs) if kw is not None else {}
        cls = DROPOUT_FUNCTIONS[node.target]  # type: ignore[index]
        module = cls(p=float(params.get("p", 0.5)), inplace=bool(params.get("inplace", False)))
        module.train(self.traced.graph_module.training)
        target = self.module(f"dropout_{node.name}", module)
        self.main[node.name] = self.call("call_module", target, (self.main[src],))

    def emit_elementwise(self, node: fx.Node, role: NodeRole) -> None:
        src = self.channel_source(role)
        if self.layout(node).size:
            if node.op == "call_module":
                self.module(str(node.target), _fresh_copy(role.module))
            args, kwargs = self.replace_arg(node, role.arg, self.main[src])
            self.main[node.name] = self.call(node.op, node.target, args, kwargs)
        else:
            self.main[node.name] = None
        value = self.select(src, self.plan[node.name].side, node.name)
        self.side[node.name] = None if value is None else self.apply(node, role, value)

    def apply(self, node: fx.Node, role: NodeRole, value: torch.Tensor | fx.Node) -> Side:
        """The elementwise operation of ``node`` on a side vector (never in place)."""
        if node.op == "call_module":
            assert role.module is not None
            module = _side_copy(role.module)
            if isinstance(value, torch.Tensor):
                with torch.no_grad():
                    return module(value)
            return self.call("call_module", self.side_module(f"{node.name}_fn", module), (value,))
        target = node.target
        if node.op == "call_method" and isinstance(target, str) and target.endswith("_"):
            target = target[:-1]
        if node.op == "call_function" and target in (torch.relu_, nn.functional.relu_):
            target = torch.relu
        args, kwargs = self.replace_arg(node, role.arg, None)
        if "inplace" in kwargs:
            kwargs["inplace"] = False
        reads_graph: list[fx.Node] = []
        fx.node.map_arg((args, kwargs), reads_graph.append)
        if isinstance(value, torch.Tensor) and reads_graph:
            value = self.as_node(value, f"{node.name}_values")  # an argument known at run time
        args, kwargs = self.replace_arg(node, role.arg, value)
        if "inplace" in kwargs:
            kwargs["inplace"] = False
        if isinstance(value, torch.Tensor):
            with torch.no_grad():
                if node.op == "call_method":
                    return getattr(value, str(target))(*args[1:], **kwargs)
                return target(*args, **kwargs)  # type: ignore[operator]
        return self.call(node.op, target, args, kwargs)

    def emit_batchnorm(self, node: fx.Node, role: NodeRole) -> None:
        src = self.channel_source(role)
        bn = role.module
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        layout = self.layout(node)
        if layout.size:
            like = next((t for t in (bn.weight, bn.running_mean) if t is not None), None)
            new = type(bn)(
                len(layout),
                eps=bn.eps,
                momentum=bn.momentum,
                affine=bn.affine,
                track_running_stats=bn.track_running_stats,
                device=None if like is None else like.device,
                dtype=None if like is None else like.dtype,
            )
            idx = torch.as_tensor(layout, dtype=torch.long)
            with torch.no_grad():
                if bn.affine:
                    new.weight = _param(bn.weight[idx.to(bn.weight.device)], bn.weight)
                    new.bias = _param(bn.bias[idx.to(bn.bias.device)], bn.bias)
                if bn.track_running_stats:
                    assert bn.running_mean is not None and bn.running_var is not None
                    assert new.running_mean is not None and new.running_var is not None
                    assert bn.num_batches_tracked is not None
                    assert new.num_batches_tracked is not None
                    new.running_mean.copy_(bn.running_mean[idx.to(bn.running_mean.device)])
                    new.running_var.copy_(bn.running_var[idx.to(bn.running_var.device)])
                    new.num_batches_tracked.copy_(bn.num_batches_tracked)
            new.train(bn.training)
            self.module(str(node.target), new)
            self.main[node.name] = self.call("call_module", str(node.target), (self.main[src],))
        else:
            self.main[node.name] = None
        side = self.plan[node.name].side
        value = self.select(src, side, node.name)
        if value is None:
            self.side[node.name] = None
            return
        norm = ConstantChannelNorm(bn, torch.as_tensor(side, dtype=torch.long))
        target = self.side_module(f"{node.name}_constants", norm)
        self.side[node.name] = self.call(
            "call_module", target, (self.as_node(value, f"{node.name}_values"),)
        )

    # flatten and add --------------------------------------------------------------------------
    def emit_flatten(self, node: fx.Node, role: NodeRole) -> None:
        assert role.op is not None
        src = self.channel_source(role)
        if self.layout(node).size:
            self.main[node.name] = self.call("call_function", torch.flatten, (self.main[src], 1))
        else:
            self.main[node.name] = None
        side = self.plan[node.name].side
        channel_of = flatten_channels(self.ops[src].channels, role.op.positions, False)
        self.side[node.name] = self.select(src, channel_of[side], node.name)

    def emit_add(self, node: fx.Node, role: NodeRole) -> None:
        assert role.op is not None
        a, b = role.op.inputs
        if self.layout(node).size:
            self.main[node.name] = self.call(
                "call_function", operator.add, (self.main[a], self.main[b])
            )
        else:
            self.main[node.name] = None
        side = self.plan[node.name].side
        va, vb = self.select(a, side, f"{node.name}_a"), self.select(b, side, f"{node.name}_b")
        if va is None or vb is None:
            self.side[node.name] = None
        elif isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
            self.side[node.name] = va + vb
        else:
            args = (self.as_node(va, f"{node.name}_a"), self.as_node(vb, f"{node.name}_b"))
            self.side[node.name] = self.call("call_function", operator.add, args)

    # linear layers and convolutions -----------------------------------------------------------
    def emit_weighted(self, node: fx.Node, role: NodeRole) -> None:
        module = role.module
        assert isinstance(module, (nn.Linear, nn.Conv2d)) and role.op is not None
        src = self.channel_source(role)
        p = self.plan[node.name]
        mask = torch.as_tensor(self.masks[node.name], device=module.weight.device)
        weight = module.weight.detach() * mask
        bias = None if module.bias is None else module.bias.detach()
        self.side[node.name] = self.weighted_side(node, role, weight, bias)
        if p.layout.size == 0:
            self.main[node.name] = None
            return
        out = torch.as_tensor(p.layout, dtype=torch.long, device=weight.device)
        ins = torch.as_tensor(p.in_layout, dtype=torch.long, device=weight.device)
        term: fx.Node | None = None
        new_bias = None if bias is None else bias[out]
        if role.op.groups > 1:
            kept_weight = weight[out]
        else:
            kept_weight = weight[out][:, ins]
            if p.fold.size:
                new_bias, term = self.fold(node, role, weight[out], new_bias)
        new = _resized(module, kept_weight, new_bias, len(p.layout), len(p.in_layout), p)
        target = self.module(str(node.target), new)
        y = self.call("call_module", target, (self.main[src],))
        if term is not None:
            y = self.call("call_function", operator.add, (y, term))
        self.main[node.name] = y

    def fold(
        self, node: fx.Node, role: NodeRole, rows: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, fx.Node | None]:
        """Fold the constant inputs of the kept units ``rows``: into the bias where they add
        the same at every position and their values are fixed, else as a term of the graph."""
        assert role.op is not None
        src = role.op.inputs[0]
        p = self.plan[node.name]
        fold = torch.as_tensor(p.fold, dtype=torch.long, device=rows.device)
        values = self.select(src, p.fold, f"{node.name}_folded")
        assert values is not None
        weights = rows[:, fold]
        module = role.module
        if not role.op.uniform:
            assert isinstance(module, nn.Conv2d)
            args = (
                self.main[src],
                self.as_node(values, f"{node.name}_folded"),
                self.buffer(f"{node.name}_fold_weight", weights),
                module.stride,
                module.padding,
                module.dilation,
            )
            return bias, self.call("call_function", constant_map, args)
        summed = _sum_over_taps(weights)
        if isinstance(values, torch.Tensor):
            extra = (summed @ values.to(torch.float64)).to(rows.dtype)
            return (extra if bias is None else bias + extra), None
        term = self.call(
            "call_function",
            torch.mv,
            (self.buffer(f"{node.name}_fold_weight", summed.to(rows.dtype)), values),
        )
        if isinstance(module, nn.Conv2d):
            term = self.call("call_method", "reshape", (term, (1, -1, 1, 1)))
        return bias, term

    def weighted_side(
        self, node: fx.Node, role: NodeRole, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> Side:
        """Values of the constant output units that later layers fold in: the bias plus what
        the unit's weights read from constant channels."""
        assert role.op is not None
        side = self.plan[node.name].side
        if side.size == 0:
            return None
        src = role.op.inputs[0]
        idx = torch.as_tensor(side, dtype=torch.long, device=weight.device)
        base = (
            torch.zeros(len(side), dtype=weight.dtype, device=weight.device)
            if bias is None
            else bias[idx].clone()
        )
        reads = _sum_over_taps(_ungrouped(weight, role.op.groups))[idx]
        src_side = self.plan[src].side
        used = reads[:, torch.as_tensor(src_side, dtype=torch.long, device=weight.device)]
        if src_side.size == 0 or not bool(used.any()):
            return base
        values = self.side[src]
        assert values is not None
        if isinstance(values, torch.Tensor):
            return base + (used @ values.to(torch.float64)).to(base.dtype)
        return self.call(
            "call_function",
            torch.addmv,
            (
                self.buffer(f"{node.name}_bias", base),
                self.buffer(f"{node.name}_side_weight", used.to(base.dtype)),
                values,
            ),
        )


def _attr(module: nn.Module, path: str) -> Any:
    value: Any = module
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _ungrouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped convolution's weight ``(out, in/groups, ...)`` as ``(out, in, ...)`` with zeros
    across groups."""
    if groups == 1:
        return weight
    out, per_in = weight.shape[0], weight.shape[1]
    per_out = out // groups
    full = weight.new_zeros((out, per_in * groups, *weight.shape[2:]))
    for g in range(groups):
        full[g * per_out : (g + 1) * per_out, g * per_in : (g + 1) * per_in] = weight[
            g * per_out : (g + 1) * per_out
        ]
    return full


def _resized(
    module: nn.Linear | nn.Conv2d,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    plan: Any,
) -> nn.Module:
    """A new layer of the same kind with the given (smaller) weight and bias."""
    factory = {"device": weight.device, "dtype": weight.dtype}
    new: nn.Linear | nn.Conv2d
    if isinstance(module, nn.Linear):
        new = nn.Linear(in_features, out_features, bias=bias is not None, **factory)
    else:
        groups = int(plan.groups_kept.size) if module.groups > 1 else 1
        new = nn.Conv2d(
            in_features,
            out_features,
            module.kernel_size,  # type: ignore[arg-type]
            stride=module.stride,  # type: ignore[arg-type]
            padding=module.padding,  # type: ignore[arg-type]
            dilation=module.dilation,  # type: ignore[arg-type]
            groups=groups,
            bias=bias is not None,
            padding_mode=module.padding_mode,
            **factory,
        )
    new.weight = _param(weight, module.weight)
    if bias is not None:
        new.bias = _param(bias, module.bias if module.bias is not None else module.weight)
    new.train(module.training)
    return new


def build_compact(
    traced: TracedModel,
    plan: CompactionPlan,
    masks: dict[str, np.ndarray],
    *,
    class_name: str,
    training: bool,
) -> fx.GraphModule:
    """The compact model of ``traced`` under ``plan`` (``masks`` by weighted node name)."""
    return _Builder(traced, plan, masks).build(class_name, training)
