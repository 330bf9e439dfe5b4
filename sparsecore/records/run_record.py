"""Run records: what a sparse training run did to its masks, update by update, as checked JSON.

The engine's :class:`~sparsecore.records.updates.UpdateReport` says what one mask update did.
A :class:`RunRecord` is a whole run's list of those same reports (one data model), each with its
epoch and every layer's ever-active count filled in; it adds per-run totals, and optionally the
run's per-epoch metrics (test accuracy, ...) and its FLOP/kernel-time accounting. It is plain data: it round-trips through
JSON with a version field, and loading checks every field so that a bad or truncated file fails
with a message naming the file and what is wrong, not with a ``KeyError`` deep in a plot.

The "ever active" fraction is the net in-time over-parameterization rate: the share of a layer's
positions that held an active weight at some point of training (initial mask included). A weight
pruned and regrown in the same update adds nothing to it, since its position never left the mask.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SparseCoreError
from .updates import COUNT_KEYS, LayerReport, UpdateReport

__all__ = [
    "ACCURACY_KEYS",
    "RECORD_FORMAT",
    "RECORD_VERSION",
    "TELEMETRY_NAME",
    "RunRecord",
    "TelemetryError",
    "flops_section",
    "load_run",
    "record_from_run",
]

#: Written as ``format`` in every record, so a stray JSON file is recognised as not one.
RECORD_FORMAT = "sparsecore-run"
#: Bumped when a field changes meaning; readers refuse newer versions.
RECORD_VERSION = 1
#: File name of the run record inside a run folder.
TELEMETRY_NAME = "telemetry.json"

# File names the training job writes into a run folder (kept here so the core needs no torch).
_SUMMARY_NAME = "summary.json"
_MASK_UPDATES_NAME = "mask_updates.json"


class TelemetryError(SparseCoreError):
    """A run record (or the files it is built from) is missing, malformed or inconsistent."""


@dataclass
class RunRecord:
    """A training run's mask updates, epoch metrics and speed accounting, JSON-ready.

    ``layers`` maps each sparse layer to its size, in the engine's order. ``epochs`` holds the
    per-epoch metrics the training job logged (dicts with at least ``epoch``; ``test_acc`` in %
    when known). ``flops`` is the FLOP/kernel-time accounting when the run measured it (see
    :func:`sparsecore.records.report_command.flops_rows` for the fields read). ``meta`` is free-form (model,
    method, config, machine).
    """

    layers: dict[str, int]
    updates: list[UpdateReport] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    flops: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_reports(
        cls,
        reports: Iterable[UpdateReport | Mapping[str, Any]],
        *,
        epochs: Sequence[Mapping[str, Any]] = (),
        flops: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        layers: Mapping[str, int] | None = None,
        source: str = "reports",
        acc_unit: str = "percent",
    ) -> RunRecord:
        """Build a record from an engine's or adapter's history (``sparse.history``).

        ``reports`` may be :class:`UpdateReport` objects or their ``to_dict()`` form (as in the
        training job's ``mask_updates.json``, where each also carries its ``epoch``). ``layers``
        (name -> size) is needed only when every report is a skipped one.

        ``epochs`` are dicts with at least ``epoch``; accuracies (``test_acc``, ``train_acc``)
        are read in ``acc_unit``: ``"percent"`` (the record's own unit, 0 to 100) or
        ``"fraction"`` (0 to 1, as Keras and most loops compute them; converted to percent).
        Percent accuracies that are all at most 1 look like fractions and draw a warning.
        """
        epochs = _epochs_in_percent(epochs, acc_unit, source)
        updates: list[UpdateReport] = []
        for i, item in enumerate(reports):
            where = f"{source}: mask update #{i + 1}"
            if isinstance(item, UpdateReport):
                updates.append(_from_report(item, None))
            elif isinstance(item, Mapping):
                updates.append(_update_from_report_dict(item, where))
            else:
                raise TelemetryError(
                    f"{where}: expected an UpdateReport or a dict, got {type(item).__name__}"
                )
        sizes = dict(layers) if layers is not None else {}
        for upd in updates:
            for layer in upd.layers:
                sizes.setdefault(layer.name, layer.size)
        record = cls(
            layers=sizes,
            updates=updates,
            epochs=epochs,
            flops=None if flops is None else dict(flops),
            meta=dict(meta or {}),
        )
        record.validate(source)
        return record

    # -- per-run figures -----------------------------------------------------------------------
    @property
    def applied(self) -> list[UpdateReport]:
        """The updates that changed masks (skipped ones left out)."""
        return [u for u in self.updates if not u.skipped]

    def series(self, layer: str, key: str) -> list[float | int | None]:
        """``key`` (a :class:`LayerReport` field or property) of ``layer`` over applied updates."""
        if layer not in self.layers:
            raise KeyError(f"no layer {layer!r} in this run; layers are {list(self.layers)}")
        return [getattr(u.layer(layer), key) for u in self.applied]

    def totals(self) -> dict[str, Any]:
        """Per-run totals: counts summed over updates and the final state of each layer."""
        applied = self.applied
        keys = COUNT_KEYS
        out: dict[str, Any] = {
            "updates": len(applied),
            "skipped_updates": len(self.updates) - len(applied),
            "size": sum(self.layers.values()),
        }
        for key in keys:
            out[key] = sum(u.total(key) for u in applied)
        last = applied[-1] if applied else None
        out["nnz"] = last.total_nnz if last else None
        out["density"] = last.density if last else None
        out["ever_active_fraction"] = last.ever_active_fraction if last else None
        per_layer: dict[str, dict[str, Any]] = {}
        for name, size in self.layers.items():
            rows = [u.layer(name) for u in applied]
            per_layer[name] = {
                "size": size,
                "nnz": rows[-1].nnz_after if rows else None,
                "density": rows[-1].density if rows else None,
                "ever_active_fraction": rows[-1].ever_active_fraction if rows else None,
                "units": (rows[-1].units or None) if rows else None,
                "dead_units": _if_units(rows[-1], rows[-1].dead_units) if rows else None,
                "revived": sum(r.revived for r in rows) if rows else None,
                "ablated_units": _if_units(rows[-1], rows[-1].ablated) if rows else None,
                **{key: sum(int(getattr(r, key)) for r in rows) for key in keys},
                "mean_share": (sum(r.share for r in rows) / len(rows)) if rows else None,
            }
        out["layers"] = per_layer
        accs = [e["test_acc"] for e in self.epochs if _is_number(e.get("test_acc"))]
        out["final_test_acc"] = accs[-1] if accs else None
        out["best_test_acc"] = max(accs) if accs else None
        return out

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "layers": [{"name": n, "size": s} for n, s in self.layers.items()],
            "updates": [_update_to_dict(u) for u in self.updates],
            "epochs": [dict(e) for e in self.epochs],
            "flops": self.flops,
            "meta": self.meta,
            "totals": self.totals(),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "run record") -> RunRecord:
        """Parse and check :meth:`to_dict` output; errors name ``source`` and the bad field."""
        if not isinstance(data, Mapping):
            raise TelemetryError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != RECORD_FORMAT:
            raise TelemetryError(
                f"{source}: not a sparsecore run record (field 'format' is "
                f"{data.get('format')!r}, expected {RECORD_FORMAT!r})"
            )
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise TelemetryError(f"{source}: field 'version' must be an integer, got {version!r}")
        if version > RECORD_VERSION or version < 1:
            raise TelemetryError(
                f"{source}: run record version {version} is not readable by this sparsecore "
                f"(it reads versions 1 to {RECORD_VERSION}); upgrade sparsecore"
            )
        for key in ("layers", "updates"):
            if key not in data:
                raise TelemetryError(f"{source}: missing field {key!r} (truncated file?)")
        layers: dict[str, int] = {}
        for i, entry in enumerate(_list(data["layers"], f"{source}: 'layers'")):
            where = f"{source}: layers[{i}]"
            name = _str(_get(entry, "name", where), f"{where}.name")
            layers[name] = _int(_get(entry, "size", where), f"{where}.size", minimum=1)
        updates = [
            _update_from_dict(u, f"{source}: updates[{i}]")
            for i, u in enumerate(_list(data["updates"], f"{source}: 'updates'"))
        ]
        epochs = _list(data.get("epochs", []), f"{source}: 'epochs'")
        for i, e in enumerate(epochs):
            if not isinstance(e, Mapping):
                raise TelemetryError(f"{source}: epochs[{i}] must be an object, got {e!r}")
        flops = data.get("flops")
        if flops is not None and not isinstance(flops, Mapping):
            raise TelemetryError(f"{source}: 'flops' must be an object or null, got {flops!r}")
        meta = data.get("meta", {})
        if not isinstance(meta, Mapping):
            raise TelemetryError(f"{source}: 'meta' must be an object, got {meta!r}")
        record = cls(
            layers=layers,
            updates=updates,
            epochs=[dict(e) for e in epochs],
            flops=None if flops is None else dict(flops),
            meta=dict(meta),
        )
        record.validate(source)
        return record

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the record as JSON (atomically: a crash leaves the old file or none)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(_json_safe(self.to_dict()), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunRecord:
        """Read a record written by :meth:`save`."""
        path = Path(path)
        return cls.from_dict(_read_json(path), str(path))

    # -- checks --------------------------------------------------------------------------------
    def validate(self, source: str = "run record") -> None:
        """Check internal consistency; raise :class:`TelemetryError` naming the first problem.

        Every applied update must list the run's layers in order, with counts that fit the layer
        (0 <= nnz <= size, pruned <= nnz before, ever-active between nnz and size), and all
        applied updates must keep the same total active count (the engine's invariant N).
        """
        names = list(self.layers)
        total: int | None = None
        for upd in self.updates:
            where = f"{source}: update {upd.update}"
            if upd.skipped:
                if upd.layers:
                    raise TelemetryError(f"{where}: a skipped update must not list layers")
                continue
            got = [layer.name for layer in upd.layers]
            if got != names:
                raise TelemetryError(f"{where}: layers {got} differ from the run's layers {names}")
            for layer in upd.layers:
                _check_layer(layer, self.layers[layer.name], f"{where}, layer {layer.name!r}")
            if total is None:
                total = upd.total_nnz
            elif upd.total_nnz != total:
                raise TelemetryError(
                    f"{where}: {upd.total_nnz} active weights, but earlier updates kept {total}; "
                    f"sparse momentum keeps the total fixed, so the file is inconsistent"
                )
        for i, epoch in enumerate(self.epochs):
            if "epoch" not in epoch:
                raise TelemetryError(f"{source}: epochs[{i}] has no 'epoch' field")
            acc = epoch.get("test_acc")
            if acc is not None and not (_is_number(acc) and 0.0 <= float(acc) <= 100.0):
                raise TelemetryError(
                    f"{source}: epochs[{i}].test_acc must be a percentage in [0, 100], got {acc!r}"
                )


#: Keys of an epoch's metrics that hold an accuracy (converted by ``acc_unit``).
ACCURACY_KEYS = ("test_acc", "train_acc")


def _epochs_in_percent(
    epochs: Sequence[Mapping[str, Any]], acc_unit: str, source: str
) -> list[dict[str, Any]]:
    if acc_unit not in ("percent", "fraction"):
        raise TelemetryError(
            f"{source}: acc_unit must be 'percent' or 'fraction', got {acc_unit!r}"
        )
    out = [dict(e) for e in epochs]
    if acc_unit == "fraction":
        for i, epoch in enumerate(out):
            for key in ACCURACY_KEYS:
                value = epoch.get(key)
                if value is None:
                    continue
                if not (_is_number(value) and 0.0 <= float(value) <= 1.0):
                    raise TelemetryError(
                        f"{source}: epochs[{i}].{key} must be a fraction in [0, 1] with "
                        f"acc_unit='fraction', got {value!r}"
                    )
                epoch[key] = 100.0 * float(value)
        return out
    accs = [e["test_acc"] for e in out if _is_number(e.get("test_acc"))]
    if accs and max(float(a) for a in accs) <= 1.0:
        warnings.warn(
            f"{source}: every test_acc is at most 1 ({', '.join(f'{a:g}' for a in accs[:3])}"
            f"{', ...' if len(accs) > 3 else ''}); the record keeps accuracies in percent: if "
            f"these are fractions, pass acc_unit='fraction'",
            UserWarning,
            stacklevel=3,
        )
    return out


# -- loading a run folder --------------------------------------------------------------------------
def load_run(path: str | os.PathLike[str]) -> RunRecord:
    """A run record from a run folder or a JSON file.

    Accepts a saved :class:`RunRecord` (``telemetry.json`` or any name), a run folder of
    ``sparsecore train`` (its ``telemetry.json``, or else ``summary.json`` plus
    ``mask_updates.json``), a ``summary.json`` (its sibling ``mask_updates.json`` is read too) or
    a bare ``mask_updates.json`` list. A dense run (no mask updates) gives a record without
    layers, which still carries its epochs for accuracy plots.
    """
    path = Path(path)
    if path.is_dir():
        if (path / TELEMETRY_NAME).is_file():
            return RunRecord.load(path / TELEMETRY_NAME)
        if (path / _SUMMARY_NAME).is_file():
            return _from_summary(path / _SUMMARY_NAME)
        if (path / _MASK_UPDATES_NAME).is_file():
            return _from_mask_updates(path / _MASK_UPDATES_NAME, None)
        raise TelemetryError(
            f"{path}: not a run folder (no {TELEMETRY_NAME}, {_SUMMARY_NAME} or "
            f"{_MASK_UPDATES_NAME} in it)"
        )
    if not path.exists():
        raise TelemetryError(f"{path}: no such file or folder")
    data = _read_json(path)
    if isinstance(data, list):
        return _from_mask_updates(path, data)
    if isinstance(data, Mapping) and data.get("format") == RECORD_FORMAT:
        return RunRecord.from_dict(data, str(path))
    if isinstance(data, Mapping) and "epochs" in data and "format" not in data:
        return _from_summary(path, data)
    raise TelemetryError(
        f"{path}: not a sparsecore run record, summary.json or mask_updates.json "
        f"(a JSON {type(data).__name__} without field 'format' = {RECORD_FORMAT!r})"
    )


def _from_summary(path: Path, data: Any = None) -> RunRecord:
    summary = _read_json(path) if data is None else data
    updates_path = path.with_name(_MASK_UPDATES_NAME)
    reports: list[Any] = []
    if updates_path.is_file():
        reports = _list(_read_json(updates_path), str(updates_path))
    elif isinstance(summary, Mapping) and summary.get("num_mask_updates"):
        raise TelemetryError(
            f"{path}: the run made {summary['num_mask_updates']} mask updates but "
            f"{updates_path} is missing"
        )
    return record_from_run(summary, reports, source=str(path))


def record_from_run(
    summary: Any,
    mask_updates: Sequence[Any],
    *,
    flops: Mapping[str, Any] | None = None,
    source: str = "summary",
) -> RunRecord:
    """A record from the training job's summary (``summary.json``) and mask-update reports.

    ``flops`` (e.g. from :func:`flops_section`) overrides a ``flops`` entry of the summary.
    """
    if not isinstance(summary, Mapping):
        raise TelemetryError(f"{source}: expected a JSON object, got {type(summary).__name__}")
    epochs = _list(summary.get("epochs"), f"{source}: 'epochs'")
    for i, e in enumerate(epochs):
        if not isinstance(e, Mapping):
            raise TelemetryError(f"{source}: epochs[{i}] must be an object, got {e!r}")
    meta = {
        k: summary[k]
        for k in ("model", "method", "config", "dataset", "machine", "completed", "wall_time_s")
        if k in summary
    }
    if flops is None and isinstance(summary.get("flops"), Mapping):
        flops = summary["flops"]
    return RunRecord.from_reports(
        mask_updates,
        epochs=epochs,
        flops=flops,
        meta=meta,
        source=f"{source} (mask updates)",
    )


def flops_section(
    model_flops: Any,
    *,
    times_ms: Mapping[str, tuple[float, float]] | None = None,
    batch: int | None = None,
    kernels: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``flops`` entry of a run record from a :class:`sparsecore.flops.ModelFlops`.

    Per layer: dense, sparse and compact FLOPs of one training step (forward + backward) and
    their forward/backward parts, and the output units and input channels the compact count
    removes; ``times_ms`` optionally maps a layer name to measured (dense, sparse)
    milliseconds of one step, shown beside the counts. ``kernels`` is a kernel router's
    ``telemetry()`` (``attach(kernels=...)``): it adds, per layer it routes (by module name or
    weight name), the weight shape the layer runs now (``shape_run``) and how many forward
    passes ran each shape (``shapes_run``), and the run's wall time per step (``step_time_s``).
    """
    times = dict(times_ms or {})
    routed = dict(kernels.get("layers", {})) if kernels is not None else {}
    layers = []
    for layer in model_flops.layers:
        entry: dict[str, Any] = {
            "name": layer.name,
            "kind": layer.kind,
            "dense_flops": int(layer.dense),
            "sparse_flops": int(layer.sparse),
            "compact_flops": int(layer.compact),
        }
        for key in (
            "dense_forward", "dense_backward", "sparse_forward", "sparse_backward",
            "sparse_backward_dense_wgrad", "compact_forward", "compact_backward",
        ):  # fmt: skip
            entry[key] = int(getattr(layer, key))
        for key in ("units", "units_removed", "inputs", "inputs_removed"):
            entry[key] = int(getattr(layer, key, 0))
        if layer.name in times:
            entry["dense_ms"], entry["sparse_ms"] = (float(t) for t in times[layer.name])
        run = routed.get(layer.name, routed.get(f"{layer.name}.weight"))
        if isinstance(run, Mapping) and "shape_run" in run:
            entry["shape_run"] = [int(d) for d in run["shape_run"]]
            entry["shapes_run"] = {str(k): int(v) for k, v in run.get("shapes_run", {}).items()}
        layers.append(entry)
    section: dict[str, Any] = {"batch": batch, "layers": layers}
    if kernels is not None:
        section["kernels"] = kernels.get("mode")
        if "step_time_s" in kernels:
            section["step_time_s"] = kernels["step_time_s"]
    return section


def _from_mask_updates(path: Path, data: Any) -> RunRecord:
    reports = _list(_read_json(path) if data is None else data, str(path))
    return RunRecord.from_reports(reports, source=str(path))


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TelemetryError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TelemetryError(f"{path}: cannot be read ({err})") from err
    if not text.strip():
        raise TelemetryError(f"{path}: the file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (the file looks truncated)" if _looks_truncated(text) else ""
        raise TelemetryError(
            f"{path}: not valid JSON{hint}: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from err


def _looks_truncated(text: str) -> bool:
    """True when the text ends inside a string or with brackets left open: a cut-off file."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return in_string or depth > 0


# -- conversion helpers ------------------------------------------------------------------------------
def _from_report(report: UpdateReport, epoch: int | None) -> UpdateReport:
    """An engine's report as a run record holds it: its epoch, and each layer's ever-active
    count taken from ``extra['ever_active']`` (where the engine keeps it)."""
    ever = report.extra.get("ever_active")
    if ever is not None and len(ever) != len(report.layers):
        raise TelemetryError(
            f"mask update {report.update}: extra['ever_active'] has {len(ever)} counts for "
            f"{len(report.layers)} layers"
        )
    layers = tuple(
        replace(lr, ever_active=lr.ever_active if ever is None else int(ever[i]))
        for i, lr in enumerate(report.layers)
    )
    # ``extra`` is the engine's (its counts are now in the layers): a record does not keep it
    return replace(report, layers=layers, epoch=report.epoch if epoch is None else epoch, extra={})


def _update_from_report_dict(data: Mapping[str, Any], where: str) -> UpdateReport:
    """An ``UpdateReport.to_dict()`` (plus an optional ``epoch``), checked field by field."""
    for key in ("update", "prune_rate", "layers"):
        if key not in data:
            raise TelemetryError(f"{where}: missing field {key!r}")
    layer_fields = (
        "name", "size", "nnz_after", "pruned", "grown", "net_pruned", "net_grown",
        "importance", "share", "capacity",
    )  # fmt: skip
    for j, layer in enumerate(_list(data["layers"], f"{where}: 'layers'")):
        if not isinstance(layer, Mapping):
            raise TelemetryError(f"{where}: layers[{j}] must be an object, got {layer!r}")
        for key in layer_fields:
            if key not in layer:
                raise TelemetryError(
                    f"{where}: layer {layer.get('name', j)!r} is missing field {key!r}"
                )
    try:
        # the epoch is checked below, as an integer (from_dict would truncate a float)
        report = UpdateReport.from_dict({k: v for k, v in data.items() if k != "epoch"})
    except (TypeError, ValueError) as err:
        raise TelemetryError(f"{where}: {err}") from err
    epoch = data.get("epoch")
    rec = _from_report(report, None if epoch is None else _int(epoch, f"{where}: epoch"))
    # re-check the numbers through the same path as a saved record
    return _update_from_dict(_update_to_dict(rec), where)


def _update_to_dict(u: UpdateReport) -> dict[str, Any]:
    return {
        "update": u.update,
        "step": u.step,
        "epoch": u.epoch,
        "prune_rate": u.prune_rate,
        "skipped": u.skipped,
        "reason": u.reason,
        "nnz": u.total_nnz,
        "density": u.density if u.layers else None,
        "ever_active_fraction": u.ever_active_fraction,
        **u.totals(),
        "layers": [
            {
                "name": layer.name,
                "size": layer.size,
                "nnz": layer.nnz_after,
                "density": layer.density,
                "pruned": layer.pruned,
                "grown": layer.grown,
                "net_pruned": layer.net_pruned,
                "net_grown": layer.net_grown,
                "importance": layer.importance,
                "share": layer.share,
                "capacity": layer.capacity,
                "ever_active": layer.ever_active,
                "ever_active_fraction": layer.ever_active_fraction,
                # not recorded (reports older than the count): null, as records always wrote
                "units": layer.units or None,
                "dead_units": _if_units(layer, layer.dead_units),
                "revived": _if_units(layer, layer.revived),
                "ablated": _if_units(layer, layer.ablated),
            }
            for layer in u.layers
        ],
    }


def _update_from_dict(data: Any, where: str) -> UpdateReport:
    if not isinstance(data, Mapping):
        raise TelemetryError(f"{where}: expected an object, got {type(data).__name__}")
    layers = []
    for j, entry in enumerate(_list(_get(data, "layers", where), f"{where}.layers")):
        lw = f"{where}.layers[{j}]"
        name = _str(_get(entry, "name", lw), f"{lw}.name")
        lw = f"{where}, layer {name!r}"
        ever = entry.get("ever_active")
        units, dead, revived, ablated = (
            entry.get(k) for k in ("units", "dead_units", "revived", "ablated")
        )
        nnz = _int(_get(entry, "nnz", lw), f"{lw}: nnz")
        pruned = _int(_get(entry, "pruned", lw), f"{lw}: pruned")
        grown = _int(_get(entry, "grown", lw), f"{lw}: grown")
        layers.append(
            LayerReport(
                name=name,
                size=_int(_get(entry, "size", lw), f"{lw}: size", minimum=1),
                nnz_before=nnz - grown + pruned,  # the files keep the count after the update
                nnz_after=nnz,
                pruned=pruned,
                grown=grown,
                net_pruned=_int(_get(entry, "net_pruned", lw), f"{lw}: net_pruned"),
                net_grown=_int(_get(entry, "net_grown", lw), f"{lw}: net_grown"),
                importance=_float(_get(entry, "importance", lw), f"{lw}: importance"),
                share=_float(_get(entry, "share", lw), f"{lw}: share"),
                capacity=_int(_get(entry, "capacity", lw), f"{lw}: capacity"),
                ever_active=None if ever is None else _int(ever, f"{lw}: ever_active"),
                units=0 if units is None else _int(units, f"{lw}: units", minimum=1),
                dead_units=0 if dead is None else _int(dead, f"{lw}: dead_units"),
                revived=0 if revived is None else _int(revived, f"{lw}: revived"),
                ablated=0 if ablated is None else _int(ablated, f"{lw}: ablated"),
            )
        )
    step = data.get("step")
    epoch = data.get("epoch")
    return UpdateReport(
        update=_int(_get(data, "update", where), f"{where}: update"),
        step=None if step is None else _int(step, f"{where}: step"),
        epoch=None if epoch is None else _int(epoch, f"{where}: epoch"),
        prune_rate=_float(_get(data, "prune_rate", where), f"{where}: prune_rate"),
        layers=tuple(layers),
        skipped=bool(data.get("skipped", False)),
        reason=str(data.get("reason", "")),
    )


def _if_units(layer: LayerReport, count: int) -> int | None:
    """A unit count as the record files keep it: null where the units were not recorded."""
    return count if layer.units else None


def _check_layer(layer: LayerReport, size: int, where: str) -> None:
    if layer.size != size:
        raise TelemetryError(f"{where}: size {layer.size} differs from the run's {size}")
    if not layer.nnz_after <= layer.size:
        raise TelemetryError(f"{where}: nnz {layer.nnz_after} exceeds the layer size {layer.size}")
    if layer.net_pruned > layer.pruned or layer.net_grown > layer.grown:
        raise TelemetryError(
            f"{where}: net counts ({layer.net_pruned} pruned, {layer.net_grown} grown) exceed "
            f"the gross counts ({layer.pruned}, {layer.grown})"
        )
    if layer.grown > layer.nnz_after:
        raise TelemetryError(
            f"{where}: grown {layer.grown} exceeds the {layer.nnz_after} weights active after the "
            "update"
        )
    if not 0.0 <= layer.share <= 1.0 + 1e-9:
        raise TelemetryError(f"{where}: share {layer.share} is not in [0, 1]")
    if layer.dead_units and layer.dead_units > layer.units:
        raise TelemetryError(
            f"{where}: dead_units {layer.dead_units} needs units, and at most that many "
            f"(units {layer.units})"
        )
    if layer.ablated and layer.ablated > layer.units:
        raise TelemetryError(
            f"{where}: ablated {layer.ablated} needs units, and at most that many "
            f"(units {layer.units})"
        )
    if layer.revived > layer.grown:
        raise TelemetryError(
            f"{where}: revived {layer.revived} exceeds the {layer.grown} weights grown"
        )
    if layer.ever_active is not None and not layer.nnz_after <= layer.ever_active <= layer.size:
        raise TelemetryError(
            f"{where}: ever_active {layer.ever_active} must lie between nnz {layer.nnz_after} and "
            f"size {layer.size}"
        )


def _get(entry: Any, key: str, where: str) -> Any:
    if not isinstance(entry, Mapping):
        raise TelemetryError(f"{where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise TelemetryError(f"{where}: missing field {key!r}")
    return entry[key]


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise TelemetryError(f"{where} must be a JSON list, got {type(value).__name__}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise TelemetryError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TelemetryError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(value: Any, where: str) -> float:
    if not _is_number(value) or not math.isfinite(float(value)):
        raise TelemetryError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _is_number(value: Any) -> bool:
    """Python and NumPy reals (a Keras job's metrics are often ``np.float32``), not bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _json_safe(value: Any) -> Any:
    """Replace NaN/Inf (not JSON) by None, and NumPy scalars by Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
