"""Which parameters of a model are trained sparse, and where their output units lie.

By default (ALGORITHM.md, "Which parameters are sparse"): the trainable weights of the registered
layer types that are sparse by default: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (1x1, grouped and
depthwise convolutions included), Hugging Face ``transformers``' ``Conv1D`` (GPT-2's
projections, weight stored as (in, out)) and ``nn.MultiheadAttention``'s input projections
(``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when the key and
value sizes differ; its ``out_proj`` is an ``nn.Linear``), so Transformer encoder/decoder layers
and GPT-style blocks written with ``nn.Linear`` are sparse in every projection. Biases,
normalisation layers, embeddings and recurrent weights stay dense unless ``include`` names them,
by parameter name pattern (``fnmatch``, e.g. ``"rnn.weight_hh_*"``) or by module type (e.g.
``nn.Embedding``, ``nn.LSTM``: then every ``weight_ih_l*``, ``weight_hh_l*`` and LSTM projection
``weight_hr_l*``, of every layer and direction). ``exclude`` (same forms) wins over both.
``dense_first`` / ``dense_last`` then drop the first / last selected parameter in the order the
model registers its modules. Frozen parameters (``requires_grad=False``) are never sparse. A
parameter shared by several modules (tied weights) is one sparse layer with one mask; it is
sparse by default only if every owner with a registered type is sparse by default, so a
language model's output layer tied to its token embedding stays dense, as the embedding would,
unless included.

Recurrent and attention weights stack their gates (LSTM: input, forget, cell, output; GRU:
reset, update, new) or their query/key/value projections along axis 0, one row per gate unit:
with output axis 0 every row is its own output unit, so per-unit growth (``momentum_neuron``),
dead-unit counts and ``cover_units`` treat each gate's rows as separate units, and the fan-in
that ER densities and revived weights read is the input size (``weight_ih``) or hidden size
(``weight_hh``), as for a linear layer.

Each registered layer type also names its weight's output axis (0 for ``nn.Linear``'s (out, in)
and convolutions' (out, in, k...), 1 for transposed convolutions and ``Conv1D``'s (in, out)),
which per-unit growth, ER initial densities and dead-unit counts read. Declare your own layer
types with :func:`register_layer_type`; a type can be given by class or by its qualified name
(``"package.module.Class"``, matched along the module's class hierarchy), so that registering a
library's layer never imports that library. ``param`` may be an ``fnmatch`` pattern of the
parameter's name inside its module (``"weight_*_l*"``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from sparsecore.errors import SparseCoreError
from sparsecore.validation import check_flag


@dataclass(frozen=True)
class LayerType:
    """How sparsecore treats the parameter ``param`` of modules of one type.

    ``layer_type``: a module class, or its qualified name ``"module.Class"``. ``param``: the
    parameter's name in the module, or an ``fnmatch`` pattern of it. ``axis``: the output axis
    of that parameter. ``sparse_by_default``: sparse without being included.
    """

    layer_type: type[nn.Module] | str
    axis: int = 0
    param: str = "weight"
    sparse_by_default: bool = True

    def matches(self, module: nn.Module) -> bool:
        if isinstance(self.layer_type, str):
            return any(
                f"{cls.__module__}.{cls.__qualname__}" == self.layer_type
                for cls in type(module).__mro__
            )
        return isinstance(module, self.layer_type)


# Searched from the end: a later registration (a user's) wins over an earlier one.
_LAYER_TYPES: list[LayerType] = [
    LayerType(nn.Linear),
    LayerType(nn.Conv1d),
    LayerType(nn.Conv2d),
    LayerType(nn.Conv3d),
    # Transposed convolutions store (in, out/groups, *kernel): their output units are axis 1.
    LayerType(nn.ConvTranspose1d, axis=1, sparse_by_default=False),
    LayerType(nn.ConvTranspose2d, axis=1, sparse_by_default=False),
    LayerType(nn.ConvTranspose3d, axis=1, sparse_by_default=False),
    LayerType(nn.Embedding, sparse_by_default=False),
    # Hugging Face's Conv1D (GPT-2, GPT, ...): a linear layer whose weight is (in, out).
    LayerType("transformers.pytorch_utils.Conv1D", axis=1),
    # LSTM/GRU/RNN: (gates * hidden, in) and (gates * hidden, hidden), one row per gate unit;
    # weight_hr_l* is an LSTM's (proj_size, hidden) output projection. "_reverse" included.
    # Dense unless included (ALGORITHM.md): a recurrent matrix is applied at every time step.
    LayerType(nn.RNNBase, param="weight_ih_l*", sparse_by_default=False),
    LayerType(nn.RNNBase, param="weight_hh_l*", sparse_by_default=False),
    LayerType(nn.RNNBase, param="weight_hr_l*", sparse_by_default=False),
    # Attention's input projections: (3 * embed, embed) stacked, or one (embed, kdim/vdim) each.
    LayerType(nn.MultiheadAttention, param="in_proj_weight"),
    LayerType(nn.MultiheadAttention, param="q_proj_weight"),
    LayerType(nn.MultiheadAttention, param="k_proj_weight"),
    LayerType(nn.MultiheadAttention, param="v_proj_weight"),
]

#: The module types whose weights are sparse by default (for messages).
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.MultiheadAttention,
)


def register_layer_type(
    layer_type: type[nn.Module] | str,
    *,
    axis: int,
    param: str = "weight",
    sparse_by_default: bool = True,
) -> None:
    """Declare how sparsecore treats parameter ``param`` of modules of ``layer_type``.

    ``layer_type``: an ``nn.Module`` subclass, or its qualified name (``"package.module.Class"``)
    so that the package need not be imported. ``param``: the parameter's name in the module, or
    an ``fnmatch`` pattern of names (``"weight_*"``). ``axis``: the parameter's output axis (the axis of
    the layer's output units: 0 for (out, in), 1 for (in, out)). ``sparse_by_default``: made
    sparse without ``include`` (otherwise only the axis is declared, for when it is included).
    A later registration of the same type and parameter replaces the earlier one. Applies to
    ``attach`` calls made afterwards::

        sparsecore.torch.register_layer_type(MyLinear, axis=1)   # MyLinear.weight is (in, out)
    """
    if not (
        isinstance(layer_type, str)
        or (isinstance(layer_type, type) and issubclass(layer_type, nn.Module))
    ):
        raise SparseCoreError(
            f"layer_type must be an nn.Module subclass or a qualified class name, got "
            f"{layer_type!r}"
        )
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise SparseCoreError(f"axis must be an integer, got {axis!r}")
    if not isinstance(param, str) or not param:
        raise SparseCoreError(f"param must be a parameter name, got {param!r}")
    entry = LayerType(layer_type, axis, param, bool(sparse_by_default))
    _LAYER_TYPES[:] = [
        t for t in _LAYER_TYPES if (t.layer_type, t.param) != (layer_type, param)
    ] + [entry]


def layer_type_of(module: nn.Module, param: str) -> LayerType | None:
    """The registered entry for parameter ``param`` of ``module`` (the latest that matches:
    the entry's type matches the module and its ``param`` pattern the parameter's name)."""
    return next(
        (
            t
            for t in reversed(_LAYER_TYPES)
            if fnmatch.fnmatchcase(param, t.param) and t.matches(module)
        ),
        None,
    )


Selector = str | type
Selectors = Selector | Sequence[Selector] | None


@dataclass(frozen=True)
class Target:
    """One sparse parameter: its first qualified name, every alias, its owning module, output axis."""

    name: str
    aliases: tuple[str, ...]
    param: nn.Parameter
    module: nn.Module
    axis: int


def _as_list(selectors: Selectors, label: str) -> list[Selector]:
    if selectors is None:
        return []
    items: list[Selector] = [selectors] if isinstance(selectors, (str, type)) else list(selectors)
    for item in items:
        if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise SparseCoreError(
                f"{label} takes parameter name patterns (str) or nn.Module subclasses, got {item!r}"
            )
    return items


def _matches(selector: Selector, names: Iterable[str], modules: Iterable[nn.Module]) -> bool:
    if isinstance(selector, str):
        return any(fnmatch.fnmatchcase(n, selector) for n in names)
    return any(isinstance(m, selector) for m in modules)


def select_targets(
    model: nn.Module,
    *,
    include: Selectors = None,
    exclude: Selectors = None,
    dense_first: bool = False,
    dense_last: bool = False,
) -> list[Target]:
    """The sparse parameters of ``model``, in module registration order. Raises if there are none."""
    if not isinstance(model, nn.Module):
        raise SparseCoreError(f"attach needs a torch.nn.Module, got {type(model).__name__}")
    dense_first = check_flag("dense_first", dense_first)  # "no" would drop a layer silently
    dense_last = check_flag("dense_last", dense_last)
    includes = _as_list(include, "include")
    excludes = _as_list(exclude, "exclude")

    # Every parameter once (by identity), with all its names and owning modules (tied weights).
    order: list[int] = []
    names: dict[int, list[str]] = {}
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            key = id(param)
            if key not in params:
                order.append(key)
                params[key] = param
                names[key] = []
                owners[key] = []
            qualified = f"{mod_name}.{pname}" if mod_name else pname
            if qualified not in names[key]:
                names[key].append(qualified)
            owners[key].append((module, pname))

    used = [False] * len(includes)
    chosen: list[Target] = []
    for key in order:
        param = params[key]
        aliases = names[key]
        modules = [m for m, _ in owners[key]]
        types = [t for m, p in owners[key] if (t := layer_type_of(m, p)) is not None]
        default = param.ndim >= 2 and bool(types) and all(t.sparse_by_default for t in types)
        wanted = default
        for i, sel in enumerate(includes):
            if param.ndim >= 2 and _matches(sel, aliases, modules):
                used[i] = True
                wanted = True
        if any(_matches(sel, aliases, modules) for sel in excludes):
            wanted = False
        if not wanted or not param.requires_grad:
            continue
        if not param.dtype.is_floating_point:
            raise SparseCoreError(
                f"parameter {aliases[0]!r} has dtype {param.dtype}; sparse layers need floating point"
            )
        # The owner whose type says the most: sparse by default first, then any registered one.
        typed = [(m, t) for m, p in owners[key] if (t := layer_type_of(m, p)) is not None]
        typed.sort(key=lambda mt: not mt[1].sparse_by_default)
        owner, axis = (typed[0][0], typed[0][1].axis) if typed else (modules[0], 0)
        if not -param.ndim <= axis < param.ndim:
            raise SparseCoreError(
                f"parameter {aliases[0]!r} of shape {tuple(param.shape)}: its layer type "
                f"{type(owner).__name__} declares output axis {axis}, out of range"
            )
        chosen.append(Target(aliases[0], tuple(aliases), param, owner, axis))

    for sel, hit in zip(includes, used):
        if not hit:
            raise SparseCoreError(
                f"include entry {sel!r} matches no parameter of two or more dimensions in the model"
            )
    if dense_first and chosen:
        chosen = chosen[1:]
    if dense_last and chosen:
        chosen = chosen[:-1]
    if not chosen:
        raise SparseCoreError(
            f"model {type(model).__name__} has no parameter to make sparse: by default only the "
            f"trainable weights of {_default_type_names()} are sparse "
            f"(include={include!r}, exclude={exclude!r}, dense_first={dense_first}, "
            f"dense_last={dense_last})"
        )
    return chosen


def _default_type_names() -> list[str]:
    return [
        t.layer_type if isinstance(t.layer_type, str) else t.layer_type.__name__
        for t in _LAYER_TYPES
        if t.sparse_by_default
    ]
