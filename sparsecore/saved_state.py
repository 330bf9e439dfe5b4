"""Checks of a saved engine state, made in full before anything is restored.

A restore is all or nothing: :meth:`SparseEngine.load_state_dict`, the PyTorch handle's and the
Keras callback's restores first read the whole state through :func:`read_engine_state` (and their
own fields), which changes nothing and raises :class:`~sparsecore.SparseCoreError` naming the
first bad field (``engine state field 'history[2].layers[0].pruned' must be an integer >= 0, got
'abc'``); only then do they assign. Besides types and ranges it checks what a state written by the
engine always satisfies: the update counter equals the updates in the history, every report names
the engine's layers and keeps the target count, the target is the one the saved config gives,
``ever_active`` has one boolean array per layer, of its shape, holding what the last report counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from .config import ADDED_OPTIONS, SparseConfig, option_names
from .errors import SparseCoreError
from .init import layer_counts
from .records.updates import LayerReport, UpdateReport
from .validation import check_flag, check_integer, check_real, is_integer

__all__ = [
    "ENGINE_FIELDS",
    "EngineState",
    "StateFields",
    "check_mask_array",
    "expected_counts",
    "read_engine_state",
]

#: The fields of :meth:`SparseEngine.state_dict`, all required, no other allowed.
ENGINE_FIELDS = ("config", "names", "shapes", "axes", "target", "updates", "history", "ever_active")

#: Layer-report fields added since states were first saved (dead units, ablated units):
#: optional, 0 if absent.
_ADDED_LAYER_FIELDS = ("units", "dead_units", "revived", "ablated")
#: A run record's own layer field (an engine keeps its ever-active counts in ``extra``).
_RECORD_LAYER_FIELDS = ("ever_active",)
_LAYER_FIELDS = tuple(
    f.name
    for f in fields(LayerReport)
    if f.name not in _ADDED_LAYER_FIELDS and f.name not in _RECORD_LAYER_FIELDS
)
_REPORT_FIELDS = ("update", "prune_rate", "layers", "step", "skipped", "reason", "extra")
_REPORT_TOTALS = ("pruned", "grown", "net_pruned", "net_grown")
_EXTRA_FIELDS = ("ever_active", "ever_active_fraction")


@dataclass(frozen=True)
class EngineState:
    """A checked engine state, ready to assign."""

    config: SparseConfig
    target: int
    updates: int
    history: list[UpdateReport]
    ever_active: list[Any] | None


class StateFields:
    """Builds the messages: ``<owner> field '<prefix><path>' ...``."""

    def __init__(self, owner: str, prefix: str) -> None:
        self.owner, self.prefix = owner, prefix

    def name(self, path: str) -> str:
        return f"{self.owner} field {self.prefix + path!r}"

    def error(self, path: str, problem: str) -> SparseCoreError:
        return SparseCoreError(f"{self.name(path)} {problem}")

    def keys(
        self, data: Any, path: str, required: Sequence[str], optional: Sequence[str] = ()
    ) -> None:
        """``data`` must be a dict holding every ``required`` key, and no key outside both."""
        where = path or "(the state itself)"
        if not isinstance(data, dict):
            raise self.error(where, f"must be a dict, got {type(data).__name__}")
        for key in required:
            if key not in data:
                raise self.error(_join(path, key), "is missing")
        unknown = [k for k in data if k not in required and k not in optional]
        if unknown:
            raise self.error(_join(path, str(unknown[0])), "is not a field of this state")

    def integer(self, data: Any, path: str, minimum: int = 0, nullable: bool = False) -> Any:
        if nullable and data is None:
            return None
        return check_integer(self.name(path), data, minimum=minimum)

    def real(self, data: Any, path: str, low: float, high: float | None) -> float:
        return check_real(self.name(path), data, low=low, high=high)

    def text(self, data: Any, path: str) -> str:
        if not isinstance(data, str):
            raise self.error(path, f"must be a string, got {data!r}")
        return data

    def sequence(self, data: Any, path: str, length: int | None = None) -> list[Any]:
        if not isinstance(data, (list, tuple)):
            raise self.error(path, f"must be a list, got {type(data).__name__}")
        if length is not None and len(data) != length:
            raise self.error(path, f"holds {len(data)} entries, this run has {length} layers")
        return list(data)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def read_engine_state(
    state: Any,
    *,
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    axes: Sequence[int],
    config: SparseConfig | None,
    target: int | None,
    owner: str = "engine state",
    prefix: str = "",
) -> EngineState:
    """Check ``state`` (:meth:`SparseEngine.state_dict` output) for an engine with these layers,
    config and target; return it parsed. Changes nothing; raises naming the first bad field.

    ``owner`` and ``prefix`` only shape the messages (``sparsecore.torch state field
    'engine.updates' ...``). The state's config is adopted by the restore, except its density,
    which must be this engine's: a state saved at another density keeps another target.
    ``config=None, target=None``: an engine that will be built from the saved config (Keras'
    resume); the saved target must then be the one its config gives.
    """
    f = StateFields(owner, prefix)
    f.keys(state, "", ENGINE_FIELDS)
    # A missing option must not default, except those added since states were first saved,
    # which read as the value that reproduces the saved run (SparseConfig.from_dict).
    added = list(ADDED_OPTIONS)
    required = [name for name in option_names() if name != "recipe" and name not in added]
    f.keys(state["config"], "config", required, optional=added)
    try:
        saved_config = SparseConfig.from_dict(state["config"])
    except SparseCoreError as err:
        raise f.error("config", f"is not a valid config: {err}") from None
    if config is not None and saved_config.density != config.density:
        raise f.error(
            "config",
            f"holds density {saved_config.density!r}, this run {config.density!r}: a state "
            f"saved at another density keeps another number of weights",
        )
    saved_names = f.sequence(state["names"], "names")
    if saved_names != list(names):
        raise f.error("names", f"is {saved_names!r}, this run's layers are {list(names)!r}")
    saved_shapes = f.sequence(state["shapes"], "shapes", len(names))
    for i, (saved, shape) in enumerate(zip(saved_shapes, shapes)):
        if not isinstance(saved, (list, tuple)) or [
            int(d) if is_integer(d) else d for d in saved
        ] != list(shape):
            raise f.error(f"shapes[{i}]", f"is {saved!r}, layer {names[i]!r} has shape {shape}")
    saved_axes = f.sequence(state["axes"], "axes", len(names))
    for i, (saved, axis) in enumerate(zip(saved_axes, axes)):
        if not is_integer(saved) or int(saved) != axis:
            raise f.error(f"axes[{i}]", f"is {saved!r}, layer {names[i]!r} has output axis {axis}")
    saved_target = f.integer(state["target"], "target", minimum=1)
    sizes = [math.prod(s) for s in shapes]
    implied = sum(
        layer_counts(
            shapes,
            saved_config.density,
            saved_config.init,
            axes=axes,
            max_density=saved_config.max_density,
            min_density=saved_config.min_density,
        )
    )
    if saved_target != implied or (target is not None and saved_target != target):
        raise f.error(
            "target",
            f"is {saved_target}, but density {saved_config.density!r} of these layers keeps "
            f"{implied} weights" + ("" if target is None else f" and this run {target}"),
        )
    updates = f.integer(state["updates"], "updates")
    history = _read_history(f, state["history"], names, sizes, saved_target, updates)
    ever_active = _read_ever_active(f, state["ever_active"], names, shapes, updates, history)
    return EngineState(saved_config, saved_target, updates, history, ever_active)


def _read_history(
    f: StateFields,
    data: Any,
    names: Sequence[str],
    sizes: Sequence[int],
    target: int,
    updates: int,
) -> list[UpdateReport]:
    entries = f.sequence(data, "history")
    reports: list[UpdateReport] = []
    made = 0
    last_step = -1
    for i, entry in enumerate(entries):
        report = _read_report(f, entry, f"history[{i}]", names, sizes, target)
        path = f"history[{i}]"
        expected = made if report.skipped else made + 1
        if report.update != expected:
            raise f.error(
                f"{path}.update",
                f"is {report.update}, but {made} updates come before it in the history",
            )
        if report.step is not None:
            if report.step < last_step:
                raise f.error(f"{path}.step", f"{report.step} comes after step {last_step}")
            last_step = report.step
        made = expected
        reports.append(report)
    if made != updates:
        raise f.error("history", f"records {made} mask updates but field 'updates' says {updates}")
    return reports


def _read_report(
    f: StateFields, data: Any, path: str, names: Sequence[str], sizes: Sequence[int], target: int
) -> UpdateReport:
    f.keys(data, path, (*_REPORT_FIELDS, "total_nnz", "density", *_REPORT_TOTALS))
    skipped = check_flag(f.name(f"{path}.skipped"), data["skipped"])
    update = f.integer(data["update"], f"{path}.update")
    rate = f.real(data["prune_rate"], f"{path}.prune_rate", 0.0, 1.0)
    step = f.integer(data["step"], f"{path}.step", nullable=True)
    reason = f.text(data["reason"], f"{path}.reason")
    entries = f.sequence(data["layers"], f"{path}.layers", 0 if skipped else len(names))
    layers = tuple(
        _read_layer(f, entry, f"{path}.layers[{j}]", names[j], sizes[j])
        for j, entry in enumerate(entries)
    )
    extra = _read_extra(f, data["extra"], f"{path}.extra", sizes, skipped)
    report = UpdateReport(update, rate, layers, step, skipped, reason, extra)
    if not skipped and report.total_nnz != target:
        raise f.error(
            f"{path}.layers",
            f"hold {report.total_nnz} active weights (nnz_after), the run keeps {target}",
        )
    derived: dict[str, Any] = {"total_nnz": report.total_nnz, "density": report.density}
    derived.update(report.totals())
    for key, value in derived.items():  # what to_dict adds must agree with the fields
        if type(data[key]) is bool or data[key] != value:
            raise f.error(f"{path}.{key}", f"is {data[key]!r}, the layers give {value!r}")
    return report


def _read_layer(f: StateFields, data: Any, path: str, name: str, size: int) -> LayerReport:
    f.keys(data, path, (*_LAYER_FIELDS, "density"), optional=_ADDED_LAYER_FIELDS)
    if data["name"] != name:
        raise f.error(f"{path}.name", f"is {data['name']!r}, this run's layer is {name!r}")
    values: dict[str, Any] = {"name": name}
    values["size"] = f.integer(data["size"], f"{path}.size", minimum=1)
    if values["size"] != size:
        raise f.error(f"{path}.size", f"is {values['size']}, layer {name!r} has {size} weights")
    for key in ("nnz_before", "nnz_after", "pruned", "grown", "net_pruned", "net_grown"):
        values[key] = f.integer(data[key], f"{path}.{key}")
        if values[key] > size:
            raise f.error(f"{path}.{key}", f"is {values[key]}, more than the {size} weights")
    values["capacity"] = f.integer(data["capacity"], f"{path}.capacity")
    values["importance"] = f.real(data["importance"], f"{path}.importance", 0.0, None)
    values["share"] = f.real(data["share"], f"{path}.share", 0.0, 1.0)
    for key in _ADDED_LAYER_FIELDS:
        values[key] = f.integer(data.get(key, 0), f"{path}.{key}")
    if values["dead_units"] > values["units"]:
        raise f.error(f"{path}.dead_units", f"is {values['dead_units']}, more than its units")
    if values["revived"] > values["grown"]:
        raise f.error(f"{path}.revived", f"is {values['revived']}, more than the weights grown")
    if values["ablated"] > values["units"]:
        raise f.error(f"{path}.ablated", f"is {values['ablated']}, more than its units")
    layer = LayerReport(**values)
    if type(data["density"]) is bool or data["density"] != layer.density:
        raise f.error(
            f"{path}.density", f"is {data['density']!r}, nnz_after / size gives {layer.density!r}"
        )
    return layer


def _read_extra(
    f: StateFields, data: Any, path: str, sizes: Sequence[int], skipped: bool
) -> dict[str, Any]:
    f.keys(data, path, () if skipped else _EXTRA_FIELDS)
    extra: dict[str, Any] = {}
    if not skipped:
        counts = f.sequence(data["ever_active"], f"{path}.ever_active", len(sizes))
        extra["ever_active"] = [
            f.integer(c, f"{path}.ever_active[{j}]") for j, c in enumerate(counts)
        ]
        for j, (count, size) in enumerate(zip(extra["ever_active"], sizes)):
            if count > size:
                raise f.error(f"{path}.ever_active[{j}]", f"is {count}, more than {size} weights")
        extra["ever_active_fraction"] = f.real(
            data["ever_active_fraction"], f"{path}.ever_active_fraction", 0.0, 1.0
        )
        fraction = sum(extra["ever_active"]) / sum(sizes)
        if extra["ever_active_fraction"] != fraction:
            raise f.error(
                f"{path}.ever_active_fraction",
                f"is {extra['ever_active_fraction']!r}, the counts in ever_active give {fraction!r}",
            )
    return extra


def _read_ever_active(
    f: StateFields,
    data: Any,
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    updates: int,
    history: list[UpdateReport],
) -> list[Any] | None:
    if data is None:
        if updates:
            raise f.error("ever_active", f"is None, but the state has made {updates} mask updates")
        return None
    arrays = f.sequence(data, "ever_active", len(names))
    counts = []
    for i, (array, shape) in enumerate(zip(arrays, shapes)):
        counts.append(check_mask_array(f, array, f"ever_active[{i}]", shape))
    done = [r for r in history if not r.skipped]
    saved = done[-1].extra.get("ever_active") if done else None
    if saved is not None and list(saved) != counts:
        raise f.error(
            "ever_active",
            f"holds {counts} active positions, the last update counted {list(saved)}",
        )
    return arrays


def check_mask_array(f: StateFields, array: Any, path: str, shape: tuple[int, ...]) -> int:
    """A boolean array of any backend with ``shape``; returns its count of True."""
    from .backend import backend_for

    try:
        be = backend_for(array)
    except SparseCoreError:
        raise f.error(path, f"must be a boolean array, got {type(array).__name__}") from None
    if be.dtype_kind(array) != "b":
        raise f.error(path, f"must be a boolean array, got dtype {array.dtype}")
    if be.shape(array) != tuple(shape):
        raise f.error(path, f"has shape {be.shape(array)}, the layer {tuple(shape)}")
    return be.count(array)


def expected_counts(history: list[UpdateReport], initial: Sequence[int]) -> tuple[list[int], str]:
    """Per layer, the active count the masks must hold with this history, and where it comes
    from (masks change only in updates: the last one's ``nnz_after``, else the initial counts)."""
    done = [i for i, r in enumerate(history) if not r.skipped]
    if not done:
        return list(initial), "the initial masks' counts"
    last = done[-1]
    return [layer.nnz_after for layer in history[last].layers], f"history[{last}] (nnz_after)"
