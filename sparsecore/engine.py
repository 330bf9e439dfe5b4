"""One sparse-momentum mask update, written once against the array-backend interface.

:func:`update` is a pure function: it reads layers (weights, masks, momentum, gradients) and returns
new masks plus a report, changing nothing it was given. It reads top to bottom as the algorithm
(ALGORITHM.md): check the options and layers once (:func:`_plan`, :func:`_check_structure`), then

1. :func:`_importance`: each layer's score, before pruning;
2. :func:`_prune` (and :func:`_ablate` with ``ablate_below``): what each layer loses;
3. :func:`_redistribute`: the shared host routine that turns scores into integer budgets;
4. :func:`_regrow`: what each layer gains (dead units first, when reviving);
5. :func:`_apply`: the report, and the new weights where the update computes them.

A backend whose fused update serves the chosen modes (:mod:`sparsecore.fusion`) runs steps 1, 2
and 4's array work in its own two passes instead (:func:`_fused_update`); the host steps, the
masks and the report are the same. :class:`SparseEngine` adds the little state a training run
needs (the target count N, the update counter, the history) and the schedule.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import ArrayBackend, LayerScan, backend_for, get_backend
from .config import SparseConfig
from .errors import DeadUnitsWarning, NonFiniteError, SparseCoreError
from .fusion import Fusion, choose
from .hashing import HashKey
from .init import layer_counts
from .layers import Layer
from .modes import GROWTH, IMPORTANCE, PRUNE, ModeInfo, magnitude_prune_count
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
    """One mask update (ALGORITHM.md): importance, prune, redistribute, regrow, apply.

    Returns the new masks; the given arrays are not touched (see :func:`apply_masks`). Every
    input is checked before any work: a bad layer raises :class:`~sparsecore.SparseCoreError`
    naming it. ``update_index`` (u >= 1) and ``seed`` feed the tie-breaking hash, so equal inputs
    give equal masks on every backend and process.

    A backend whose fused update (:mod:`sparsecore.fusion`) serves the chosen modes (magnitude
    pruning with momentum growth, any built-in redistribution, on the built-in backends) runs
    the array work in two reads per layer and also returns the new weights; the masks and the
    report are those of the step-by-step path.

    ``revive_dead_units``: dead output units (no active weight, or no gradient) first get their
    share of each layer's regrowth, with non-zero starting weights (:mod:`sparsecore.units`).

    ``ablate_below`` (in [0, 1]; 0 is off; one value for every layer, or one per layer): after
    pruning, output units whose active fan-in is below this fraction of the mean fan-in of the
    layer's units with weights are emptied and get no weight back at this update; their weights
    join the regrowth pool (:mod:`sparsecore.structured`). :class:`SparseEngine` leaves the
    last layer (the network's outputs) out.
    """
    be = _resolve_backend(layers, backend)
    plan = _plan(
        layers,
        prune_rate=prune_rate,
        update_index=update_index,
        seed=seed,
        prune=prune,
        growth=growth,
        redistribution=redistribution,
        max_density=max_density,
        min_density=min_density,
        step=step,
        revive=revive_dead_units,
        ablate_below=ablate_below,
    )
    # The inputs' structure is checked once, here; NaN/Inf are found by the path's own reads.
    _check_structure(be, layers, momentum=plan.reads("momentum"), grad=plan.reads("grad"))
    fusion = (
        None if any(plan.ablate_below) else choose(be, plan.prune, plan.growth, plan.importance)
    )
    if fusion is not None:
        result = _fused_update(be, layers, plan, fusion)
        if result is not None:
            return result
    _check_finite(be, layers, plan)
    return _stepwise_update(be, layers, plan)


# -- the plan: every option checked, every mode looked up --------------------------------------


@dataclass(frozen=True)
class _Plan:
    """The options of one update, checked, with the chosen modes' registrations."""

    prune_rate: float
    update_index: int
    seed: int
    redistribution: str
    max_density: float
    min_density: float
    step: int | None
    prune: ModeInfo
    growth: ModeInfo
    importance: ModeInfo | None  # None: redistribution "none"
    revive: bool = False
    ablate_below: tuple[float, ...] = ()

    def reads(self, signal: str) -> bool:
        """Does a chosen mode read ``signal`` (:data:`sparsecore.modes.SIGNALS`)?"""
        modes = (self.prune, self.growth, self.importance)
        return any(signal in mode.reads for mode in modes if mode is not None)

    def floors(self, sizes: Sequence[int]) -> list[int]:
        """Per layer, the fewest active weights pruning may leave (``min_density``)."""
        return [
            min(math.ceil(self.min_density * n), math.floor(self.max_density * n)) for n in sizes
        ]

    def keys(self, layers: int) -> list[HashKey]:
        """Per layer, the key of this update's tie-breaking hash."""
        return [HashKey(self.seed, self.update_index, i) for i in range(layers)]


def _plan(
    layers: Sequence[Layer],
    *,
    prune_rate: Any,
    update_index: Any,
    seed: Any,
    prune: str,
    growth: str,
    redistribution: str,
    max_density: Any,
    min_density: Any,
    step: Any,
    revive: Any,
    ablate_below: Any,
) -> _Plan:
    rate, index, seed, max_density, min_density, step = _check_update_args(
        prune_rate, update_index, seed, max_density, min_density, step
    )
    prune_mode = PRUNE.info(prune)
    growth_mode = GROWTH.info(growth)
    importance = None if redistribution == "none" else IMPORTANCE.info(redistribution)
    return _Plan(
        rate,
        index,
        seed,
        redistribution,
        max_density,
        min_density,
        step,
        prune_mode,
        growth_mode,
        importance,
        check_flag("revive_dead_units", revive),
        _ablation_fractions(layers, ablate_below),
    )


@dataclass(frozen=True)
class _Found:
    """The layers as the update found them: sizes, active counts, hash keys, dead units."""

    sizes: list[int]
    nnz: list[int]
    keys: list[HashKey]
    dead: list[np.ndarray]


# -- the update, step by step on the backend's operations ---------------------------------------


def _stepwise_update(be: ArrayBackend, layers: Sequence[Layer], plan: _Plan) -> UpdateResult:
    """The update written once against the backend interface, for any modes."""
    found = _Found(
        sizes=[math.prod(be.shape(layer.mask)) for layer in layers],
        nnz=[be.count(layer.mask) for layer in layers],
        keys=plan.keys(len(layers)),
        dead=dead_units_of(be, layers),
    )
    scores = _importance(be, layers, plan, found)
    pruned = _prune(be, layers, plan, found)
    if any(plan.ablate_below):
        _ablate(be, layers, plan, found, pruned)
    budgets = _redistribute(layers, plan, found, pruned, scores)
    grown = _regrow(be, layers, plan, found, pruned, budgets)
    return _apply(be, layers, plan, found, pruned, budgets, grown, scores)


def _importance(
    be: ArrayBackend, layers: Sequence[Layer], plan: _Plan, found: _Found
) -> list[float]:
    """Step 1: each layer's importance score, read before pruning (0 without redistribution)."""
    if plan.importance is None:
        return [0.0] * len(layers)
    fn = plan.importance.fn
    scores = [float(fn(be, layer, n)) for layer, n in zip(layers, found.nnz)]
    _check_scores(layers, scores, plan.redistribution)
    return scores


@dataclass
class _Pruned:
    """What pruning (and ablation) left: per layer, the kept mask, how many weights went, the
    positions growth may not take (``blocked``) and the ablated units' positions (``cut``)."""

    kept_masks: list[Any]
    counts: list[int]
    blocked: list[Any]
    cut: list[Any | None]
    ablated: list[np.ndarray]
    room: list[int] | None = None  # free positions outside ablated units (ablate_below)


def _prune(be: ArrayBackend, layers: Sequence[Layer], plan: _Plan, found: _Found) -> _Pruned:
    """Step 2: the prune mode's choice per layer, checked (active positions, within the floor)."""
    kept_masks, counts = [], []
    fn, name = plan.prune.fn, plan.prune.name
    for layer, n, floor_l, key in zip(layers, found.nnz, plan.floors(found.sizes), found.keys):
        pruned = fn(be, layer, plan.prune_rate, max(0, n - floor_l), key)
        r = be.count(pruned)
        kept_mask = be.and_not(layer.mask, pruned)
        # |mask & ~pruned| == n - r exactly when every pruned position was active.
        if be.count(kept_mask) != n - r:
            raise SparseCoreError(
                f"layer {layer.name!r}: prune mode {name!r} selected inactive positions"
            )
        if r > max(0, n - floor_l):
            raise SparseCoreError(
                f"layer {layer.name!r}: prune mode {name!r} removed {r} weights, more than the "
                f"{max(0, n - floor_l)} allowed by min_density={plan.min_density}"
            )
        kept_masks.append(kept_mask)
        counts.append(r)
    return _Pruned(
        kept_masks=kept_masks,
        counts=counts,
        blocked=list(kept_masks),  # growth may only take positions inactive here
        cut=[None] * len(layers),
        ablated=[np.zeros(d.size, dtype=bool) for d in found.dead],
    )


def _ablate(
    be: ArrayBackend, layers: Sequence[Layer], plan: _Plan, found: _Found, pruned: _Pruned
) -> None:
    """Step 2b (``ablate_below``): empty the units pruning left with a small fan-in; their
    weights join the regrowth pool and their positions stay empty at this update."""
    pruned.room = []
    for i, (layer, floor_l) in enumerate(zip(layers, plan.floors(found.sizes))):
        size = found.sizes[i]
        if not plan.ablate_below[i]:
            pruned.room.append(size)  # no bound beyond the capacity's own
            continue
        active = be.unit_count(pruned.kept_masks[i], layer.axis, active=True)
        ablated = ablated_units(
            active,
            ablate_below=plan.ablate_below[i],
            per_unit=size // active.size,
            nnz_before=found.nnz[i],
            removable=max(0, found.nnz[i] - floor_l) - pruned.counts[i],
            key=found.keys[i],
        )
        pruned.ablated[i] = ablated
        if ablated.any():
            quotas = np.where(ablated, size // active.size, 0).astype(np.int64)
            cut = be.select_per_unit(
                layer.weight,
                be.zeros_mask(layer.mask),
                quotas,
                axis=layer.axis,
                among_active=False,
                largest=True,
                magnitude=True,
                key=found.keys[i],
            )
            kept_mask = be.and_not(pruned.kept_masks[i], cut)
            pruned.counts[i] += int(active[ablated].sum())
            pruned.kept_masks[i] = kept_mask
            pruned.cut[i] = cut
            pruned.blocked[i] = be.logical_or(kept_mask, cut)
        pruned.room.append(size - be.count(pruned.blocked[i]))


@dataclass(frozen=True)
class _Budgets:
    """Step 3's result per layer: capacity, regrowth budget g_l and the reported share."""

    caps: np.ndarray
    grow: np.ndarray
    shares: np.ndarray


def _redistribute(
    layers: Sequence[Layer], plan: _Plan, found: _Found, pruned: _Pruned, scores: list[float]
) -> _Budgets:
    """Step 3, the shared host routine: capacities, then budgets g_l from the importance shares
    (:func:`~sparsecore.redistribute.split_budget`), or each layer's own pruned count."""
    kept = [n - r for n, r in zip(found.nnz, pruned.counts)]
    caps = capacities(found.sizes, kept, plan.max_density)
    if pruned.room is not None:
        caps = np.minimum(caps, np.asarray(pruned.room, dtype=caps.dtype))
    total_pruned = sum(pruned.counts)
    if plan.redistribution == "none":
        budgets = np.asarray(pruned.counts, dtype=np.int64)
        over = np.flatnonzero(budgets > caps)
        if over.size:
            i = int(over[0])
            raise SparseCoreError(
                f"layer {layers[i].name!r}: redistribution 'none' must regrow {budgets[i]} but "
                f"max_density leaves room for {caps[i]}"
            )
        shares = budgets / total_pruned if total_pruned else np.zeros(len(layers))
    else:
        shares = importance_shares(scores, found.sizes)
        budgets = split_budget(total_pruned, shares, caps)
    return _Budgets(caps, budgets, shares)


@dataclass(frozen=True)
class _Grown:
    """Step 4's result per layer: the new mask and the revived positions (None: none)."""

    masks: list[Any]
    revived: list[Any | None]


def _regrow(
    be: ArrayBackend,
    layers: Sequence[Layer],
    plan: _Plan,
    found: _Found,
    pruned: _Pruned,
    budgets: _Budgets,
) -> _Grown:
    """Step 4: the growth mode's choice per layer (dead units first, when reviving), checked
    (exactly the budget, inactive positions only), joined with what pruning kept."""
    masks: list[Any] = []
    revived: list[Any | None] = [None] * len(layers)
    name = plan.growth.name
    for i, layer in enumerate(layers):
        g = int(budgets.grow[i])
        start = pruned.blocked[i]
        to_revive = found.dead[i] & ~pruned.ablated[i]
        if plan.revive and g > 0 and to_revive.any():
            start, revived[i] = _revive(be, layer, pruned.blocked[i], g, to_revive, found.keys[i])
        rest = g - (0 if revived[i] is None else be.count(revived[i]))  # for the growth mode
        grown = plan.growth.fn(be, layer, start, rest, found.keys[i])
        joined = be.logical_or(start, grown)
        cut = pruned.cut[i]
        new_mask = joined if cut is None else be.and_not(joined, cut)
        kept = found.nnz[i] - pruned.counts[i]
        if be.count(grown) != rest or be.count(new_mask) != kept + g:
            raise SparseCoreError(
                f"layer {layer.name!r}: growth mode {name!r} must activate exactly {rest} "
                f"inactive positions, got {be.count(grown)} (of which "
                f"{be.count(start) + be.count(grown) - be.count(joined)} were already active)"
            )
        if revived[i] is not None:  # only positions inactive before start at +-scale
            fresh = be.and_not(revived[i], layer.mask)
            revived[i] = fresh if be.count(fresh) else None
        masks.append(new_mask)
    return _Grown(masks, revived)


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


def _apply(
    be: ArrayBackend,
    layers: Sequence[Layer],
    plan: _Plan,
    found: _Found,
    pruned: _Pruned,
    budgets: _Budgets,
    grown: _Grown,
    scores: list[float],
) -> UpdateResult:
    """Step 5: the report, and the new weights when dead units were revived (grown at
    +-scale); otherwise the caller applies the masks (:func:`apply_masks`)."""
    reports = []
    for i, (layer, new_mask) in enumerate(zip(layers, grown.masks)):
        g, kept = int(budgets.grow[i]), found.nnz[i] - pruned.counts[i]
        # nnz_after - nnz_before == net_grown - net_pruned, so one count gives both.
        net_grown = be.count(be.and_not(new_mask, layer.mask))
        revived = grown.revived[i]
        reports.append(
            LayerReport(
                name=layer.name,
                size=found.sizes[i],
                nnz_before=found.nnz[i],
                nnz_after=kept + g,
                pruned=pruned.counts[i],
                grown=g,
                net_pruned=net_grown - (kept + g - found.nnz[i]),
                net_grown=net_grown,
                importance=scores[i],
                share=float(budgets.shares[i]),
                capacity=int(budgets.caps[i]),
                units=int(found.dead[i].size),
                dead_units=int(found.dead[i].sum()),
                revived=0 if revived is None else be.count(revived),
                ablated=int(pruned.ablated[i].sum()),
            )
        )
    if all(r is None for r in grown.revived):
        return _finish(plan, found.nnz, grown.masks, reports, None)
    weights = []
    for layer, mask, fresh, key in zip(layers, grown.masks, grown.revived, found.keys):
        w = be.apply(layer.weight, layer.mask, mask)
        if fresh is not None:
            w = be.signed_fill(w, fresh, revival_scale(be.shape(w), layer.axis), key)
        weights.append(w)
    return _finish(plan, found.nnz, grown.masks, reports, weights, grown.revived)


# -- the update through a backend's fused passes -----------------------------------------------


def _fused_update(
    be: ArrayBackend, layers: Sequence[Layer], plan: _Plan, fusion: Fusion
) -> UpdateResult | None:
    """The same steps with the array work in the backend's two fused passes (:mod:`.fusion`):
    the scan gives what step 1 and the prune counts need, the host routine (step 3) runs as
    step by step, one pass prunes and regrows (steps 2 and 4), and the report is the same.

    NaN/Inf are found by the passes' reads; when they find one, :func:`_check_finite` names the
    array exactly as the step-by-step path would have. Returns None to go step by step (layers
    the backend's passes do not take, or dead units to revive).
    """
    scans = fusion.update.scan(layers, source=fusion.source)
    if scans is None:
        return None
    if not all(scan.finite for scan in scans):
        _check_finite(be, layers, plan)
        return None  # pragma: no cover - a float64 sum overflowed: the step-by-step path decides
    found = _Found(
        sizes=[math.prod(be.shape(layer.mask)) for layer in layers],
        nnz=[scan.nnz for scan in scans],
        keys=plan.keys(len(layers)),
        dead=dead_units_of(be, layers),
    )
    try:
        scores = [_scanned_importance(plan, scan, size) for scan, size in zip(scans, found.sizes)]
        _check_scores(layers, scores, plan.redistribution)
        counts = [
            magnitude_prune_count(plan.prune_rate, n, max(0, n - floor_l))
            for n, floor_l in zip(found.nnz, plan.floors(found.sizes))
        ]
        pruned = _Pruned(
            kept_masks=[],
            counts=counts,
            blocked=[],
            cut=[None] * len(layers),
            ablated=[np.zeros(d.size, dtype=bool) for d in found.dead],
        )
        budgets = _redistribute(layers, plan, found, pruned, scores)
    except SparseCoreError:
        _check_finite(be, layers, plan)  # a NaN weight (not read by the scan) is reported first
        raise
    if plan.revive and any(d.any() and g > 0 for d, g in zip(found.dead, budgets.grow)):
        return None  # dead units to revive: the step-by-step path grows them
    fused = fusion.update.prune_regrow(
        layers, found.nnz, counts, [int(g) for g in budgets.grow], found.keys
    )
    if fused is None:
        _check_finite(be, layers, plan)  # raises, naming the NaN/Inf weight
        raise RuntimeError("the fused update reported a NaN/Inf weight the checks did not find")
    reports = [
        LayerReport(
            name=layer.name,
            size=found.sizes[i],
            nnz_before=found.nnz[i],
            nnz_after=found.nnz[i] - counts[i] + int(budgets.grow[i]),
            pruned=counts[i],
            grown=int(budgets.grow[i]),
            net_pruned=out.net_pruned,
            net_grown=out.net_grown,
            importance=scores[i],
            share=float(budgets.shares[i]),
            capacity=int(budgets.caps[i]),
            units=int(found.dead[i].size),
            dead_units=int(found.dead[i].sum()),
        )
        for i, (layer, out) in enumerate(zip(layers, fused))
    ]
    return _finish(
        plan, found.nnz, [out.mask for out in fused], reports, [out.weight for out in fused]
    )


def _scanned_importance(plan: _Plan, scan: LayerScan, size: int) -> float:
    """Step 1 from a scan: the built-in rules' scores (:mod:`sparsecore.modes`)."""
    if plan.importance is None:
        return 0.0
    if plan.importance.rule == "nonzero":
        return float(scan.nnz)
    # the mean |x| over the active positions, or over all of an empty layer
    return float(scan.active_abs_sum / scan.nnz if scan.nnz else scan.total_abs_sum / size)


def _check_scores(layers: Sequence[Layer], scores: list[float], redistribution: str) -> None:
    for layer, s in zip(layers, scores):
        if not (math.isfinite(s) and s >= 0):
            raise SparseCoreError(
                f"layer {layer.name!r}: importance mode {redistribution!r} returned {s!r}; "
                f"it must be finite and >= 0"
            )


def _finish(
    plan: _Plan,
    nnz: list[int],
    masks: list[Any],
    reports: list[LayerReport],
    weights: list[Any] | None,
    revived: list[Any | None] | None = None,
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

    First the structure of every layer (types, dtypes, shapes, the arrays the modes read), then,
    unless ``finite=False``, NaN/Inf in the arrays read (:class:`NonFiniteError`).
    """
    _check_structure(backend, layers, momentum=momentum, grad=grad)
    if finite:
        _check_finite_arrays(backend, layers, momentum=momentum, grad=grad)


def _check_finite(backend: ArrayBackend, layers: Sequence[Layer], plan: _Plan) -> None:
    """NaN/Inf in the arrays this update reads: the first one raises naming layer and array."""
    _check_finite_arrays(backend, layers, momentum=plan.reads("momentum"), grad=plan.reads("grad"))


def _check_finite_arrays(
    backend: ArrayBackend, layers: Sequence[Layer], *, momentum: bool, grad: bool
) -> None:
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


def _check_structure(
    backend: ArrayBackend, layers: Sequence[Layer], *, momentum: bool, grad: bool
) -> None:
    """Types, dtypes and shapes of every layer, and the presence of the arrays read."""
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
