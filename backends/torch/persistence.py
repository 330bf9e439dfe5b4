"""Saving and restoring a :class:`~.adapter.SparseTraining`: its ``state_dict`` and the checks
made in full before a restore changes anything.

The state holds the masks, the library's own momentum, the step and epoch counts and the
engine's state (:mod:`sparsecore.saved_state` checks that part). A model sharded with
``fully_shard`` saves DTensors placed like their parameters (for
``torch.distributed.checkpoint``) and its history as one JSON string; :func:`localise` turns
such a state back into this rank's rows before the same checks run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sparsecore.errors import SparseCoreError
from sparsecore.init import layer_counts
from sparsecore.saved_state import EngineState, StateFields, expected_counts, read_engine_state

from . import fsdp

if TYPE_CHECKING:
    from .adapter import SparseTraining

__all__ = ["STATE_FIELDS", "STATE_FORMAT", "describe", "localise", "read_state", "state_of"]

STATE_FORMAT = "sparsecore.torch/1"
#: The fields of :meth:`SparseTraining.state_dict`, all required, no other allowed.
STATE_FIELDS = (
    "format",
    "names",
    "masks",
    "own_momentum",
    "steps",
    "epochs",
    "steps_per_epoch",
    "engine",
)


def state_of(handle: SparseTraining) -> dict[str, Any]:
    """``SparseTraining.state_dict()``: masks, engine state, step/epoch counts and own momentum."""
    engine = handle.engine.state_dict()
    if handle._sharded:
        return _sharded_state(handle, engine)
    if engine["ever_active"] is not None:
        engine["ever_active"] = [e.cpu() for e in engine["ever_active"]]
    return {
        "format": STATE_FORMAT,
        "names": list(handle.names),
        "masks": [m.cpu().clone() for m in handle.masks],
        "own_momentum": [None if o is None else o.cpu().clone() for o in handle._own],
        "steps": handle.steps,
        "epochs": handle.epochs,
        "steps_per_epoch": handle._steps_per_epoch,
        "engine": engine,
    }


def _sharded_state(handle: SparseTraining, engine: dict[str, Any]) -> dict[str, Any]:
    """``state_dict()`` of a ``fully_shard`` model, for ``torch.distributed.checkpoint``:
    masks, ever-active masks and own momentum as DTensors placed like their parameters
    (copies of this rank's rows), and the engine's history as one JSON string."""
    params = [t.param for t in handle.targets]

    def spread(parts: list[Any]) -> list[Any]:
        return [
            None if x is None else fsdp.as_dtensor(fsdp.local(x).clone(), p)
            for x, p in zip(parts, params)
        ]

    # before the first update the engine has no ever-active masks (None): the masks are
    # saved in their place, which restores to the same, so that the state's keys are the
    # same at every step (DCP loads into a fresh handle's state_dict as a template)
    ever = engine["ever_active"]
    engine["ever_active"] = spread(list(handle.masks) if ever is None else [e.local for e in ever])
    engine["history"] = fsdp.history_to_text(engine["history"])
    return {
        "format": STATE_FORMAT,
        "names": list(handle.names),
        "masks": spread(list(handle.masks)),
        "own_momentum": spread(list(handle._own)),
        "steps": handle.steps,
        "epochs": handle.epochs,
        "steps_per_epoch": handle._steps_per_epoch,
        "engine": engine,
    }


def localise(handle: SparseTraining, state: Any) -> Any:
    """A sharded model: the state with this rank's rows of its DTensors or whole tensors
    (masks and own momentum as local tensors, ever-active masks as shards) and the
    history read from JSON; the whole-layer checks then run on the ranks together."""
    if not (handle._sharded and isinstance(state, dict) and isinstance(state.get("engine"), dict)):
        return state
    params = [t.param for t in handle.targets]

    def parts(values: Any) -> Any:
        if not isinstance(values, list) or len(values) != len(params):
            return values
        return [fsdp.to_local_part(v, p) for v, p in zip(values, params)]

    engine = dict(state["engine"], history=fsdp.history_from_text(state["engine"].get("history")))
    ever = parts(engine.get("ever_active"))
    if isinstance(ever, list):
        ever = [
            fsdp.as_shard(e, p) if isinstance(e, torch.Tensor) and not fsdp.is_dtensor(e) else e
            for e, p in zip(ever, params)
        ]
    engine["ever_active"] = ever
    return dict(
        state,
        masks=parts(state.get("masks")),
        own_momentum=parts(state.get("own_momentum")),
        engine=engine,
    )


def read_state(handle: SparseTraining, state: Any) -> EngineState:
    """Check a saved state against this handle (changes nothing); its engine part, parsed."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise SparseCoreError(
            f"not a sparsecore.torch state (field 'format' is {found!r}, expected {STATE_FORMAT!r})"
        )
    f = StateFields("sparsecore.torch state", "")
    f.keys(state, "", STATE_FIELDS)
    names = f.sequence(state["names"], "names")
    if names != handle.names:
        raise f.error("names", f"is {names!r}, this model's sparse parameters are {handle.names}")
    n = len(handle.names)
    masks = f.sequence(state["masks"], "masks", n)
    own = f.sequence(state["own_momentum"], "own_momentum", n)
    for i, (t, m, o, cur_own) in enumerate(zip(handle.targets, masks, own, handle._own)):
        shape = tuple(t.param.shape)
        # a sharded model's state holds this rank's rows here (_localise)
        held = tuple(handle._local(t.param).shape)
        if (
            not isinstance(m, torch.Tensor)
            or fsdp.is_dtensor(m)
            or m.dtype != torch.bool
            or m.shape != held
        ):
            raise f.error(f"masks[{i}]", f"must be a torch.bool tensor of shape {shape} "
                          f"(layer {t.name!r}), got {describe(m)}")  # fmt: skip
        if cur_own is None and o is not None:
            raise f.error(
                f"own_momentum[{i}]",
                f"is a tensor, but layer {t.name!r} takes its momentum from the optimizer "
                f"here (was the optimizer changed?)",
            )
        if cur_own is not None and (
            not isinstance(o, torch.Tensor)
            or fsdp.is_dtensor(o)
            or not o.is_floating_point()
            or o.shape != held
        ):
            raise f.error(
                f"own_momentum[{i}]",
                f"must be a floating-point tensor of shape {shape} (layer {t.name!r} keeps "
                f"its own momentum here), got {describe(o)}",
            )
    steps = f.integer(state["steps"], "steps")
    epochs = f.integer(state["epochs"], "epochs")
    per_epoch = f.integer(state["steps_per_epoch"], "steps_per_epoch", 1, nullable=True)
    if per_epoch is not None and (epochs == 0 or per_epoch > steps):
        raise f.error(
            "steps_per_epoch",
            f"is {per_epoch}, but the state has taken {steps} steps in {epochs} epochs",
        )
    engine = handle.engine
    checked = read_engine_state(
        state["engine"],
        names=engine.names,
        shapes=engine.shapes,
        axes=engine.axes,
        config=engine.config,
        target=engine.target,
        owner="sparsecore.torch state",
        prefix="engine.",
    )
    last_step = max((r.step for r in checked.history if r.step is not None), default=0)
    if last_step > steps:
        raise f.error("steps", f"is {steps}, before the last update's step {last_step}")
    cfg = checked.config
    initial = layer_counts(
        engine.shapes,
        cfg.density,
        cfg.init,
        axes=engine.axes,
        max_density=cfg.max_density,
        min_density=cfg.min_density,
    )
    want, source = expected_counts(checked.history, initial)
    counts = [int(m.sum()) for m in masks]
    outside = [
        int(
            bool(
                (
                    m & ~handle._local(e if isinstance(e, torch.Tensor) else e.local).to(m.device)
                ).any()
            )
        )
        for m, e in zip(masks, checked.ever_active or [])
    ]
    if handle._sharded:  # whole layers: every rank checks the same sums
        both = fsdp.global_sums(counts + outside, handle.masks[0].device)
        counts, outside = both[: len(counts)], both[len(counts) :]
    if counts != want:
        raise f.error("masks", f"hold {counts} active weights, {source} gives {want}")
    for i, bad in enumerate(outside):
        if bad:
            raise f.error(f"engine.ever_active[{i}]", f"leaves out active positions of masks[{i}]")
    return checked


def describe(x: Any) -> str:
    """A value as an error message names it (a tensor by dtype and shape)."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return repr(x) if x is None or isinstance(x, (str, int, float)) else type(x).__name__
