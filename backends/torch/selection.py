"""Which parameters of a model are trained sparse.

By default (ALGORITHM.md, "Which parameters are sparse"): the trainable weights of ``nn.Linear``
and ``nn.Conv1d/2d/3d`` (1x1, grouped and depthwise convolutions included). Biases, normalisation
layers, embeddings and recurrent weights stay dense unless ``include`` names them, by parameter
name pattern (``fnmatch``, e.g. ``"rnn.weight_hh_*"``) or by module type (e.g. ``nn.Embedding``,
``nn.LSTM``: their weights of two or more dimensions). ``exclude`` (same forms) wins over both.
``dense_first`` / ``dense_last`` then drop the first / last selected parameter in the order the
model registers its modules. Frozen parameters (``requires_grad=False``) are never sparse. A
parameter shared by several modules (tied weights) is one sparse layer with one mask.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from sparsecore.errors import SparseCoreError
from sparsecore.validation import check_flag

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

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


def _output_axis(module: nn.Module) -> int:
    # Transposed convolutions store (in, out/groups, *kernel): their output units are axis 1.
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return 1
    return 0


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
        default = param.ndim >= 2 and any(
            isinstance(m, DEFAULT_TYPES) and p == "weight" for m, p in owners[key]
        )
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
        owner = next((m for m, p in owners[key] if isinstance(m, DEFAULT_TYPES)), modules[0])
        chosen.append(Target(aliases[0], tuple(aliases), param, owner, _output_axis(owner)))

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
            f"trainable weights of {[t.__name__ for t in DEFAULT_TYPES]} are sparse "
            f"(include={include!r}, exclude={exclude!r}, dense_first={dense_first}, "
            f"dense_last={dense_last})"
        )
    return chosen
