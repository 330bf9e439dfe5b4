"""The per-layer table of a sparse run: one renderer for ``sparsecore report`` and ``summary()``.

Both tables start from a :class:`~sparsecore.records.run_record.RunRecord` (the run's mask updates, as
the training job records them or as an adapter's history gives them): :func:`layer_stats` turns
it into one :class:`LayerStats` per sparse layer plus the ``all`` row, and :func:`render` lays
out any list of :class:`Column` over them. A column is a title and a function from a row's stats
to its text, so adding one to a table is one entry in its list (:data:`REPORT_COLUMNS` for
``sparsecore report``, :data:`SUMMARY_COLUMNS` for ``SparseTraining.summary()`` and
``SparseCallback.summary()``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .run_record import RunRecord
from .updates import LayerReport, UpdateReport

__all__ = [
    "ABLATED_COLUMN",
    "REPORT_COLUMNS",
    "SUMMARY_COLUMNS",
    "Column",
    "LayerStats",
    "format_rows",
    "layer_stats",
    "plural",
    "removed_channels",
    "render",
    "summary_text",
]


@dataclass(frozen=True)
class LayerStats:
    """One row of a per-layer table: a sparse layer over a run, or the ``all`` row.

    ``nnz`` is the active count now, ``start_nnz`` in the initial mask; ``pruned``, ``grown``
    and the ``net_`` counts are summed over the run's mask updates; ``mean_share`` is the mean
    of the layer's share of the regrowth budget; ``ever_active`` counts positions active at any
    time (``None`` when not recorded); ``last`` is the layer in the last mask update (``None``
    before the first). ``shape`` is known for live runs only.
    """

    name: str
    size: int
    shape: tuple[int, ...] | None
    nnz: int | None
    start_nnz: int | None
    pruned: int
    grown: int
    net_pruned: int
    net_grown: int
    mean_share: float | None
    ever_active: int | None
    last: LayerReport | None

    @property
    def density(self) -> float | None:
        return None if self.nnz is None else self.nnz / self.size

    @property
    def start_density(self) -> float | None:
        return None if self.start_nnz is None else self.start_nnz / self.size

    @property
    def ever_active_fraction(self) -> float | None:
        return None if self.ever_active is None else self.ever_active / self.size


@dataclass(frozen=True)
class Column:
    """A table column: its title and the text of its cell for one row."""

    title: str
    cell: Callable[[LayerStats], str]


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _dead(stats: LayerStats) -> str:
    last = stats.last
    if last is None or not last.units:  # units not recorded
        return "-"
    return f"{last.dead_units}/{last.units}"


def _ablated(stats: LayerStats) -> str:
    last = stats.last
    if last is None or not last.units:
        return "-"
    return f"{last.ablated}/{last.units}"


#: Added to the tables of runs whose updates ablated units (``ablate_below``).
ABLATED_COLUMN = Column("ablated units", _ablated)


def _shape(stats: LayerStats) -> str:
    return "" if stats.shape is None else "(" + ", ".join(str(d) for d in stats.shape) + ")"


#: The table of ``sparsecore report``: where the weights went over the whole run.
REPORT_COLUMNS: tuple[Column, ...] = (
    Column("layer", lambda s: s.name),
    Column("size", lambda s: str(s.size)),
    Column("nnz", lambda s: _count(s.nnz)),
    Column("density", lambda s: _percent(s.density)),
    Column("start", lambda s: _percent(s.start_density)),
    Column("pruned", lambda s: str(s.pruned)),
    Column("grown", lambda s: str(s.grown)),
    Column("net pruned", lambda s: str(s.net_pruned)),
    Column("net grown", lambda s: str(s.net_grown)),
    Column("mean share", lambda s: _percent(s.mean_share, 1)),
    Column("ever active", lambda s: _percent(s.ever_active_fraction)),
    Column("dead units", _dead),
)

#: The table of ``summary()``: the sparse layers as they are now, and the last mask update.
SUMMARY_COLUMNS: tuple[Column, ...] = (
    Column("layer", lambda s: s.name),
    Column("shape", _shape),
    Column("size", lambda s: str(s.size)),
    Column("active", lambda s: _count(s.nnz)),
    Column("density", lambda s: _percent(s.density)),
    Column("ever active", lambda s: _percent(s.ever_active_fraction)),
    Column("last pruned", lambda s: "-" if s.last is None else str(s.last.pruned)),
    Column("last grown", lambda s: "-" if s.last is None else str(s.last.grown)),
    Column("share", lambda s: "-" if s.last is None else _percent(s.last.share, 1)),
    Column("dead units", _dead),
)


def layer_stats(
    record: RunRecord,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    nnz: Mapping[str, int] | None = None,
) -> list[LayerStats]:
    """One :class:`LayerStats` per layer of ``record``, then the ``all`` row.

    ``nnz`` gives live active counts (an adapter's masks); without it the counts after the last
    mask update are used. Before any update the initial mask is all there is: it is the start
    and everything ever active.
    """
    applied = record.applied
    rows: list[LayerStats] = []
    for name, size in record.layers.items():
        history = [u.layer(name) for u in applied]
        now = nnz[name] if nnz is not None else (history[-1].nnz_after if history else None)
        first = history[0] if history else None
        start = now if first is None else first.nnz_after - first.grown + first.pruned
        rows.append(
            LayerStats(
                name=name,
                size=size,
                shape=None if shapes is None else tuple(int(d) for d in shapes[name]),
                nnz=now,
                start_nnz=start,
                pruned=sum(r.pruned for r in history),
                grown=sum(r.grown for r in history),
                net_pruned=sum(r.net_pruned for r in history),
                net_grown=sum(r.net_grown for r in history),
                mean_share=sum(r.share for r in history) / len(history) if history else None,
                ever_active=history[-1].ever_active if history else now,
                last=history[-1] if history else None,
            )
        )
    rows.append(_total(rows, applied[-1] if applied else None))
    return rows


def _total(rows: Sequence[LayerStats], last_update: object | None) -> LayerStats:
    def known(values: list[int | None]) -> int | None:
        return None if any(v is None for v in values) else sum(v or 0 for v in values)

    last = None
    if last_update is not None and all(r.last is not None for r in rows):
        parts = [r.last for r in rows if r.last is not None]
        recorded = all(p.units for p in parts)
        last = LayerReport(
            name="all",
            size=sum(p.size for p in parts),
            nnz_before=sum(p.nnz_before for p in parts),
            nnz_after=sum(p.nnz_after for p in parts),
            pruned=sum(p.pruned for p in parts),
            grown=sum(p.grown for p in parts),
            net_pruned=sum(p.net_pruned for p in parts),
            net_grown=sum(p.net_grown for p in parts),
            importance=sum(p.importance for p in parts),
            share=sum(p.share for p in parts),
            capacity=sum(p.capacity for p in parts),
            ever_active=known([p.ever_active for p in parts]),
            units=sum(p.units for p in parts) if recorded else 0,
            dead_units=sum(p.dead_units for p in parts) if recorded else 0,
        )
    return LayerStats(
        name="all",
        size=sum(r.size for r in rows),
        shape=None,
        nnz=known([r.nnz for r in rows]),
        start_nnz=known([r.start_nnz for r in rows]),
        pruned=sum(r.pruned for r in rows),
        grown=sum(r.grown for r in rows),
        net_pruned=sum(r.net_pruned for r in rows),
        net_grown=sum(r.net_grown for r in rows),
        # each update's shares sum to 1 over the layers
        mean_share=1.0 if last_update is not None else None,
        ever_active=known([r.ever_active for r in rows]),
        last=last,
    )


def plural(count: int, noun: str) -> str:
    """``"1 epoch"``, ``"20 epochs"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def render(stats: Sequence[LayerStats], columns: Sequence[Column]) -> list[str]:
    """The table's lines: header, rule, one line per row (first column left-aligned)."""
    return format_rows([c.title for c in columns], [[c.cell(s) for c in columns] for s in stats])


def format_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def fmt(row: Sequence[str]) -> str:
        cells = [str(row[0]).ljust(widths[0])]
        cells += [str(c).rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def removed_channels(mask: npt.ArrayLike, axis: int = 0) -> tuple[int, int, int, int]:
    """``(empty output units, output units, unread input channels, input channels)`` of one
    weight mask whose output units lie along ``axis`` and input channels along the axis next to
    it (``(out, in, ...)``, ``(in, out)``, ``(kh, kw, in, out)``): what per-layer compaction
    (``attach(kernels="compact")``) leaves out."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim < 2:
        rows = int(m.size)
        return (rows - int(np.count_nonzero(m)), rows, 0, 0)
    axis %= m.ndim
    in_axis = axis + 1 if axis == 0 else axis - 1
    by_unit = np.moveaxis(m, (axis, in_axis), (0, 1)).reshape(m.shape[axis], m.shape[in_axis], -1)
    reads: npt.NDArray[np.bool_] = np.any(by_unit, axis=2)
    return (
        int(np.count_nonzero(~reads.any(axis=1))),
        int(reads.shape[0]),
        int(np.count_nonzero(~reads.any(axis=0))),
        int(reads.shape[1]),
    )


def _compaction_columns(
    removed: Mapping[str, tuple[int, int, int, int]], shapes_run: Mapping[str, str] | None
) -> list[Column]:
    def counts(stats: LayerStats, first: int) -> str:
        parts = list(removed.values()) if stats.name == "all" else [removed.get(stats.name)]
        known = [p for p in parts if p is not None]
        if len(known) != len(parts):
            return "-"
        return f"{sum(p[first] for p in known)}/{sum(p[first + 1] for p in known)}"

    columns = [
        Column("units removed", lambda s: counts(s, 0)),
        Column("inputs unread", lambda s: counts(s, 2)),
    ]
    if shapes_run is not None:
        columns.append(Column("shape run", lambda s: shapes_run.get(s.name, "-")))
    return columns


def summary_text(
    title: str,
    reports: Sequence[UpdateReport],
    *,
    shapes: Mapping[str, Sequence[int]],
    nnz: Mapping[str, int],
    step: int | None = None,
    columns: Sequence[Column] = SUMMARY_COLUMNS,
    removed: Mapping[str, tuple[int, int, int, int]] | None = None,
    shapes_run: Mapping[str, str] | None = None,
) -> str:
    """The text of an adapter's ``summary()``: a header line, the table and a legend.

    ``reports`` is the adapter's history; ``shapes`` and ``nnz`` (live active counts) are by
    sparse weight name, in the run's order. ``removed`` (:func:`removed_channels` per weight)
    adds the "units removed" column, ``shapes_run`` (the weight shape each routed layer
    computes with under ``kernels="compact..."``) the "shape run" column.
    """
    if removed is not None:
        columns = [*columns, *_compaction_columns(removed, shapes_run)]
    sizes = {name: _size(shape) for name, shape in shapes.items()}
    record = RunRecord.from_reports(reports, layers=sizes, source=title)
    stats = layer_stats(record, shapes=shapes, nnz=nnz)
    total = stats[-1]
    applied = record.applied
    skipped = len(record.updates) - len(applied)
    head = (
        f"{title}: {len(sizes)} sparse weight{'s' if len(sizes) != 1 else ''}, "
        f"{total.nnz} of {total.size} active (density {total.density or 0.0:.4f})"
        + ("" if step is None else f", step {step}")
        + f", {len(applied)} mask update{'s' if len(applied) != 1 else ''}"
        + (f" ({skipped} skipped)" if skipped else "")
    )
    last_step = applied[-1].step if applied else None
    legend = (
        "ever active: positions active at any time; last pruned/grown: by the last mask update"
        + ("" if last_step is None else f" (after step {last_step})")
        + "; share: of its regrowth budget; dead units: output units with no active weight or "
        "no gradient at the last mask update"
        + (
            ""
            if removed is None
            else "; units removed / inputs unread: output units with no active weight, input "
            "channels no active weight reads (what compaction leaves out)"
        )
        + ("" if shapes_run is None else "; shape run: the weight shape the layer computes with")
    )
    return "\n".join([head, *render(stats, columns), legend])


def _size(shape: Sequence[int]) -> int:
    size = 1
    for d in shape:
        size *= int(d)
    return size
