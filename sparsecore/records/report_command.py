"""``sparsecore report RUN``: a per-layer table of a finished run, and PNG plots of its training.

RUN is a run folder of ``sparsecore train`` or a JSON run record (see :mod:`sparsecore.records.run_record`).
The table lists, per sparse layer, its final active count and density, the weights pruned and
regrown over the run (gross and net), its mean share of the regrowth budget and the fraction of
its positions that were ever active; FLOP and kernel-time accounting is added when the run
recorded it. Plots go to ``--plots DIR`` (default: ``RUN/report``). The table also gives each
layer's dead output units at the last update, and a warning names every layer most of whose units
were dead then.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..errors import SparseCoreError
from .layer_table import ABLATED_COLUMN, REPORT_COLUMNS, format_rows, layer_stats, plural, render
from .run_record import RunRecord, load_run
from .tensorboard import write_tensorboard

__all__ = [
    "build_parser",
    "dead_unit_warnings",
    "flops_rows",
    "format_table",
    "main",
    "write_plots",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsecore report",
        description="Summarise a training run: a per-layer table and PNG plots of where the "
        "weights went, how the regrowth budget was shared, what was pruned and grown, and the "
        "test accuracy per epoch.",
    )
    parser.add_argument("run", help="run folder of 'sparsecore train', or a run record JSON")
    parser.add_argument(
        "--baseline", help="another run (folder or JSON), e.g. the dense one, to compare accuracy"
    )
    parser.add_argument("--plots", help="folder for the PNG plots (default RUN/report)")
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    parser.add_argument(
        "--tensorboard", metavar="DIR", help="also write the run's scalars as TensorBoard events"
    )
    parser.add_argument(
        "--save-record",
        metavar="FILE",
        help="write the run record (telemetry JSON) built from the run folder to FILE",
    )
    return parser


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    """Entry point of ``sparsecore report``; returns the exit status (2 for bad input)."""
    out = sys.stdout if stream is None else stream
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        record = load_run(args.run)
        baseline = load_run(args.baseline) if args.baseline else None
        out.write(format_table(record, baseline))
        if args.save_record:
            out.write(f"run record written to {record.save(args.save_record)}\n")
        if args.tensorboard:
            out.write(
                f"TensorBoard events written to {write_tensorboard(record, args.tensorboard)}\n"
            )
        if not args.no_plots:
            run_path = Path(args.run)
            default = (run_path if run_path.is_dir() else run_path.parent) / "report"
            written = write_plots(record, Path(args.plots) if args.plots else default, baseline)
            for path in written:
                out.write(f"plot: {path}\n")
    except SparseCoreError as err:
        print(f"sparsecore report: error: {err}", file=sys.stderr)
        return 2
    out.flush()
    return 0


def write_plots(record: RunRecord, folder: Path, baseline: RunRecord | None = None) -> list[Path]:
    """Every plot the record has data for, as PNGs in ``folder``."""
    from . import plots

    jobs: list[tuple[str, Callable[[Path], Path]]] = []
    if record.applied:
        jobs += [
            ("density.png", lambda p: plots.plot_density(record, p)),
            ("importance_share.png", lambda p: plots.plot_share(record, p)),
            ("pruned_grown.png", lambda p: plots.plot_pruned_grown(record, p)),
        ]
        if record.applied[-1].ever_active_fraction is not None:
            jobs.append(("ever_active.png", lambda p: plots.plot_ever_active(record, p)))
    if any(isinstance(e.get("test_acc"), (int, float)) for e in record.epochs):
        jobs.append(("accuracy.png", lambda p: plots.plot_accuracy(record, p, baseline)))
    rows = flops_rows(record)
    if rows:
        jobs.append(("flops.png", lambda p: plots.plot_flops(rows, p)))
    folder.mkdir(parents=True, exist_ok=True)
    return [make(folder / name) for name, make in jobs]


# -- the table -----------------------------------------------------------------------------------
def format_table(record: RunRecord, baseline: RunRecord | None = None) -> str:
    """The text report: run header, per-layer table, totals, accuracy and FLOP accounting."""
    lines: list[str] = []
    meta = record.meta
    cfg = meta.get("config") if isinstance(meta.get("config"), Mapping) else {}
    head = [f"{k} {meta[k]}" for k in ("model", "method") if meta.get(k)]
    if cfg and cfg.get("density") is not None and meta.get("method") != "dense":
        head.append(f"target density {cfg['density']:g}")
    if cfg and cfg.get("epochs") is not None:
        head.append(plural(int(cfg["epochs"]), "epoch"))
    lines.append("run: " + (", ".join(head) if head else "(no metadata)"))
    totals = record.totals()
    skipped = totals["skipped_updates"]
    lines.append(
        f"mask updates: {totals['updates']}"
        + (f" ({skipped} skipped for non-finite inputs)" if skipped else "")
    )
    if record.applied:
        lines.append("")
        lines.extend(_layer_table(record))
    accs = _accuracy_lines(record, baseline)
    if accs:
        lines.append("")
        lines.extend(accs)
    rows = flops_rows(record)
    if rows:
        lines.append("")
        lines.extend(_flops_table(rows))
        lines.extend(_step_time_lines(record))
    return "\n".join(lines) + "\n"


def _step_time_lines(record: RunRecord) -> list[str]:
    """The measured wall time per training step, when the run's kernels recorded it."""
    section = record.flops if isinstance(record.flops, Mapping) else {}
    times = section.get("step_time_s")
    if not isinstance(times, Mapping):
        return []
    parts = []
    for key, label in (("window", "dense-gradient window"), ("outside_window", "other steps")):
        t = times.get(key)
        if isinstance(t, Mapping) and isinstance(t.get("mean"), (int, float)) and t.get("steps"):
            parts.append(f"{label} {1000 * float(t['mean']):.3g} ms over {int(t['steps'])} steps")
    if not parts:
        return []
    kernels = section.get("kernels")
    label = f" (kernels={kernels!r})" if isinstance(kernels, str) else ""
    return [f"time per step{label}: " + ", ".join(parts)]


def _layer_table(record: RunRecord) -> list[str]:
    note = (
        "density: final fraction of the layer active; start: before the first update; "
        "pruned/grown: summed over all updates (net: positions whose state changed); "
        "mean share: of the regrowth budget; ever active: positions active at any time; "
        "dead units: output units with no active weight or no gradient at the last update"
    )
    columns = REPORT_COLUMNS
    if any(layer.ablated for upd in record.applied for layer in upd.layers):
        columns = (*REPORT_COLUMNS, ABLATED_COLUMN)
        note += (
            "; ablated units: output units emptied and kept empty by ablate_below at the last "
            "update (compaction removes them)"
        )
    return [*render(layer_stats(record), columns), note, *dead_unit_warnings(record)]


def dead_unit_warnings(record: RunRecord) -> list[str]:
    """One warning line per layer most of whose output units were dead at the last update
    (units ablated on purpose, ``ablate_below``, left out)."""
    if not record.applied:
        return []
    lines = []
    for layer in record.applied[-1].layers:
        fraction = layer.dead_fraction
        if fraction is not None and layer.ablated and layer.units:
            fraction = max(0, int(layer.dead_units or 0) - layer.ablated) / layer.units
        if fraction is not None and fraction > 0.5:
            lines.append(
                f"warning: layer {layer.name!r}: {layer.dead_units} of {layer.units} output "
                f"units were dead at the last mask update (no active weight, or no gradient); "
                f"revive_dead_units=True regrows them (docs/algorithm.md, 'Dead units')"
            )
    return lines


def _accuracy_lines(record: RunRecord, baseline: RunRecord | None) -> list[str]:
    lines = []
    for label, rec in (("this run", record), ("baseline", baseline)):
        if rec is None:
            continue
        accs = [
            (e["epoch"], e["test_acc"])
            for e in rec.epochs
            if isinstance(e.get("test_acc"), (int, float))
        ]
        if accs:
            best = max(a for _, a in accs)
            lines.append(
                f"test accuracy ({label}): final {accs[-1][1]:.2f}% after epoch {accs[-1][0]}, "
                f"best {best:.2f}%"
            )
    return lines


def flops_rows(record: RunRecord) -> list[dict[str, Any]]:
    """Per-layer FLOP (and kernel time) rows from the record's ``flops`` section, if any.

    Reads ``flops["layers"]`` as a list of objects (or a ``{name: object}`` map) with
    ``dense_flops`` and ``sparse_flops`` (``dense``/``sparse`` also accepted), optionally
    ``compact_flops`` (dense after removing empty channels) and, when measured,
    ``dense_ms``/``sparse_ms`` (as :func:`sparsecore.records.run_record.flops_section` writes them).
    Entries without FLOP counts are skipped.
    """
    section = record.flops
    if not isinstance(section, Mapping):
        return []
    layers = section.get("layers")
    if isinstance(layers, Mapping):
        layers = [{"name": k, **v} for k, v in layers.items() if isinstance(v, Mapping)]
    if not isinstance(layers, list):
        return []
    rows = []
    for entry in layers:
        if not isinstance(entry, Mapping):
            continue
        dense = _first(entry, "dense_flops", "dense")
        sparse = _first(entry, "sparse_flops", "sparse")
        if dense is None or sparse is None:
            continue
        rows.append(
            {
                "name": str(entry.get("name", "?")),
                "dense_flops": float(dense),
                "sparse_flops": float(sparse),
                "compact_flops": _first(entry, "compact_flops", "compact"),
                "dense_ms": _first(entry, "dense_ms", "dense_time_ms"),
                "sparse_ms": _first(entry, "sparse_ms", "sparse_time_ms"),
                "units_removed": _removed(entry, "units"),
                "inputs_removed": _removed(entry, "inputs"),
                "shape_run": _shape_run(entry.get("shape_run")),
            }
        )
    return rows


def _removed(entry: Mapping[str, Any], what: str) -> str | None:
    """``"removed/total"`` of the layer's output units or input channels, if recorded."""
    total, removed = _first(entry, what), _first(entry, f"{what}_removed")
    if not total or removed is None:
        return None
    return f"{int(removed)}/{int(total)}"


def _shape_run(value: Any) -> str | None:
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        return None
    return "x".join(str(d) for d in value)


def _first(entry: Mapping[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _flops_table(rows: list[dict[str, Any]]) -> list[str]:
    # Columns for units and shapes appear when the record has them (records written before
    # they were counted show the table they always showed).
    units = any(r["units_removed"] is not None for r in rows)
    shapes = any(r["shape_run"] is not None for r in rows)
    header = ["layer", "dense FLOPs", "sparse FLOPs", "ratio", "compact FLOPs"]
    header += ["units removed", "inputs removed"] if units else []
    header += ["shape run"] if shapes else []
    header += ["dense ms", "sparse ms", "speedup"]
    out = []
    for r in rows:
        ratio = r["dense_flops"] / r["sparse_flops"] if r["sparse_flops"] else float("inf")
        timed = r["dense_ms"] is not None and r["sparse_ms"] is not None
        cells = [
            r["name"],
            f"{r['dense_flops']:.3g}",
            f"{r['sparse_flops']:.3g}",
            f"{ratio:.1f}x",
            "-" if r["compact_flops"] is None else f"{r['compact_flops']:.3g}",
        ]
        cells += [r["units_removed"] or "-", r["inputs_removed"] or "-"] if units else []
        cells += [r["shape_run"] or "-"] if shapes else []
        cells += [
            "-" if r["dense_ms"] is None else f"{r['dense_ms']:.3g}",
            "-" if r["sparse_ms"] is None else f"{r['sparse_ms']:.3g}",
            f"{r['dense_ms'] / r['sparse_ms']:.2f}x" if timed and r["sparse_ms"] else "-",
        ]
        out.append(cells)
    dense = sum(r["dense_flops"] for r in rows)
    sparse = sum(r["sparse_flops"] for r in rows)
    note = (
        f"FLOPs of one training step (forward + backward): dense {dense:.3g}, sparse {sparse:.3g} "
        f"({dense / sparse:.1f}x fewer)"
        if sparse
        else "FLOPs of one training step (forward + backward)"
    )
    legend = []
    if units:
        legend.append(
            "units removed / inputs removed: output units and input channels the compact "
            "network drops"
        )
    if shapes:
        legend.append("shape run: the weight shape the layer computes with (kernels='compact...')")
    return [*format_rows(header, out), note, *(["; ".join(legend)] if legend else [])]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
