"""The named steps of one mask update (ALGORITHM.md), each a small function over the backend.

:func:`sparsecore.engine.update` runs them top to bottom: :func:`make_plan` (options checked,
modes looked up), :func:`find` (the layers as found), then

1. :func:`importance`: each layer's score, before pruning;
2. :func:`prune` (and :func:`ablate` with ``ablate_below``): what each layer loses;
3. :func:`redistribute`: the shared host routine that turns scores into integer budgets;
4. :func:`regrow`: what each layer gains (dead units first, when reviving);
5. :func:`apply`: the report, and the new weights where the update computes them.

Every step validates what a mode returned and raises naming the layer and the mode. A backend's
fused update (:mod:`sparsecore.fusion`) replaces the array work of steps 1, 2 and 4; steps 3 and
5's host work is shared (:func:`redistribute`, :func:`layer_report`, :func:`scanned_importance`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import ArrayBackend, LayerScan
from .checks import ablation_fractions, check_update_args
from .errors import SparseCoreError
from .hashing import HashKey
from .layers import Layer
from .modes import GROWTH, IMPORTANCE, PRUNE, ModeInfo, magnitude_prune_count
from .records.updates import LayerReport
from .redistribute import capacities, importance_shares, split_budget
from .structured import ablated_units
from .units import dead_units_of, revival_quotas, revival_scale
from .validation import check_flag


@dataclass(frozen=True)
class Plan:
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


def make_plan(
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
) -> Plan:
    """Every option checked (a bad one raises naming it and its range) and every mode looked
    up (an unknown one raises listing the registered ones)."""
    rate, index, seed, max_density, min_density, step = check_update_args(
        prune_rate, update_index, seed, max_density, min_density, step
    )
    prune_mode = PRUNE.info(prune)
    growth_mode = GROWTH.info(growth)
    importance = None if redistribution == "none" else IMPORTANCE.info(redistribution)
    return Plan(
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
        ablation_fractions(layers, ablate_below),
    )


@dataclass(frozen=True)
class Found:
    """The layers as the update found them: sizes, active counts, hash keys, dead units."""

    sizes: list[int]
    nnz: list[int]
    keys: list[HashKey]
    dead: list[np.ndarray]


def find(
    be: ArrayBackend, layers: Sequence[Layer], plan: Plan, nnz: list[int] | None = None
) -> Found:
    """The layers as the update found them (``nnz``: the active counts, when a fused scan has
    already counted them)."""
    return Found(
        sizes=[math.prod(be.shape(layer.mask)) for layer in layers],
        nnz=[be.count(layer.mask) for layer in layers] if nnz is None else nnz,
        keys=plan.keys(len(layers)),
        dead=dead_units_of(be, layers),  # as the update found the layers
    )


# -- the update, step by step on the backend's operations ---------------------------------------


def importance(be: ArrayBackend, layers: Sequence[Layer], plan: Plan, found: Found) -> list[float]:
    """Step 1: each layer's importance score, read before pruning (0 without redistribution)."""
    if plan.importance is None:
        return [0.0] * len(layers)
    fn = plan.importance.fn
    scores = [float(fn(be, layer, n)) for layer, n in zip(layers, found.nnz)]
    check_scores(layers, scores, plan.redistribution)
    return scores


@dataclass
class Pruned:
    """What pruning (and ablation) left: per layer, the kept mask, how many weights went, the
    positions growth may not take (``blocked``) and the ablated units' positions (``cut``)."""

    kept_masks: list[Any]
    counts: list[int]
    blocked: list[Any]
    cut: list[Any | None]
    ablated: list[np.ndarray]
    room: list[int] | None = None  # free positions outside ablated units (ablate_below)


def prune(be: ArrayBackend, layers: Sequence[Layer], plan: Plan, found: Found) -> Pruned:
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
    return Pruned(
        kept_masks=kept_masks,
        counts=counts,
        blocked=list(kept_masks),  # growth may only take positions inactive here
        cut=[None] * len(layers),
        ablated=[np.zeros(d.size, dtype=bool) for d in found.dead],
    )


def ablate(
    be: ArrayBackend, layers: Sequence[Layer], plan: Plan, found: Found, pruned: Pruned
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
class Budgets:
    """Step 3's result per layer: capacity, regrowth budget g_l and the reported share."""

    caps: np.ndarray
    grow: np.ndarray
    shares: np.ndarray


def redistribute(
    layers: Sequence[Layer], plan: Plan, found: Found, pruned: Pruned, scores: list[float]
) -> Budgets:
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
    return Budgets(caps, budgets, shares)


@dataclass(frozen=True)
class Grown:
    """Step 4's result per layer: the new mask and the revived positions (None: none)."""

    masks: list[Any]
    revived: list[Any | None]


def regrow(
    be: ArrayBackend,
    layers: Sequence[Layer],
    plan: Plan,
    found: Found,
    pruned: Pruned,
    budgets: Budgets,
) -> Grown:
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
    return Grown(masks, revived)


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


def apply(
    be: ArrayBackend,
    layers: Sequence[Layer],
    found: Found,
    pruned: Pruned,
    budgets: Budgets,
    grown: Grown,
    scores: list[float],
) -> tuple[list[LayerReport], list[Any] | None]:
    """Step 5: each layer's report, and the new weights when dead units were revived (grown at
    +-scale; None otherwise: the caller applies the masks, :func:`~sparsecore.apply_masks`)."""
    reports = []
    for i, (layer, new_mask) in enumerate(zip(layers, grown.masks)):
        # nnz_after - nnz_before == net_grown - net_pruned, so one count gives both.
        net_grown = be.count(be.and_not(new_mask, layer.mask))
        nnz_after = found.nnz[i] - pruned.counts[i] + int(budgets.grow[i])
        revived = grown.revived[i]
        reports.append(
            layer_report(
                layer,
                i,
                found,
                pruned.counts,
                budgets,
                scores,
                net_pruned=net_grown - (nnz_after - found.nnz[i]),
                net_grown=net_grown,
                revived=0 if revived is None else be.count(revived),
                ablated=int(pruned.ablated[i].sum()),
            )
        )
    if all(r is None for r in grown.revived):
        return reports, None
    weights = []
    for layer, mask, fresh, key in zip(layers, grown.masks, grown.revived, found.keys):
        w = be.apply(layer.weight, layer.mask, mask)
        if fresh is not None:
            w = be.signed_fill(w, fresh, revival_scale(be.shape(w), layer.axis), key)
        weights.append(w)
    return reports, weights


def layer_report(
    layer: Layer,
    i: int,
    found: Found,
    pruned_counts: Sequence[int],
    budgets: Budgets,
    scores: Sequence[float],
    *,
    net_pruned: int,
    net_grown: int,
    revived: int = 0,
    ablated: int = 0,
) -> LayerReport:
    """What the update did to layer ``i``, from the steps' results."""
    g = int(budgets.grow[i])
    return LayerReport(
        name=layer.name,
        size=found.sizes[i],
        nnz_before=found.nnz[i],
        nnz_after=found.nnz[i] - pruned_counts[i] + g,
        pruned=pruned_counts[i],
        grown=g,
        net_pruned=net_pruned,
        net_grown=net_grown,
        importance=scores[i],
        share=float(budgets.shares[i]),
        capacity=int(budgets.caps[i]),
        units=int(found.dead[i].size),
        dead_units=int(found.dead[i].sum()),
        revived=revived,
        ablated=ablated,
    )


# -- shared by the fused path ------------------------------------------------------------------


def scanned_importance(plan: Plan, scan: LayerScan, size: int) -> float:
    """Step 1 from a scan: the built-in rules' scores (:mod:`sparsecore.modes`)."""
    if plan.importance is None:
        return 0.0
    if plan.importance.rule == "nonzero":
        return float(scan.nnz)
    # the mean |x| over the active positions, or over all of an empty layer
    return float(scan.active_abs_sum / scan.nnz if scan.nnz else scan.total_abs_sum / size)


def counted_prune(plan: Plan, found: Found) -> Pruned:
    """Step 2 as a count only, for a fused update that chooses the weights itself: the built-in
    magnitude rule's count per layer (:func:`~sparsecore.modes.magnitude_prune_count`)."""
    counts = [
        magnitude_prune_count(plan.prune_rate, n, max(0, n - floor_l))
        for n, floor_l in zip(found.nnz, plan.floors(found.sizes))
    ]
    return Pruned(
        kept_masks=[],
        counts=counts,
        blocked=[],
        cut=[None] * len(found.nnz),
        ablated=[np.zeros(d.size, dtype=bool) for d in found.dead],
    )


def check_scores(layers: Sequence[Layer], scores: list[float], redistribution: str) -> None:
    for layer, s in zip(layers, scores):
        if not (math.isfinite(s) and s >= 0):
            raise SparseCoreError(
                f"layer {layer.name!r}: importance mode {redistribution!r} returned {s!r}; "
                f"it must be finite and >= 0"
            )
