"""One sparse-momentum mask update, and the state of a training run around it.

:func:`update` is a pure function: it reads layers (weights, masks, momentum, gradients) and returns
new masks plus a report, changing nothing it was given. It reads top to bottom: the options and
the layers' structure are checked once, then the named steps of :mod:`sparsecore.steps` run in
order (importance -> prune -> redistribute -> regrow -> apply), or, when the backend's fused
update serves the chosen modes (:mod:`sparsecore.fusion`), the same steps with their array work
in two passes of the backend. :class:`SparseEngine` adds the little state a training run needs
(the target count N, the update counter, the history) and the schedule.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import steps
from .backend import ArrayBackend, backend_for, get_backend
from .checks import check_finite, check_layers, check_structure
from .config import SparseConfig
from .errors import DeadUnitsWarning, NonFiniteError, SparseCoreError
from .fusion import Fusion, choose
from .init import layer_counts
from .layers import Layer
from .records.updates import LayerReport, UpdateReport
from .saved_state import EngineState, read_engine_state
from .validation import check_shape

__all__ = [
    "SparseEngine",
    "UpdateResult",
    "apply_masks",
    "check_layers",
    "new_weights",
    "update",
]


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
    plan = steps.make_plan(
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
    check_structure(be, layers, momentum=plan.reads("momentum"), grad=plan.reads("grad"))
    fusion = (
        None if any(plan.ablate_below) else choose(be, plan.prune, plan.growth, plan.importance)
    )
    if fusion is not None:
        result = _fused_update(be, layers, plan, fusion)
        if result is not None:
            return result
    _check_finite(be, layers, plan)
    return _stepwise_update(be, layers, plan)


def _stepwise_update(be: ArrayBackend, layers: Sequence[Layer], plan: steps.Plan) -> UpdateResult:
    """The update written once against the backend interface, for any modes."""
    found = steps.find(be, layers, plan)
    scores = steps.importance(be, layers, plan, found)  # 1.
    pruned = steps.prune(be, layers, plan, found)  # 2.
    if any(plan.ablate_below):
        steps.ablate(be, layers, plan, found, pruned)
    budgets = steps.redistribute(layers, plan, found, pruned, scores)  # 3.
    grown = steps.regrow(be, layers, plan, found, pruned, budgets)  # 4.
    reports, weights = steps.apply(be, layers, found, pruned, budgets, grown, scores)  # 5.
    revived = None if weights is None else grown.revived
    return _finish(plan, found.nnz, grown.masks, reports, weights, revived)


def _fused_update(
    be: ArrayBackend, layers: Sequence[Layer], plan: steps.Plan, fusion: Fusion
) -> UpdateResult | None:
    """The same steps with their array work in the backend's two fused passes
    (:mod:`sparsecore.fusion`): the scan gives step 1's scores and step 2's counts, step 3 is
    the shared host routine, one pass prunes and regrows, and the report is the same.

    NaN/Inf are found by the passes' reads; when they find one, :func:`_check_finite` names the
    array as the step-by-step path would have. Returns None to go step by step (layers the
    backend's passes do not take, or dead units to revive).
    """
    scans = fusion.update.scan(layers, source=fusion.source)
    if scans is None:
        return None
    if not all(scan.finite for scan in scans):
        _check_finite(be, layers, plan)
        return None  # pragma: no cover - a float64 sum overflowed: the step-by-step path decides
    found = steps.find(be, layers, plan, nnz=[scan.nnz for scan in scans])
    try:
        scores = [steps.scanned_importance(plan, s, size) for s, size in zip(scans, found.sizes)]
        steps.check_scores(layers, scores, plan.redistribution)  # 1.
        pruned = steps.counted_prune(plan, found)  # 2. (counts; the pass chooses)
        budgets = steps.redistribute(layers, plan, found, pruned, scores)  # 3.
    except SparseCoreError:
        _check_finite(be, layers, plan)  # a NaN weight the scan did not read is reported first
        raise
    if plan.revive and any(d.any() and g > 0 for d, g in zip(found.dead, budgets.grow)):
        return None  # dead units to revive: the step-by-step path grows them
    grow = [int(g) for g in budgets.grow]
    fused = fusion.update.prune_regrow(layers, found.nnz, pruned.counts, grow, found.keys)  # 2., 4.
    if fused is None:
        _check_finite(be, layers, plan)  # raises, naming the NaN/Inf weight
        raise RuntimeError("the fused update reported a NaN/Inf weight the checks did not find")
    reports = [  # 5.
        steps.layer_report(
            layer,
            i,
            found,
            pruned.counts,
            budgets,
            scores,
            net_pruned=out.net_pruned,
            net_grown=out.net_grown,
        )
        for i, (layer, out) in enumerate(zip(layers, fused))
    ]
    masks, weights = [out.mask for out in fused], [out.weight for out in fused]
    return _finish(plan, found.nnz, masks, reports, weights)


def _check_finite(be: ArrayBackend, layers: Sequence[Layer], plan: steps.Plan) -> None:
    """NaN/Inf in the arrays this update reads: the first one raises naming layer and array."""
    check_finite(be, layers, momentum=plan.reads("momentum"), grad=plan.reads("grad"))


def _finish(
    plan: steps.Plan,
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

    def initial_scales(self, masks: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        """Factors for the freshly initialised weights under ``masks`` (``scale_init``; see
        :func:`sparsecore.init.init_scales`), or None when the option is off."""
        from .init import init_scales

        if not self.config.scale_init:
            return None
        return [init_scales(m, a) for m, a in zip(masks, self.axes)]

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
