"""A PyTorch model as the abstract graph of :mod:`sparsecore.compaction`, through ``torch.fx``.

The model is traced symbolically (``torch.fx.symbolic_trace``: ``nn.Linear``, ``nn.Conv2d`` and
the other ``torch.nn`` layers stay leaves) and run once on the example input in evaluation mode
to learn every tensor's shape. Each node then gets a *role*: what it is for the analysis (an
:class:`sparsecore.compaction.Op`) and what the builder (:mod:`.compaction_build`) must emit
for it. Recognised, with the channel axis at dimension 1:

- ``nn.Linear`` on ``(N, features)``, ``nn.Conv2d`` on ``(N, C, H, W)`` (any stride, dilation,
  groups, padding and padding mode), when the module is called once and owns its weight;
- batch norm (``nn.BatchNorm1d/2d``); elementwise activations (modules, functions and tensor
  methods, in place or not), elementwise arithmetic with a Python number; max, average and
  adaptive pooling, ``mean`` over the spatial axes, upsampling; dropout (modules and functions);
- flattening ``(N, C, H, W)`` to ``(N, C*H*W)`` by ``torch.flatten``, ``nn.Flatten``, ``view``
  or ``reshape``; the sum of two tensors with the same channels (residual additions);
- ``x.size(0)``, ``x.shape[0]``, ``x.dim()``, ``x.dtype``, ``x.device``: they read no channel.

Anything else is *opaque*: it reads every channel of its inputs, exactly as before.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from sparsecore.compaction import Op
from sparsecore.errors import SparseCoreError

from .eval_mode import evaluation_mode

__all__ = ["NodeRole", "TracedModel", "trace_model"]

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
    nn.Identity,
)
_ELEMENTWISE_FUNCTIONS: set[Callable[..., Any]] = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.sigmoid,
    torch.sigmoid,
    F.tanh,
    torch.tanh,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.softplus,
    F.softsign,
    F.logsigmoid,
    F.hardshrink,
    F.softshrink,
    F.threshold,
    torch.clamp,
    torch.clone,
}
_ELEMENTWISE_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_min_",
    "clamp_max",
    "clamp_max_",
    "contiguous",
    "clone",
    "to",
    "float",
    "double",
    "half",
    "bfloat16",
}
_SCALAR_OPS: set[Callable[..., Any]] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
}
_SCALAR_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_ADD_FUNCTIONS: set[Callable[..., Any]] = {operator.add, operator.iadd, torch.add}
_DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
#: functional dropout -> the module that follows the compact model's own mode
DROPOUT_FUNCTIONS: dict[Callable[..., Any], type[nn.Module]] = {
    F.dropout: nn.Dropout,
    F.dropout1d: nn.Dropout1d,
    F.dropout2d: nn.Dropout2d,
    F.alpha_dropout: nn.AlphaDropout,
    F.feature_alpha_dropout: nn.FeatureAlphaDropout,
}
_POOL_FUNCTIONS: set[Callable[..., Any]] = {
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.interpolate,
}
_FLATTEN_FUNCTIONS: set[Callable[..., Any]] = {torch.flatten, torch.reshape}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_META_ATTRS = {"dtype", "device", "ndim", "is_cuda"}


@dataclass(frozen=True)
class NodeRole:
    """What one fx node is: ``action`` tells the builder what to emit (see module docstring);
    ``op`` is its operation in the abstract graph (None for nodes that read no channel);
    ``arg``: where the channel-carrying input sits in the call (an int position or a kwarg
    name); ``module``: the original module of a ``call_module`` node."""

    action: str
    op: Op | None = None
    arg: int | str | None = None
    module: nn.Module | None = None


@dataclass
class TracedModel:
    """The traced model, its abstract graph, each node's role and the reference outputs."""

    graph_module: fx.GraphModule
    ops: list[Op]
    roles: dict[str, NodeRole]
    output: Any
    shapes: dict[str, tuple[int, ...] | None]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape)


def _arg_nodes(node: fx.Node) -> list[fx.Node]:
    """The nodes a node reads, each once, in argument order."""
    found: list[fx.Node] = []

    def visit(n: fx.Node) -> fx.Node:
        found.append(n)
        return n

    fx.node.map_arg((node.args, node.kwargs), visit)
    return list(dict.fromkeys(found))


def _tracked_arg(node: fx.Node, arg: int | str) -> Any:
    if isinstance(arg, int):
        return node.args[arg] if arg < len(node.args) else None
    return node.kwargs.get(arg)


def _normalized(node: fx.Node, gm: fx.GraphModule) -> dict[str, Any] | None:
    try:
        pair = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    except Exception:  # no schema for this target: treated as unknown
        return None
    return None if pair is None else dict(pair.kwargs)


def _zero_padding(conv: nn.Conv2d) -> bool:
    """Whether the convolution pads its input with zeros (which makes borders differ)."""
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return False
        return any(d * (k - 1) > 0 for d, k in zip(conv.dilation, conv.kernel_size))
    return any(int(p) > 0 for p in conv.padding)


def _avg_pool_uniform(padding: Any, count_include_pad: bool, divisor_override: Any) -> bool:
    pads = padding if isinstance(padding, (tuple, list)) else (padding,)
    return divisor_override is None and (not count_include_pad or all(int(p) == 0 for p in pads))


def trace_model(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    masks: Mapping[str, torch.Tensor],
) -> TracedModel:
    """Trace ``model``, run it once on ``example_inputs`` (evaluation mode, no gradients, every
    module's mode restored after) and describe every node. ``masks`` by module name: a weight
    counts when it is nonzero and, where a mask is given, active."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:
        raise SparseCoreError(
            f"compaction traces the model with torch.fx, which failed for "
            f"{type(model).__name__}: {type(err).__name__}: {err}. Models whose forward branches "
            f"on tensor values cannot be traced; move such code out of forward or compact the "
            f"traceable part"
        ) from err
    try:
        with evaluation_mode(model), torch.no_grad():
            # the reference is the model's own forward: the trace froze what the forward
            # decided in the mode it was traced in (functional dropout's training argument)
            output = model(*example_inputs)
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as err:
        raise SparseCoreError(
            f"{type(model).__name__} failed on the example input of shape(s) "
            f"{[tuple(x.shape) for x in example_inputs]}: {type(err).__name__}: {err}"
        ) from err

    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for _, p in module.named_parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1

    shapes = {node.name: _shape(node) for node in gm.graph.nodes}
    classifier = _Classifier(gm, modules, calls, owners, shapes, masks)
    roles: dict[str, NodeRole] = {}
    ops: list[Op] = []
    for node in gm.graph.nodes:
        role = classifier.role(node)
        roles[node.name] = role
        classifier.roles[node.name] = role
        if role.op is not None:
            ops.append(role.op)
    return TracedModel(gm, ops, roles, output, shapes)


class _Classifier:
    def __init__(
        self,
        gm: fx.GraphModule,
        modules: Mapping[str, nn.Module],
        calls: Mapping[str, int],
        owners: Mapping[int, int],
        shapes: Mapping[str, tuple[int, ...] | None],
        masks: Mapping[str, torch.Tensor],
    ) -> None:
        self.gm = gm
        self.modules = modules
        self.calls = calls
        self.owners = owners
        self.shapes = shapes
        self.masks = masks
        self.roles: dict[str, NodeRole] = {}

    # -- helpers --------------------------------------------------------------------------
    def channels(self, node: fx.Node) -> int:
        shape = self.shapes.get(node.name)
        return shape[1] if shape is not None and len(shape) >= 2 else 0

    def inputs(self, node: fx.Node) -> tuple[str, ...]:
        """Arguments that are operations of the graph (tensors, possibly without channels)."""
        return tuple(
            n.name
            for n in _arg_nodes(node)
            if n.name in self.roles and self.roles[n.name].op is not None
        )

    def op(self, node: fx.Node, kind: str, inputs: tuple[str, ...], **kw: Any) -> Op:
        return Op(node.name, kind, inputs, self.channels(node), **kw)

    def opaque(self, node: fx.Node) -> NodeRole:
        return NodeRole("opaque", self.op(node, "opaque", self.inputs(node)))

    def single(self, node: fx.Node, arg: int | str) -> fx.Node | None:
        """The channel-carrying input at ``arg`` if it is the only operation the node reads
        and keeps the channels (same count, channel axis 1)."""
        x = _tracked_arg(node, arg)
        if not isinstance(x, fx.Node) or self.inputs(node) != (x.name,):
            return None
        cin, cout = self.channels(x), self.channels(node)
        return x if cin > 0 and cin == cout else None

    def channelwise(
        self, node: fx.Node, action: str, arg: int | str, uniform: bool, module: Any = None
    ) -> NodeRole:
        x = self.single(node, arg)
        if x is None:
            return self.opaque(node)
        op = self.op(node, "channelwise", (x.name,), uniform=uniform)
        return NodeRole(action, op, arg, module)

    # -- the roles --------------------------------------------------------------------------
    def role(self, node: fx.Node) -> NodeRole:
        if node.op == "placeholder":
            return NodeRole("input", self.op(node, "input", ()))
        if node.op == "output":
            return NodeRole("output", Op(node.name, "output", self.inputs(node)))
        if node.op == "get_attr":
            return NodeRole("opaque", self.op(node, "opaque", ()))
        if not self.inputs(node):
            # computes nothing from the model's tensors (or only from batch sizes and dtypes)
            return NodeRole("copy")
        if node.op == "call_module":
            return self.module_role(node)
        if node.op == "call_function":
            return self.function_role(node)
        if node.op == "call_method":
            return self.method_role(node)
        return self.opaque(node)

    def module_role(self, node: fx.Node) -> NodeRole:
        module = self.modules[str(node.target)]
        if self.calls.get(str(node.target), 0) > 1:
            return self.opaque(node)  # one module, several calls: kept whole
        x = node.args[0] if node.args else None
        xshape = self.shapes.get(x.name) if isinstance(x, fx.Node) else None
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return self.weighted(node, module, xshape)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, nn.SyncBatchNorm
        ):
            return self.channelwise(node, "batchnorm", 0, True, module)
        if isinstance(module, _ELEMENTWISE_MODULES) or (
            isinstance(module, nn.PReLU) and module.num_parameters == 1
        ):
            return self.channelwise(node, "elementwise", 0, True, module)
        if isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            if module.return_indices:
                return self.opaque(node)
            return self.channelwise(node, "same", 0, True, module)
        if isinstance(module, (nn.AdaptiveAvgPool2d, nn.Upsample)):
            return self.channelwise(node, "same", 0, True, module)
        if isinstance(module, nn.AvgPool2d):
            uniform = _avg_pool_uniform(
                module.padding, module.count_include_pad, module.divisor_override
            )
            return self.channelwise(node, "same", 0, uniform, module)
        if isinstance(module, _DROPOUT_MODULES):
            return self.channelwise(node, "same", 0, False, module)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, 0)
        return self.opaque(node)

    def weighted(self, node: fx.Node, module: nn.Module, xshape: Any) -> NodeRole:
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        shared = any(p is not None and self.owners.get(id(p), 0) > 1 for p in (weight, bias))
        rank = 2 if isinstance(module, nn.Linear) else 4
        x = node.args[0] if node.args else None
        if (
            shared
            or xshape is None
            or len(xshape) != rank
            or not isinstance(weight, torch.Tensor)
            or not isinstance(x, fx.Node)
            or self.inputs(node) != (x.name,)
            or node.kwargs
            or len(node.args) != 1
        ):
            return self.opaque(node)
        # A weight contributes when it is active and nonzero: an active weight that is exactly
        # 0 (just regrown, or in a channel whose batch norm and ReLU pass no gradient) adds
        # nothing to the masked computation.
        contributes = weight.detach() != 0
        mask = self.masks.get(str(node.target))
        if mask is not None:
            if tuple(mask.shape) != tuple(weight.shape):
                raise SparseCoreError(
                    f"mask of layer {node.target!r} has shape {tuple(mask.shape)}, its weight "
                    f"{tuple(weight.shape)}"
                )
            contributes &= mask.detach().to(device=weight.device, dtype=torch.bool)
        mask_np = contributes.to("cpu").numpy()
        groups = int(getattr(module, "groups", 1))
        uniform = not (isinstance(module, nn.Conv2d) and _zero_padding(module))
        op = self.op(node, "weighted", (x.name,), mask=mask_np, groups=groups, uniform=uniform)
        return NodeRole("weighted", op, 0, module)

    def flatten(self, node: fx.Node, arg: int | str) -> NodeRole:
        x = _tracked_arg(node, arg)
        if not isinstance(x, fx.Node) or self.inputs(node) != (x.name,):
            return self.opaque(node)
        xs, ys = self.shapes.get(x.name), self.shapes.get(node.name)
        if xs is None or ys is None:
            return self.opaque(node)
        if len(xs) == 2 and ys == xs:
            return NodeRole("identity", self.op(node, "channelwise", (x.name,), uniform=True), arg)
        if len(xs) == 4 and ys == (xs[0], xs[1] * xs[2] * xs[3]):
            op = self.op(node, "flatten", (x.name,), positions=xs[2] * xs[3])
            return NodeRole("flatten", op, arg)
        return self.opaque(node)

    def function_role(self, node: fx.Node) -> NodeRole:
        target = node.target
        if target in _ELEMENTWISE_FUNCTIONS:
            return self.channelwise(node, "elementwise", 0, True)
        if target in _ADD_FUNCTIONS and "alpha" not in node.kwargs:
            tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(tensors) == 2:
                return self.add(node, tensors)
        if target in _SCALAR_OPS and "alpha" not in node.kwargs:
            return self.scalar_op(node)
        if target in DROPOUT_FUNCTIONS:
            return self.channelwise(node, "dropout", 0, False)
        if target in _POOL_FUNCTIONS:
            return self.pool_function(node)
        if target is torch.mean:
            return self.mean(node)
        if target in _FLATTEN_FUNCTIONS:
            return self.flatten(node, 0)
        if target is getattr and self.is_meta_attribute(node):
            return NodeRole("copy")
        return self.opaque(node)

    def is_meta_attribute(self, node: fx.Node) -> bool:
        """``x.dtype``, ``x.device``, ``x.ndim``, and ``x.shape`` when only ``[0]`` is read."""
        attr = node.args[1] if len(node.args) > 1 else None
        if attr in _META_ATTRS:
            return True
        return attr == "shape" and all(
            u.op == "call_function" and u.target is operator.getitem and u.args[1:] == (0,)
            for u in node.users
        )

    def method_role(self, node: fx.Node) -> NodeRole:
        name = str(node.target)
        if name in _ELEMENTWISE_METHODS:
            return self.channelwise(node, "elementwise", 0, True)
        if name in ("add", "add_") and len(node.args) == 2 and isinstance(node.args[1], fx.Node):
            if "alpha" not in node.kwargs:
                return self.add(node, [node.args[0], node.args[1]])
        if name in _SCALAR_METHODS and "alpha" not in node.kwargs:
            return self.scalar_op(node)
        if name in _FLATTEN_METHODS:
            return self.flatten(node, 0)
        if name == "mean":
            return self.mean(node)
        if self.is_meta(node):
            return NodeRole("copy")
        return self.opaque(node)

    def is_meta(self, node: fx.Node) -> bool:
        """Reads only the batch size, the rank, dtype or device of a tensor."""
        name = str(node.target)
        if name == "dim" and len(node.args) == 1:
            return True
        if name == "size":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return isinstance(dim, int) and dim == 0
        return False

    def add(self, node: fx.Node, tensors: list[Any]) -> NodeRole:
        a, b = tensors
        sa, sb, so = (self.shapes.get(n.name) for n in (a, b, node))
        ok = (
            sa is not None
            and sb is not None
            and so is not None
            and len(sa) == len(sb) == len(so) >= 2
            and sa[0] == sb[0] == so[0]
            and sa[1] == sb[1] == so[1]
            and self.inputs(node) == (a.name, b.name)
        )
        if not ok:
            return self.opaque(node)
        return NodeRole("add", self.op(node, "add", (a.name, b.name)))

    def scalar_op(self, node: fx.Node) -> NodeRole:
        """Elementwise arithmetic of one tensor with Python numbers."""
        nodes = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node)]
        others = [a for a in node.args if not isinstance(a, fx.Node)]
        if len(nodes) != 1 or not all(isinstance(a, (int, float)) for a in others):
            return self.opaque(node)
        return self.channelwise(node, "elementwise", nodes[0], True)

    def pool_function(self, node: fx.Node) -> NodeRole:
        kw = _normalized(node, self.gm)
        if kw is None or "input" not in kw or kw.get("return_indices"):
            return self.opaque(node)
        uniform = True
        if node.target is F.avg_pool2d:
            uniform = _avg_pool_uniform(
                kw.get("padding", 0), kw.get("count_include_pad", True), kw.get("divisor_override")
            )
        return self.channelwise(node, "same", 0 if node.args else "input", uniform)

    def mean(self, node: fx.Node) -> NodeRole:
        """``x.mean((2, 3))``: global average pooling."""
        x = node.args[0] if node.args else None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        xs = self.shapes.get(x.name) if isinstance(x, fx.Node) else None
        if xs is None or len(xs) != 4 or not isinstance(dims, (tuple, list)):
            return self.opaque(node)
        if {int(d) % 4 for d in dims} != {2, 3} or "dtype" in node.kwargs:
            return self.opaque(node)
        return self.channelwise(node, "same", 0, True)


def masks_by_module(
    model: nn.Module, names: Sequence[str], masks: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Masks given by parameter name (``"fc1.weight"``) as masks by module name (``"fc1"``),
    for the weights of ``nn.Linear``/``nn.Conv2d`` modules (every alias of a shared module)."""
    by_param = {name: m for name, m in zip(names, masks)}
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            for pname, mask in by_param.items():
                if pname == (f"{mod_name}.weight" if mod_name else "weight"):
                    out[mod_name] = mask
    # aliases: the same parameter under another module name
    params = dict(model.named_parameters(remove_duplicate=False))
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.Linear, nn.Conv2d)) and mod_name not in out:
            for pname, mask in by_param.items():
                if params.get(pname) is module.weight:
                    out[mod_name] = mask
    return out
