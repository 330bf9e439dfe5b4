"""One sparse-momentum mask update, written once against the array-backend interface.

:func:`update` is a pure function: it reads layers (weights, masks, momentum, gradients) and returns
new masks plus a report, changing nothing it was given. :class:`SparseEngine` adds the little state a
training run needs (the target count N, the update counter, the history) and the schedule.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import ArrayBackend, backend_for, get_backend
from .config import SparseConfig
from .errors import DeadUnitsWarning, NonFiniteError, SparseCoreError
from .hashing import HashKey
from .init import layer_counts
from .layers import Layer
from .modes import (
    GROWTH,
    IMPORTANCE,
    NEEDS_GRAD,
    NEEDS_MOMENTUM,
    PRUNE,
    lookup,
    magnitude_prune_count,
)
from .redistribute import capacities, importance_shares, split_budget
from .report import LayerReport, UpdateReport
from .saved_state import EngineState, read_engine_state
from .structured import ablated_units
from .units import dead_units_of, revival_quotas, revival_scale
from .validation import check_flag, check_integer, check_real, check_shape


@dataclass(frozen=True)
class UpdateResult:
    """New masks (arrays of the layers' backend, in layer order) and what the update did.

    ``weights`` holds the weights under the new masks when the backend computed them in the same
    pass as the masks (the fused update), and whenever weights were grown into dead units with a
    non-zero start (``revive_dead_units``); otherwise None, and :func:`apply_masks` gives them.
    ``revived`` then holds, per layer, the boolean array of those positions (None for a layer
    without any): an adapter that updates weights in place writes ``weights`` there.
    :func:`new_weights` returns the new weights in every case.
    """

    masks: list[Any]
    report: UpdateReport
    weights: list[Any] | None = None
    revived: list[Any] | None = None


# The built-in modes the fused backend capability implements, captured at import: a mode
# registered later under the same name is a different function and takes the generic path.
_FUSED_PRUNE = PRUNE["magnitude"]
_FUSED_GROWTH = GROWTH["momentum"]
_FUSED_SOURCE = {
    IMPORTANCE["momentum"]: "momentum",
    IMPORTANCE["magnitude"]: "weight",
    IMPORTANCE["nonzero"]: None,
}


def update(
    layers: Sequence[Layer],
    *,
    prune_rate: float,
    update_index: int = 1,
    seed: int = 0,
    prune: str = "magnitude",
    growth: str = "momentum",
    redistribution: str = "momentum",
    max_density: float = 1.0,
    min_density: float = 0.0,
    step: int | None = None,
    backend: ArrayBackend | str | None = None,
    revive_dead_units: bool = False,
    ablate_below: float | Sequence[float] = 0.0,
) -> UpdateResult:
    """One mask update (ALGORITHM.md): importance, prune, redistribute, regrow.

    Returns the new masks; the given arrays are not touched (see :func:`apply_masks`). Every
    input is checked before any work: a bad layer raises :class:`~sparsecore.SparseCoreError`
    naming it. ``update_index`` (u >= 1) and ``seed`` feed the tie-breaking hash, so equal inputs
    give equal masks on every backend and process.

    A backend that offers the fused capability (``supports_fused_update``) runs magnitude
    pruning with momentum growth in two reads per layer and also returns the new weights; the
    masks and the report are those of the generic path.

    ``revive_dead_units``: dead output units (no active weight, or no gradient) first get their
    share of each layer's regrowth, with non-zero starting weights (:mod:`sparsecore.units`).

    ``ablate_below`` (in [0, 1]; 0 is off; one value for every layer, or one per layer): after
    pruning, output units whose active fan-in is below this fraction of the mean fan-in of the
    layer's units with weights are emptied and get no weight back at this update; their weights
    join the regrowth pool (:mod:`sparsecore.structured`). :class:`SparseEngine` leaves the
    last layer (the network's outputs) out.
    """
    be = _resolve_backend(layers, backend)
    prune_rate, update_index, seed, max_density, min_density, step = _check_update_args(
        prune_rate, update_index, seed, max_density, min_density, step
    )
    prune_fn = lookup(PRUNE, "prune", prune)
    growth_fn = lookup(GROWTH, "growth", growth)
    importance_fn = (
        None if redistribution == "none" else lookup(IMPORTANCE, "importance", redistribution)
    )
    plan = _Plan(
        prune_rate,
        update_index,
        seed,
        redistribution,
        max_density,
        min_density,
        step,
        check_flag("revive_dead_units", revive_dead_units),
        _ablation_fractions(layers, ablate_below),
    )
    if (
        not any(plan.ablate_below)
        and be.supports_fused_update
        and prune_fn is _FUSED_PRUNE
        and growth_fn is _FUSED_GROWTH
        and (importance_fn is None or importance_fn in _FUSED_SOURCE)
    ):
        source = None if importance_fn is None else _FUSED_SOURCE[importance_fn]
        result = _fused_update(be, layers, plan, source)
        if result is not None:
            return result
    return _generic_update(be, layers, plan, prune, growth, prune_fn, growth_fn, importance_fn)


@dataclass(frozen=True)
class _Plan:
    """The options of one update that both paths share."""

    prune_rate: float
    update_index: int
    seed: int
    redistribution: str
    max_density: float
    min_density: float
    step: int | None
    revive: bool = False
    ablate_below: tuple[float, ...] = ()

    def floors(self, sizes: Sequence[int]) -> list[int]:
        """Per layer, the fewest active weights pruning may leave (``min_density``)."""
        return [
            min(math.ceil(self.min_density * n), math.floor(self.max_density * n)) for n in sizes
        ]


def _budgets(
    layers: Sequence[Layer],
    plan: _Plan,
    sizes: list[int],
    kept: list[int],
    pruned_counts: list[int],
    shares: np.ndarray,
    room: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 3, the shared host routine: capacities, budgets g_l and the reported shares.

    ``room``: per layer, the free positions outside ablated units (``ablate_below``), a further
    bound on the capacity."""
    caps = capacities(sizes, kept, plan.max_density)
    if room is not None:
        caps = np.minimum(caps, np.asarray(room, dtype=caps.dtype))
    total_pruned = sum(pruned_counts)
    if plan.redistribution == "none":
        budgets = np.asarray(pruned_counts, dtype=np.int64)
        over = np.flatnonzero(budgets > caps)
        if over.size:
            i = int(over[0])
            raise SparseCoreError(
                f"layer {layers[i].name!r}: redistribution 'none' must regrow {budgets[i]} but "
                f"max_density leaves room for {caps[i]}"
            )
        shares = budgets / total_pruned if total_pruned else np.zeros(len(layers))
    else:
        budgets = split_budget(total_pruned, shares, caps)
    return caps, budgets, shares


def _check_scores(layers: Sequence[Layer], scores: list[float], redistribution: str) -> None:
    for layer, s in zip(layers, scores):
        if not (math.isfinite(s) and s >= 0):
            raise SparseCoreError(
                f"layer {layer.name!r}: importance mode {redistribution!r} returned {s!r}; "
                f"it must be finite and >= 0"
            )


def _generic_update(
    be: ArrayBackend,
    layers: Sequence[Layer],
    plan: _Plan,
    prune: str,
    growth: str,
    prune_fn: Any,
    growth_fn: Any,
    importance_fn: Any,
) -> UpdateResult:
    """The update written once against the backend interface, for any modes."""
    check_layers(
        be,
        layers,
        momentum=plan.redistribution in NEEDS_MOMENTUM["importance"]
        or growth in NEEDS_MOMENTUM["growth"],
        grad=growth in NEEDS_GRAD["growth"],
    )

    sizes = [math.prod(be.shape(layer.mask)) for layer in layers]
    nnz = [be.count(layer.mask) for layer in layers]
    keys = [HashKey(plan.seed, plan.update_index, i) for i in range(len(layers))]
    dead = dead_units_of(be, layers)  # as the update found the layers

    # 1. importance, before pruning
    scores = [0.0] * len(layers)
    if importance_fn is not None:
        scores = [float(importance_fn(be, layer, n)) for layer, n in zip(layers, nnz)]
        _check_scores(layers, scores, plan.redistribution)
    shares = importance_shares(scores, sizes)

    # 2. prune
    kept_masks, pruned_counts = [], []
    for layer, n, floor_l, key in zip(layers, nnz, plan.floors(sizes), keys):
        pruned = prune_fn(be, layer, plan.prune_rate, max(0, n - floor_l), key)
        r = be.count(pruned)
        kept_mask = be.and_not(layer.mask, pruned)
        # |mask & ~pruned| == n - r exactly when every pruned position was active.
        if be.count(kept_mask) != n - r:
            raise SparseCoreError(
                f"layer {layer.name!r}: prune mode {prune!r} selected inactive positions"
            )
        if r > max(0, n - floor_l):
            raise SparseCoreError(
                f"layer {layer.name!r}: prune mode {prune!r} removed {r} weights, more than the "
                f"{max(0, n - floor_l)} allowed by min_density={plan.min_density}"
            )
        kept_masks.append(kept_mask)
        pruned_counts.append(r)

    # 2b. ablate units left with a small fan-in (ablate_below): their weights join the pool
    ablated = [np.zeros(dead[i].size, dtype=bool) for i in range(len(layers))]
    blocked: list[Any] = list(kept_masks)  # growth may only take positions inactive here
    cut: list[Any | None] = [None] * len(layers)  # every position of the ablated units
    room: list[int] | None = None
    if any(plan.ablate_below):
        room = []
        for i, (layer, floor_l) in enumerate(zip(layers, plan.floors(sizes))):
            if not plan.ablate_below[i]:
                room.append(sizes[i])  # no bound beyond the capacity's own
                continue
            active = be.unit_count(kept_masks[i], layer.axis, active=True)
            ablated[i] = ablated_units(
                active,
                ablate_below=plan.ablate_below[i],
                per_unit=sizes[i] // active.size,
                nnz_before=nnz[i],
                removable=max(0, nnz[i] - floor_l) - pruned_counts[i],
                key=keys[i],
            )
            if ablated[i].any():
                quotas = np.where(ablated[i], sizes[i] // active.size, 0).astype(np.int64)
                cut[i] = be.select_per_unit(
                    layer.weight,
                    be.zeros_mask(layer.mask),
                    quotas,
                    axis=layer.axis,
                    among_active=False,
                    largest=True,
                    magnitude=True,
                    key=keys[i],
                )
                kept_mask = be.and_not(kept_masks[i], cut[i])
                pruned_counts[i] += int(active[ablated[i]].sum())
                kept_masks[i] = kept_mask
                blocked[i] = be.logical_or(kept_mask, cut[i])
            room.append(sizes[i] - be.count(blocked[i]))
    kept = [n - r for n, r in zip(nnz, pruned_counts)]

    # 3. redistribute
    caps, budgets, shares = _budgets(layers, plan, sizes, kept, pruned_counts, shares, room)

    # 4. regrow (dead units first, when reviving), 5. new masks
    masks, reports = [], []
    revived: list[Any | None] = [None] * len(layers)
    for i, layer in enumerate(layers):
        g = int(budgets[i])
        start = blocked[i]
        to_revive = dead[i] & ~ablated[i]
        if plan.revive and g > 0 and to_revive.any():
            start, revived[i] = _revive(be, layer, blocked[i], g, to_revive, keys[i])
        rest = g - (0 if revived[i] is None else be.count(revived[i]))  # for the growth mode
        grown = growth_fn(be, layer, start, rest, keys[i])
        joined = be.logical_or(start, grown)
        new_mask = joined if cut[i] is None else be.and_not(joined, cut[i])
        if be.count(grown) != rest or be.count(new_mask) != kept[i] + g:
            raise SparseCoreError(
                f"layer {layer.name!r}: growth mode {growth!r} must activate exactly {rest} "
                f"inactive positions, got {be.count(grown)} (of which "
                f"{be.count(start) + be.count(grown) - be.count(joined)} were already active)"
            )
        if revived[i] is not None:  # only positions inactive before start at +-scale
            fresh = be.and_not(revived[i], layer.mask)
            revived[i] = fresh if be.count(fresh) else None
        masks.append(new_mask)
        # nnz_after - nnz_before == net_grown - net_pruned, so one count gives both.
        net_grown = be.count(be.and_not(new_mask, layer.mask))
        reports.append(
            LayerReport(
                name=layer.name,
                size=sizes[i],
                nnz_before=nnz[i],
                nnz_after=kept[i] + g,
                pruned=pruned_counts[i],
                grown=g,
                net_pruned=net_grown - (kept[i] + g - nnz[i]),
                net_grown=net_grown,
                importance=scores[i],
                share=float(shares[i]),
                capacity=int(caps[i]),
                units=int(dead[i].size),
                dead_units=int(dead[i].sum()),
                revived=0 if revived[i] is None else be.count(revived[i]),
                ablated=int(ablated[i].sum()),
            )
        )
    if all(r is None for r in revived):
        return _finish(plan, nnz, masks, reports, None)
    weights = []
    for layer, mask, fresh, key in zip(layers, masks, revived, keys):
        w = be.apply(layer.weight, layer.mask, mask)
        if fresh is not None:
            w = be.signed_fill(w, fresh, revival_scale(be.shape(w), layer.axis), key)
        weights.append(w)
    return _finish(plan, nnz, masks, reports, weights, revived)


def _revive(
    be: ArrayBackend, layer: Layer, kept_mask: Any, budget: int, dead: np.ndarray, key: HashKey
) -> tuple[Any, Any]:
    """Grow the dead units' share of ``budget`` (:func:`sparsecore.units.revival_quotas`).

    Returns the mask with them added and the positions grown: inactive after pruning, of largest
    ``|momentum|`` inside each dead unit (of the weight, all 0 there, without momentum), ties by
    the position hash.
    """
    free = be.unit_count(kept_mask, layer.axis, active=False)
    quotas = revival_quotas(budget, dead, free)
    source = layer.momentum if layer.momentum is not None else layer.weight
    grown = be.select_per_unit(
        source,
        kept_mask,
        quotas,
        axis=layer.axis,
        among_active=False,
        largest=True,
        magnitude=True,
        key=key,
    )
    return be.logical_or(kept_mask, grown), grown


def _fused_update(
    be: ArrayBackend, layers: Sequence[Layer], plan: _Plan, source: str | None
) -> UpdateResult | None:
    """Magnitude pruning + momentum growth through the backend's fused capability.

    Same checks, host routine, masks and report as :func:`_generic_update`; the finiteness checks
    ride along the two reads. Whenever something is wrong, the generic checks run first so the
    error raised is the generic path's. Returns None to hand the update to the generic path
    (layers the backend's fused kernels do not take).
    """
    try:
        check_layers(be, layers, momentum=True, grad=False, finite=False)
    except SparseCoreError:
        check_layers(be, layers, momentum=True, grad=False)  # an earlier NaN is reported first
        raise
    scans = be.fused_scan(layers, source=source)
    if scans is None:
        return None
    if not all(scan.finite for scan in scans):
        check_layers(be, layers, momentum=True, grad=False)  # raises the generic path's error
        return None  # pragma: no cover - a float64 sum overflowed: the generic path decides
    sizes = [math.prod(be.shape(layer.mask)) for layer in layers]
    nnz = [scan.nnz for scan in scans]
    keys = [HashKey(plan.seed, plan.update_index, i) for i in range(len(layers))]
    dead = dead_units_of(be, layers)
    try:
        if source is None:
            scores = [float(n) if plan.redistribution == "nonzero" else 0.0 for n in nnz]
        else:  # the mean over active positions, or over all of an empty layer (modes.py)
            scores = [
                float(scan.active_abs_sum / n if n else scan.total_abs_sum / size)
                for scan, n, size in zip(scans, nnz, sizes)
            ]
        _check_scores(layers, scores, plan.redistribution)
        shares = importance_shares(scores, sizes)
        pruned_counts = [
            magnitude_prune_count(plan.prune_rate, n, max(0, n - floor_l))
            for n, floor_l in zip(nnz, plan.floors(sizes))
        ]
        kept = [n - r for n, r in zip(nnz, pruned_counts)]
        caps, budgets, shares = _budgets(layers, plan, sizes, kept, pruned_counts, shares)
    except SparseCoreError:
        # the generic path checks every weight for NaN/Inf before it gets here
        check_layers(be, layers, momentum=True, grad=False)
        raise
    if plan.revive and any(d.any() and g > 0 for d, g in zip(dead, budgets)):
        return None  # dead units to revive: the generic path grows them
    fused = be.fused_prune_regrow(layers, nnz, pruned_counts, [int(g) for g in budgets], keys)
    if fused is None:
        check_layers(be, layers, momentum=True, grad=False)  # raises the generic path's error
        raise RuntimeError("the fused update reported a NaN/Inf weight the checks did not find")
    reports = [
        LayerReport(
            name=layer.name,
            size=sizes[i],
            nnz_before=nnz[i],
            nnz_after=kept[i] + int(budgets[i]),
            pruned=pruned_counts[i],
            grown=int(budgets[i]),
            net_pruned=out.net_pruned,
            net_grown=out.net_grown,
            importance=scores[i],
            share=float(shares[i]),
            capacity=int(caps[i]),
            units=int(dead[i].size),
            dead_units=int(dead[i].sum()),
        )
        for i, (layer, out) in enumerate(zip(layers, fused))
    ]
    return _finish(plan, nnz, [out.mask for out in fused], reports, [out.weight for out in fused])


def _finish(
    plan: _Plan,
    nnz: list[int],
    masks: list[Any],
    reports: list[LayerReport],
    weights: list[Any] | None,
    revived: list[Any] | None = None,
) -> UpdateResult:
    if sum(r.nnz_after for r in reports) != sum(nnz):  # pragma: no cover - guarded above
        raise RuntimeError("mask update changed the total number of active weights")
    return UpdateResult(
        masks=masks,
        report=UpdateReport(
            update=plan.update_index,
            prune_rate=plan.prune_rate,
            layers=tuple(reports),
            step=plan.step,
        ),
        weights=weights,
        revived=revived,
    )


def apply_masks(
    layers: Sequence[Layer], masks: Sequence[Any], backend: ArrayBackend | str | None = None
) -> list[Any]:
    """Weights under the new masks (new arrays): unchanged where active before and after, else +0.

    Weights grown into dead units start non-zero (``revive_dead_units``): use
    :func:`new_weights` to get those too.
    """
    be = _resolve_backend(layers, backend)
    return [be.apply(layer.weight, layer.mask, mask) for layer, mask in zip(layers, masks)]


def new_weights(
    layers: Sequence[Layer], result: UpdateResult, backend: ArrayBackend | str | None = None
) -> list[Any]:
    """The weights after update ``result`` of ``layers`` (new arrays): ``result.weights`` when
    the update computed them, else :func:`apply_masks` of its masks."""
    if result.weights is not None:
        return list(result.weights)
    return apply_masks(layers, result.masks, backend)


def check_layers(
    backend: ArrayBackend,
    layers: Sequence[Layer],
    *,
    momentum: bool,
    grad: bool,
    finite: bool = True,
) -> None:
    """Raise :class:`SparseCoreError` for the first bad layer; change nothing.

    ``finite=False`` leaves out the NaN/Inf checks (the fused update makes them in its passes).
    """
    if len(layers) == 0:
        raise SparseCoreError("no layers given: a mask update needs at least one sparse layer")
    seen: set[str] = set()
    for layer in layers:
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
        needed = [
            ("weight", layer.weight, True),
            ("momentum", layer.momentum, momentum),
            ("grad", layer.grad, grad),
        ]
        for label, array, required in needed:
            if array is None:
                if required:
                    raise SparseCoreError(
                        f"layer {name!r}: this update needs its {label} (the chosen modes read it)"
                    )
                continue
            if label != "weight":
                if not backend.owns(array) or backend.dtype_kind(array) != "f":
                    raise SparseCoreError(
                        f"layer {name!r}: {label} must be a floating-point {backend.name} array"
                    )
                if backend.shape(array) != shape:
                    raise SparseCoreError(
                        f"layer {name!r}: {label} shape {backend.shape(array)} differs from weight shape {shape}"
                    )
            if finite and required and not backend.all_finite(array):
                raise NonFiniteError(
                    f"layer {name!r}: {label} contains NaN or Inf; the mask update was not made "
                    f"(nothing changed)"
                )


def _ablation_fractions(
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


def _check_update_args(
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


def _resolve_backend(layers: Sequence[Layer], backend: ArrayBackend | str | None) -> ArrayBackend:
    if isinstance(backend, ArrayBackend):
        return backend
    if isinstance(backend, str):
        return get_backend(backend)
    if not layers:
        raise SparseCoreError("no layers given: a mask update needs at least one sparse layer")
    first = layers[0]
    return backend_for(first.weight if isinstance(first, Layer) else first)


class SparseEngine:
    """The state of one sparse training run: target count, update counter, schedule, history.

    It owns no arrays but the "ever active" masks; weights, masks and momentum stay with the caller
    (a NumPy user, or an adapter holding framework tensors). Typical use::

        engine = SparseEngine(config, names, shapes)
        masks = engine.initial_masks()
        ...
        if engine.due(step):
            result = engine.update(layers, step)
    """

    def __init__(
        self,
        config: SparseConfig,
        names: Sequence[str],
        shapes: Sequence[Sequence[int]],
        axes: Sequence[int] | None = None,
    ) -> None:
        if not names:
            raise SparseCoreError("no layers given: at least one sparse layer is needed")
        if len(names) != len(shapes) or (axes is not None and len(axes) != len(names)):
            raise SparseCoreError(
                f"got {len(names)} names, {len(shapes)} shapes and "
                f"{'no' if axes is None else len(axes)} axes; they must match"
            )
        if not all(isinstance(n, str) for n in names):
            raise SparseCoreError(f"layer names must be strings, got {list(names)}")
        if len(set(names)) != len(names):
            raise SparseCoreError(f"layer names must be unique, got {list(names)}")
        if not isinstance(config, SparseConfig):
            raise SparseCoreError(f"config must be a SparseConfig, got {type(config).__name__}")
        self.config = config
        self.names = list(names)
        self.shapes = [check_shape(f"layer {n!r}", s) for n, s in zip(names, shapes)]
        self.axes = [0] * len(names) if axes is None else list(axes)
        self.counts = layer_counts(
            self.shapes,
            config.density,
            config.init,
            axes=self.axes,
            max_density=config.max_density,
            min_density=config.min_density,
            cover_units=config.cover_units,
        )
        self.axes = [int(a) for a in self.axes]  # checked by layer_counts
        self.target = sum(self.counts)
        self.updates = 0
        self.history: list[UpdateReport] = []
        self.ever_active: list[Any] | None = None
        self._warned_dead: set[str] = set()  # layers already named in a DeadUnitsWarning

    # -- masks and schedule ---------------------------------------------------------------
    def initial_masks(self) -> list[np.ndarray]:
        """NumPy initial masks (exact counts, largest position hashes of update 0)."""
        from .init import initial_mask

        cover = self.config.cover_units
        masks = [
            initial_mask(
                shape, count, seed=self.config.seed, layer=i, cover_axis=a if cover else None
            )
            for i, (shape, count, a) in enumerate(zip(self.shapes, self.counts, self.axes))
        ]
        for name, mask, axis in zip(self.names, masks, self.axes):
            units = mask.shape[axis]
            empty = units - int(
                np.count_nonzero(np.moveaxis(mask, axis, 0).reshape(units, -1).any(1))
            )
            self._warn_dead(name, empty, units, "start with no weight")
        return masks

    def _warn_dead(self, name: str, dead: int, units: int, what: str) -> None:
        """Warn, once per layer, when most of its output units are dead."""
        if 2 * dead <= units or name in self._warned_dead:
            return
        self._warned_dead.add(name)
        hint = (
            "they are regrown with non-zero weights (revive_dead_units=True)"
            if self.config.revive_dead_units
            else "revive_dead_units=True regrows them with non-zero weights, and ERK/ER initial "
            "densities or a higher density give small layers more weights"
        )
        warnings.warn(
            f"sparsecore: layer {name!r}: {dead} of {units} output units {what} (a unit without "
            f"weights or gradient is dead: it passes no signal and momentum growth never chooses "
            f"it); {hint}",
            DeadUnitsWarning,
            stacklevel=3,
        )

    def due(self, step: int, *, epoch_end: bool = False) -> bool:
        """Is a mask update due after optimizer step ``step``?"""
        return self.config.schedule().due(step, epoch_end=epoch_end)

    def prune_rate(self, step: int) -> float:
        return self.config.prune_rate_at(step)

    # -- updates -----------------------------------------------------------------------------
    def update(
        self,
        layers: Sequence[Layer],
        step: int,
        *,
        backend: ArrayBackend | str | None = None,
        prune_rate: float | None = None,
    ) -> UpdateResult:
        """Run mask update ``u = updates + 1`` on ``layers`` (in the engine's layer order).

        With ``on_nonfinite='skip'`` a NaN/Inf input records a skipped update and returns the
        masks unchanged instead of raising. The same as :meth:`propose` then :meth:`commit`.
        """
        try:
            proposal = self.propose(layers, step, backend=backend, prune_rate=prune_rate)
        except NonFiniteError as err:
            if self.config.on_nonfinite != "skip":
                raise
            return UpdateResult([layer.mask for layer in layers], self.record_skip(step, str(err)))
        return self.commit(layers, proposal, backend=backend)

    def propose(
        self,
        layers: Sequence[Layer],
        step: int,
        *,
        backend: ArrayBackend | str | None = None,
        prune_rate: float | None = None,
    ) -> UpdateResult:
        """Compute mask update ``u = updates + 1`` without recording it: the engine is unchanged.

        Raises :class:`NonFiniteError` for NaN/Inf input whatever ``on_nonfinite`` says (the
        caller decides). Distributed adapters propose on every rank, agree, and then
        :meth:`commit` the same masks and report everywhere.
        """
        be = _resolve_backend(layers, backend)
        self._check_match(be, layers)
        rate = self.prune_rate(step) if prune_rate is None else prune_rate
        cfg = self.config
        return update(
            layers,
            prune_rate=rate,
            update_index=self.updates + 1,
            seed=cfg.seed,
            prune=cfg.prune,
            growth=cfg.growth,
            redistribution=cfg.redistribution,
            max_density=cfg.max_density,
            min_density=cfg.min_density,
            step=step,
            backend=be,
            revive_dead_units=cfg.revive_dead_units,
            # the last layer's units are the network's outputs: never ablated
            ablate_below=[cfg.ablate_below] * (len(layers) - 1) + [0.0],
        )

    def commit(
        self,
        layers: Sequence[Layer],
        proposal: UpdateResult,
        *,
        backend: ArrayBackend | str | None = None,
    ) -> UpdateResult:
        """Record a proposed update of ``layers`` (their masks before it): the update counter,
        the ever-active masks and the history entry (the proposal's report with the ever-active
        counts). Returns the proposal with that report."""
        be = _resolve_backend(layers, backend)
        if proposal.report.update != self.updates + 1:
            raise SparseCoreError(
                f"the proposal is update {proposal.report.update}, the engine expects "
                f"{self.updates + 1}"
            )
        ever = self.ever_active or [layer.mask for layer in layers]
        ever = [be.logical_or(e, m) for e, m in zip(ever, proposal.masks)]
        ever_counts = be.counts(ever)
        report = UpdateReport(
            update=proposal.report.update,
            prune_rate=proposal.report.prune_rate,
            layers=proposal.report.layers,
            step=proposal.report.step,
            extra={
                "ever_active": ever_counts,
                "ever_active_fraction": sum(ever_counts) / sum(math.prod(s) for s in self.shapes),
            },
        )
        self.updates += 1
        self.ever_active = ever
        self.history.append(report)
        for layer in report.layers:
            # units emptied on purpose (ablate_below) are not the dead units this warns about
            self._warn_dead(
                layer.name,
                max(0, layer.dead_units - layer.ablated),
                layer.units,
                "were dead at this mask update",
            )
        return UpdateResult(proposal.masks, report, proposal.weights, proposal.revived)

    def record_skip(self, step: int, reason: str) -> UpdateReport:
        """Record that the update due after ``step`` was skipped, and why (e.g. inf gradients)."""
        report = UpdateReport(
            update=self.updates, prune_rate=0.0, layers=(), step=step, skipped=True, reason=reason
        )
        self.history.append(report)
        return report

    def _check_match(self, be: ArrayBackend, layers: Sequence[Layer]) -> None:
        if [layer.name for layer in layers] != self.names:
            raise SparseCoreError(
                f"layers {[getattr(layer, 'name', layer) for layer in layers]} do not match the "
                f"engine's layers {self.names} (same names, same order)"
            )
        for layer, shape in zip(layers, self.shapes):
            if be.shape(layer.mask) != shape:
                raise SparseCoreError(
                    f"layer {layer.name!r}: mask shape {be.shape(layer.mask)} differs from the "
                    f"engine's {shape}"
                )
        total = sum(be.counts([layer.mask for layer in layers]))
        if total != self.target:
            raise SparseCoreError(
                f"the masks hold {total} active weights but this run keeps exactly "
                f"{self.target}; were masks changed outside the engine?"
            )

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (masks are the caller's to save)."""
        return {
            "config": self.config.to_dict(),
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "axes": list(self.axes),
            "target": self.target,
            "updates": self.updates,
            "history": [r.to_dict() for r in self.history],
            "ever_active": None if self.ever_active is None else list(self.ever_active),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: all or nothing.

        The whole state is checked first (:func:`sparsecore.saved_state.read_engine_state`): it
        must be for these layers (names, shapes, output axes), at this density and target, with
        every field present, of its type and consistent with the others. A bad one raises
        :class:`SparseCoreError` naming it, and the engine is left exactly as it was. The saved
        config replaces this engine's (a restore continues the saved run).
        """
        self.restore(
            read_engine_state(
                state,
                names=self.names,
                shapes=self.shapes,
                axes=self.axes,
                config=self.config,
                target=self.target,
            )
        )

    def restore(self, checked: EngineState) -> None:
        """Take a state that :func:`~sparsecore.saved_state.read_engine_state` has checked (for
        adapters that check their own fields too before they change anything)."""
        self.config = checked.config
        self.target = checked.target
        self.updates = checked.updates
        self.history = list(checked.history)
        self.ever_active = None if checked.ever_active is None else list(checked.ever_active)
