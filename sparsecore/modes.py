"""The pluggable parts of a mask update: importance, pruning and growth modes.

A mode is a plain function registered under a name, with what it reads; the built-in ones are
registered the same way a user's would be, so a new mode needs no edit of the library::

    import sparsecore

    @sparsecore.register_growth("largest_grad_times_momentum", reads=("grad", "momentum"))
    def my_growth(backend, layer, mask, k, key):
        ...  # return a boolean array with exactly k True entries where mask is False

Signatures (``backend`` is the layer's :class:`~sparsecore.backend.ArrayBackend`, ``layer`` a
:class:`~sparsecore.layers.Layer`, ``key`` the :class:`~sparsecore.hashing.HashKey` of this update and
layer, to be passed to ``backend.select`` so ties break like everywhere else):

- importance: ``fn(backend, layer, nnz) -> float``, a finite score >= 0 (``nnz`` is the layer's
  active count, already computed).
- prune: ``fn(backend, layer, rate, max_prune, key) -> boolean array``: the active positions to
  remove; the engine checks they are active and counts them. ``max_prune`` is how many the layer
  may lose without going under its minimum density.
- growth: ``fn(backend, layer, mask, k, key) -> boolean array``: exactly ``k`` positions that are
  inactive in ``mask`` (the mask after pruning) to activate.

``reads`` (metadata given at registration): the signals of the layer the mode reads besides its
weight and mask, among :data:`SIGNALS` (``"momentum"``, ``"grad"``; ``"weight"`` may be named
too). The engine demands those arrays and checks them for NaN/Inf before any work, for user modes
exactly as for built-in ones, and the adapters keep momentum or gradients only when a chosen mode
reads them (:data:`NEEDS_MOMENTUM`, :data:`NEEDS_GRAD`, derived from registration).

The engine validates every result (subset and exact count) and raises naming the mode otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from .backend import ArrayBackend
from .errors import SparseCoreError
from .hashing import HashKey
from .layers import Layer
from .redistribute import split_budget

ImportanceFn = Callable[[ArrayBackend, Layer, int], float]
PruneFn = Callable[[ArrayBackend, Layer, float, int, HashKey], Any]
GrowthFn = Callable[[ArrayBackend, Layer, Any, int, HashKey], Any]

#: The arrays of a :class:`~sparsecore.layers.Layer` a mode may read (``reads=``).
SIGNALS = ("weight", "momentum", "grad")

Fn = TypeVar("Fn", bound=Callable[..., Any])
Mode = TypeVar("Mode", bound=Callable[..., Any])


@dataclass(frozen=True)
class ModeInfo:
    """A registered mode: its function and its metadata.

    ``reads``: the signals it reads (:data:`SIGNALS`). ``rule``: for the library's own functions,
    the name of the built-in rule they compute (``"magnitude"``, ``"momentum"``, ...), which a
    backend's fused update (:mod:`sparsecore.fusion`) may compute its own way; None for any other
    function, which always runs as given. A built-in function keeps its rule under any name it is
    registered with; a wrapper of it is another function and has none.
    """

    kind: str
    name: str
    fn: Callable[..., Any]
    reads: frozenset[str] = frozenset()
    rule: str | None = None


# The library's own mode functions and their metadata, filled by ``_builtin`` below.
_BUILTIN: dict[Callable[..., Any], tuple[str, frozenset[str]]] = {}


class ModeTable(MutableMapping[str, Fn], Generic[Fn]):
    """The modes of one kind by name: a mapping from name to function, with each mode's
    :class:`ModeInfo` beside it (:meth:`info`). Assigning ``table[name] = fn`` registers ``fn``
    with the metadata its function carries (none for a user function); ``del`` unregisters."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._modes: dict[str, ModeInfo] = {}

    def register(self, name: str, fn: Any, reads: Iterable[str] | None = None) -> ModeInfo:
        """Register ``fn`` as mode ``name`` (replacing any mode of that name). ``reads`` None:
        what a built-in function reads, else nothing beyond the weight and mask."""
        if not isinstance(name, str) or not name:
            raise SparseCoreError(
                f"a {self.kind} mode name must be a non-empty string, got {name!r}"
            )
        if not callable(fn):
            raise SparseCoreError(f"{self.kind} mode {name!r} must be a function, got {fn!r}")
        try:
            rule, builtin_reads = _BUILTIN.get(fn, (None, frozenset()))
        except TypeError:  # an unhashable callable object: never a built-in
            rule, builtin_reads = None, frozenset()
        signals = builtin_reads if reads is None else _check_reads(self.kind, name, reads)
        info = ModeInfo(self.kind, name, fn, signals, rule)
        self._modes[name] = info
        return info

    def info(self, name: str) -> ModeInfo:
        """The registered mode ``name``; an unknown name raises listing the known ones."""
        try:
            return self._modes[name]
        except (KeyError, TypeError):
            raise SparseCoreError(
                f"unknown {self.kind} mode {name!r}; available: {sorted(self._modes)} "
                f"(register your own with sparsecore.register_{self.kind})"
            ) from None

    def reading(self, signal: str) -> frozenset[str]:
        """Names of the registered modes that read ``signal``."""
        return frozenset(n for n, info in self._modes.items() if signal in info.reads)

    def __getitem__(self, name: str) -> Fn:
        return self._modes[name].fn  # type: ignore[return-value]

    def __setitem__(self, name: str, fn: Fn) -> None:
        self.register(name, fn)

    def __delitem__(self, name: str) -> None:
        del self._modes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modes)

    def __len__(self) -> int:
        return len(self._modes)

    def __repr__(self) -> str:
        return f"ModeTable({self.kind!r}, {sorted(self._modes)})"


def _check_reads(kind: str, name: str, reads: Iterable[str]) -> frozenset[str]:
    if isinstance(reads, (str, bytes)) or not isinstance(reads, Iterable):
        raise SparseCoreError(
            f"{kind} mode {name!r}: reads must be a tuple of signal names from {list(SIGNALS)} "
            f"(e.g. reads=('momentum',)), got {reads!r}"
        )
    signals = tuple(reads)
    unknown = [s for s in signals if s not in SIGNALS]
    if unknown:
        raise SparseCoreError(
            f"{kind} mode {name!r}: reads names unknown signal(s) {unknown}; "
            f"signals are {list(SIGNALS)}"
        )
    return frozenset(signals)


IMPORTANCE: ModeTable[ImportanceFn] = ModeTable("importance")
PRUNE: ModeTable[PruneFn] = ModeTable("prune")
GROWTH: ModeTable[GrowthFn] = ModeTable("growth")
TABLES: dict[str, ModeTable[Any]] = {"importance": IMPORTANCE, "prune": PRUNE, "growth": GROWTH}


class _Readers(Mapping[str, frozenset[str]]):
    """Per kind of mode, the names of the registered modes that read one signal: computed from
    the registrations whenever asked, so user modes count as soon as they are registered."""

    def __init__(self, signal: str) -> None:
        self.signal = signal

    def __getitem__(self, kind: str) -> frozenset[str]:
        return TABLES[kind].reading(self.signal)

    def __iter__(self) -> Iterator[str]:
        return iter(TABLES)

    def __len__(self) -> int:
        return len(TABLES)

    def __repr__(self) -> str:
        return repr({kind: sorted(self[kind]) for kind in self})


#: ``NEEDS_MOMENTUM[kind]``: the modes of ``kind`` that read momentum (from their ``reads``).
NEEDS_MOMENTUM: Mapping[str, frozenset[str]] = _Readers("momentum")
#: ``NEEDS_GRAD[kind]``: the modes of ``kind`` that read the dense gradient.
NEEDS_GRAD: Mapping[str, frozenset[str]] = _Readers("grad")


def signals_read(*, prune: str, growth: str, redistribution: str) -> frozenset[str]:
    """The signals an update with these modes reads (``redistribution="none"`` reads none);
    an unknown mode raises naming it."""
    modes = [PRUNE.info(prune), GROWTH.info(growth)]
    if redistribution != "none":
        modes.append(IMPORTANCE.info(redistribution))
    signals: frozenset[str] = frozenset()
    for mode in modes:
        signals |= mode.reads
    return signals


def _registrar(table: ModeTable[Any], name: str, fn: Any, reads: Iterable[str] | None) -> Any:
    if fn is not None:
        table.register(name, fn, reads)
        return fn

    def decorate(f: Mode) -> Mode:
        table.register(name, f, reads)
        return f

    return decorate


@overload
def register_importance(
    name: str, fn: None = None, *, reads: Iterable[str] | None = None
) -> Callable[[Mode], Mode]: ...
@overload
def register_importance(name: str, fn: Mode, *, reads: Iterable[str] | None = None) -> Mode: ...
def register_importance(name: str, fn: Any = None, *, reads: Iterable[str] | None = None) -> Any:
    """Register ``fn(backend, layer, nnz) -> float`` as importance mode ``name``; without ``fn``,
    a decorator. ``reads``: the signals it reads (module doc)."""
    return _registrar(IMPORTANCE, name, fn, reads)


@overload
def register_prune(
    name: str, fn: None = None, *, reads: Iterable[str] | None = None
) -> Callable[[Mode], Mode]: ...
@overload
def register_prune(name: str, fn: Mode, *, reads: Iterable[str] | None = None) -> Mode: ...
def register_prune(name: str, fn: Any = None, *, reads: Iterable[str] | None = None) -> Any:
    """Register ``fn(backend, layer, rate, max_prune, key)`` as prune mode ``name``; without
    ``fn``, a decorator. ``reads``: the signals it reads (module doc)."""
    return _registrar(PRUNE, name, fn, reads)


@overload
def register_growth(
    name: str, fn: None = None, *, reads: Iterable[str] | None = None
) -> Callable[[Mode], Mode]: ...
@overload
def register_growth(name: str, fn: Mode, *, reads: Iterable[str] | None = None) -> Mode: ...
def register_growth(name: str, fn: Any = None, *, reads: Iterable[str] | None = None) -> Any:
    """Register ``fn(backend, layer, mask, k, key)`` as growth mode ``name``; without ``fn``, a
    decorator. ``reads``: the signals it reads (module doc)."""
    return _registrar(GROWTH, name, fn, reads)


def _builtin(register: Callable[..., Any], name: str, *reads: str) -> Callable[[Mode], Mode]:
    """Register a library mode through the public ``register`` function, exactly as a user
    would, and record the rule it computes (its name) with what it reads: the function keeps
    both wherever it is registered again (:class:`ModeInfo`)."""

    def decorate(fn: Mode) -> Mode:
        _BUILTIN[fn] = (name, frozenset(reads))
        registered: Mode = register(name, fn, reads=reads)
        return registered

    return decorate


def lookup(table: Mapping[str, Any], kind: str, name: str) -> Any:
    """The function of mode ``name`` in ``table``; an unknown name raises listing the known."""
    if isinstance(table, ModeTable):
        return table.info(name).fn
    try:
        return table[name]
    except KeyError:
        raise SparseCoreError(
            f"unknown {kind} mode {name!r}; available: {sorted(table)} "
            f"(register your own with sparsecore.register_{kind})"
        ) from None


def round_half_even(x: float) -> int:
    """Python's ``round`` is round-half-to-even on floats, as ALGORITHM.md specifies."""
    return int(round(x))


# -- importance (redistribution) ----------------------------------------------------------------


def _mean_abs_active(backend: ArrayBackend, x: Any, layer: Layer, nnz: int) -> float:
    if nnz == 0:  # an empty layer uses the mean over all its positions
        return backend.abs_sum(x, None) / math.prod(backend.shape(x))
    return backend.abs_sum(x, layer.mask) / nnz


@_builtin(register_importance, "momentum", "momentum")
def momentum_importance(backend: ArrayBackend, layer: Layer, nnz: int) -> float:
    """Mean ``|momentum|`` over the active positions (the paper's redistribution)."""
    return _mean_abs_active(backend, layer.momentum, layer, nnz)


@_builtin(register_importance, "magnitude", "weight")
def magnitude_importance(backend: ArrayBackend, layer: Layer, nnz: int) -> float:
    """Mean ``|weight|`` over the active positions."""
    return _mean_abs_active(backend, layer.weight, layer, nnz)


@_builtin(register_importance, "nonzero")
def nonzero_importance(backend: ArrayBackend, layer: Layer, nnz: int) -> float:
    """The layer's active count: the freed weights go back in proportion to layer size."""
    return float(nnz)


# -- pruning ----------------------------------------------------------------------------------


def magnitude_prune_count(rate: float, nnz: int, max_prune: int) -> int:
    """How many of ``nnz`` active weights magnitude pruning removes: ``round_half_even(rate *
    nnz)``, at most ``max_prune`` (what ``min_density`` allows)."""
    return min(round_half_even(rate * nnz), max_prune)


@_builtin(register_prune, "magnitude", "weight")
def magnitude_prune(
    backend: ArrayBackend, layer: Layer, rate: float, max_prune: int, key: HashKey
) -> Any:
    """Remove ``round_half_even(rate * nnz)`` active weights, smallest ``|w|`` first."""
    r = magnitude_prune_count(rate, backend.count(layer.mask), max_prune)
    return backend.select(
        layer.weight, layer.mask, r, among_active=True, largest=False, magnitude=True, key=key
    )


@_builtin(register_prune, "SET", "weight")
def set_prune(
    backend: ArrayBackend, layer: Layer, rate: float, max_prune: int, key: HashKey
) -> Any:
    """SET (Mocanu et al. 2018): the same fraction of positive and of non-positive weights.

    Positive weights go smallest first; non-positive ones (-0.0 included) closest to zero first.
    """
    nnz = backend.count(layer.mask)
    positive = backend.count_positive(layer.weight, layer.mask)
    r_pos = round_half_even(rate * positive)
    r_neg = round_half_even(rate * (nnz - positive))
    if r_pos + r_neg > max_prune:  # the minimum density binds: scale both down, keep the total
        r_pos = min(r_pos, max_prune * r_pos // (r_pos + r_neg))
        r_neg = max_prune - r_pos
    pos = backend.select(
        layer.weight,
        layer.mask,
        r_pos,
        among_active=True,
        largest=False,
        magnitude=False,
        key=key,
        sign="positive",
    )
    neg = backend.select(
        layer.weight,
        layer.mask,
        r_neg,
        among_active=True,
        largest=True,
        magnitude=False,
        key=key,
        sign="nonpositive",
    )
    return backend.logical_or(pos, neg)


# -- growth -----------------------------------------------------------------------------------


@_builtin(register_growth, "momentum", "momentum")
def momentum_growth(backend: ArrayBackend, layer: Layer, mask: Any, k: int, key: HashKey) -> Any:
    """Activate the ``k`` inactive positions with the largest ``|momentum|``."""
    return backend.select(
        layer.momentum, mask, k, among_active=False, largest=True, magnitude=True, key=key
    )


@_builtin(register_growth, "gradient", "grad")
def gradient_growth(backend: ArrayBackend, layer: Layer, mask: Any, k: int, key: HashKey) -> Any:
    """Activate the ``k`` inactive positions with the largest ``|dense gradient|`` (as RigL)."""
    return backend.select(
        layer.grad, mask, k, among_active=False, largest=True, magnitude=True, key=key
    )


@_builtin(register_growth, "random")
def random_growth(backend: ArrayBackend, layer: Layer, mask: Any, k: int, key: HashKey) -> Any:
    """Activate ``k`` inactive positions ranked by the position hash: random, reproducible."""
    scores = backend.position_hash(key, layer.weight)
    return backend.select(
        scores, mask, k, among_active=False, largest=True, magnitude=False, key=key
    )


@_builtin(register_growth, "momentum_neuron", "momentum")
def momentum_neuron_growth(
    backend: ArrayBackend, layer: Layer, mask: Any, k: int, key: HashKey
) -> Any:
    """Split ``k`` over output units by their mean ``|momentum|``, then the largest inside each.

    The split is the same water-filling as the layer budgets, each unit's free slots being its
    capacity, so the layer gets exactly ``k``.
    """
    axis = layer.axis
    shape = backend.shape(layer.momentum)
    units = shape[axis]
    per_unit = math.prod(shape) // units
    unit_mean = backend.unit_abs_sum(layer.momentum, axis) / per_unit
    free = backend.unit_count(mask, axis, active=False)
    ks = split_budget(k, unit_mean, free)
    return backend.select_per_unit(
        layer.momentum,
        mask,
        ks,
        axis=axis,
        among_active=False,
        largest=True,
        magnitude=True,
        key=key,
    )
