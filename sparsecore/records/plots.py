"""PNG plots of a run record and of class selectivity (matplotlib, imported only when plotting).

Figures are built with matplotlib's object API (``Figure`` + Agg canvas), not ``pyplot``, so
plotting from a script, a test or a notebook never changes the caller's pyplot state or backend.
Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SparseCoreError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .run_record import RunRecord
    from .selectivity import SelectivityResult

__all__ = [
    "accuracy_figure",
    "plot_accuracy",
    "plot_density",
    "plot_ever_active",
    "plot_flops",
    "plot_pruned_grown",
    "plot_selectivity",
    "plot_share",
]

_DPI = 100


def _figure(width: float = 7.0, height: float = 4.2) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SparseCoreError(
            "plots need matplotlib: pip install matplotlib (or sparsecore[demo])"
        ) from None
    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI)
    return path


def _x_axis(record: RunRecord) -> tuple[list[int], str]:
    """Optimizer steps of the applied updates when all are known, else update numbers."""
    applied = record.applied
    steps = [u.step for u in applied]
    if applied and all(s is not None for s in steps):
        return [int(s) for s in steps if s is not None], "optimizer step of the mask update"
    return [u.update for u in applied], "mask update"


def _start_values(record: RunRecord, name: str) -> tuple[int, int]:
    """(active count, size) of a layer before the first update: the initial mask."""
    first = record.applied[0].layer(name)
    return first.nnz_after - first.grown + first.pruned, first.size


def _title(record: RunRecord, what: str) -> str:
    meta = record.meta
    parts = [str(meta[k]) for k in ("model", "method") if meta.get(k)]
    cfg = meta.get("config") or {}
    if (
        isinstance(cfg, Mapping)
        and cfg.get("density") is not None
        and meta.get("method") != "dense"
    ):
        parts.append(f"density {cfg['density']:g}")
    return what + (f" ({', '.join(parts)})" if parts else "")


def _need_updates(record: RunRecord, what: str) -> None:
    if not record.applied:
        raise SparseCoreError(f"{what}: the run has no mask updates to plot")


def plot_density(record: RunRecord, path: str | os.PathLike[str]) -> Path:
    """Density of every layer (and overall) after each mask update: where the weights went."""
    _need_updates(record, "density plot")
    x, xlabel = _x_axis(record)
    x = [0, *x]  # the initial mask first
    fig = _figure()
    ax = fig.add_subplot()
    starts = {name: _start_values(record, name) for name in record.layers}
    for name in record.layers:
        nnz0, size = starts[name]
        values = [100 * nnz0 / size, *(100 * float(d or 0) for d in record.series(name, "density"))]
        ax.plot(x, values, marker=".", label=name)
    total0 = sum(n for n, _ in starts.values()) / sum(s for _, s in starts.values())
    overall = [100 * total0, *(100 * u.density for u in record.applied)]
    ax.plot(x, overall, color="black", linestyle="--", linewidth=1.5, label="all sparse layers")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("weights active (% of layer, log scale)")
    ax.set_title(_title(record, "Density per layer over training"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


def plot_share(record: RunRecord, path: str | os.PathLike[str]) -> Path:
    """Each layer's share of the regrowth budget (its mean-|momentum| importance share)."""
    _need_updates(record, "importance-share plot")
    x, xlabel = _x_axis(record)
    fig = _figure()
    ax = fig.add_subplot()
    shares = np.array(
        [[100 * float(s or 0) for s in record.series(n, "share")] for n in record.layers]
    )
    ax.stackplot(x, shares, labels=list(record.layers), alpha=0.85)
    ax.set_ylim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("importance share (% of all sparse layers)")
    ax.set_title(_title(record, "Importance share per layer (stacked)"))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_pruned_grown(record: RunRecord, path: str | os.PathLike[str]) -> Path:
    """Weights pruned (down) and grown (up) per update, gross and net, with the prune rate."""
    _need_updates(record, "pruned/grown plot")
    applied = record.applied
    idx = np.arange(len(applied))
    fig = _figure(height=4.8)
    ax = fig.add_subplot()
    gross_g = [u.total("grown") for u in applied]
    gross_p = [-u.total("pruned") for u in applied]
    net_g = [u.total("net_grown") for u in applied]
    net_p = [-u.total("net_pruned") for u in applied]
    ax.bar(idx, gross_g, color="tab:green", alpha=0.35, label="grown (gross)")
    ax.bar(idx, net_g, color="tab:green", label="grown (net: position newly active)")
    ax.bar(idx, gross_p, color="tab:red", alpha=0.35, label="pruned (gross)")
    ax.bar(idx, net_p, color="tab:red", label="pruned (net: position left the mask)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("mask update")
    ax.set_ylabel("weights per update (pruned shown negative)")
    ticks = idx if len(idx) <= 20 else idx[:: max(1, len(idx) // 10)]
    ax.set_xticks(ticks, [str(applied[i].update) for i in ticks])
    ax2 = ax.twinx()
    ax2.plot(
        idx, [100 * u.prune_rate for u in applied], color="black", marker=".", label="prune rate"
    )
    ax2.set_ylabel("prune rate (% of active weights)")
    ax2.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    fig.legend(handles + h2, labels + l2, fontsize="small", loc="outside lower center", ncol=3)
    ax.set_title(_title(record, "Pruned and regrown weights per update"))
    return _save(fig, path)


def plot_ever_active(record: RunRecord, path: str | os.PathLike[str]) -> Path:
    """Fraction of each layer's positions ever active (in-time over-parameterization)."""
    _need_updates(record, "ever-active plot")
    if record.applied[-1].ever_active_fraction is None:
        raise SparseCoreError("ever-active plot: the run's reports carry no 'ever_active' counts")
    x, xlabel = _x_axis(record)
    x = [0, *x]  # the initial mask first: everything active so far is in it
    fig = _figure()
    ax = fig.add_subplot()
    styles = ["-", "--", "-.", ":"]
    starts = {name: _start_values(record, name) for name in record.layers}
    for i, name in enumerate(record.layers):
        nnz0, size = starts[name]
        fractions = record.series(name, "ever_active_fraction")
        values = [100 * nnz0 / size, *(100 * float(v or 0) for v in fractions)]
        # distinct line styles keep layers that coincide (e.g. all at 100%) apart
        ax.plot(x, values, marker=".", linestyle=styles[i % len(styles)], label=name)
    total0 = sum(n for n, _ in starts.values()) / sum(s for _, s in starts.values())
    overall = [100 * total0, *(100 * float(u.ever_active_fraction or 0) for u in record.applied)]
    ax.plot(x, overall, color="black", linewidth=2.5, alpha=0.6, label="all sparse layers")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("positions ever active (% of layer)")
    ax.set_ylim(bottom=0)
    ax.set_title(_title(record, "Positions explored (ever active)"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


def _accuracy_series(record: RunRecord) -> tuple[list[int], list[float]]:
    pts = [
        (int(e["epoch"]), float(e["test_acc"]))
        for e in record.epochs
        if isinstance(e.get("test_acc"), (int, float))
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def _label(record: RunRecord, fallback: str) -> str:
    meta = record.meta
    method = meta.get("method")
    if not method:
        return fallback
    cfg = meta.get("config") or {}
    if method != "dense" and isinstance(cfg, Mapping) and cfg.get("density") is not None:
        return f"{method} (density {cfg['density']:g})"
    return str(method)


def plot_accuracy(
    record: RunRecord, path: str | os.PathLike[str], baseline: RunRecord | None = None
) -> Path:
    """Test accuracy per epoch, against a baseline run (e.g. dense) when one is given."""
    return _save(accuracy_figure(record, baseline), path)


def accuracy_figure(record: RunRecord, baseline: RunRecord | None = None) -> Figure:
    """The figure of :func:`plot_accuracy` (epochs on a whole-number axis)."""
    from matplotlib.ticker import MaxNLocator

    epochs, acc = _accuracy_series(record)
    if not epochs:
        raise SparseCoreError("accuracy plot: the run has no per-epoch test accuracy")
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(epochs, acc, marker="o", label=_label(record, "this run"))
    values = list(acc)
    if baseline is not None:
        b_epochs, b_acc = _accuracy_series(baseline)
        if b_epochs:
            ax.plot(b_epochs, b_acc, marker="s", linestyle="--", label=_label(baseline, "baseline"))
            values += b_acc
    lo = min(values)
    ax.set_ylim(max(0.0, lo - 0.15 * (max(values) - lo + 1.0)), min(100.0, max(values) + 1.0))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 1.5"
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(_title(record, "Test accuracy per epoch"))
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def plot_flops(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Per-layer dense vs sparse FLOPs, and measured kernel times when the rows carry them.

    ``rows`` come from :func:`sparsecore.records.report_command.flops_rows`: ``name``, ``dense_flops``,
    ``sparse_flops`` and optionally ``compact_flops`` and ``dense_ms``/``sparse_ms``.
    """
    if not rows:
        raise SparseCoreError("FLOP plot: no per-layer FLOP accounting in the run")
    timed = all(r.get("dense_ms") is not None and r.get("sparse_ms") is not None for r in rows)
    fig = _figure(width=10.0 if timed else 7.0)
    axes: list[Axes] = [fig.add_subplot(1, 2 if timed else 1, 1)]
    names = [str(r["name"]) for r in rows]
    idx = np.arange(len(rows))
    compact = all(r.get("compact_flops") is not None for r in rows)
    w = 0.27 if compact else 0.4
    ax = axes[0]
    ax.bar(idx - w, [float(r["dense_flops"]) for r in rows], w, label="dense")
    ax.bar(idx, [float(r["sparse_flops"]) for r in rows], w, label="sparse (active weights)")
    if compact:
        ax.bar(
            idx + w,
            [float(r["compact_flops"]) for r in rows],
            w,
            label="dense, empty channels removed",
        )
    ax.set_yscale("log")
    ax.set_xticks(idx, names, rotation=30, ha="right")
    ax.set_ylabel("FLOPs per training step (log scale)")
    ax.set_title("FLOPs per layer")
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    if timed:
        ax = fig.add_subplot(1, 2, 2)
        ax.bar(idx - 0.2, [float(r["dense_ms"]) for r in rows], 0.4, label="dense")
        ax.bar(idx + 0.2, [float(r["sparse_ms"]) for r in rows], 0.4, label="sparse kernels")
        ax.set_xticks(idx, names, rotation=30, ha="right")
        ax.set_ylabel("measured time (ms)")
        ax.set_title("Measured kernel time per layer")
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_selectivity(
    runs: Mapping[str, Mapping[str, SelectivityResult]],
    path: str | os.PathLike[str],
    *,
    bins: int = 20,
    title: str = "Class selectivity per layer",
) -> Path:
    """Histograms of the class selectivity index, one panel per layer, one colour per model.

    ``runs`` maps a model label (e.g. ``"sparse 5%"``, ``"dense"``) to ``{layer: result}``; every
    model must have the same layers. Dead units are left out and counted in the legend; the
    dashed lines are each model's mean over live units.
    """
    labels = list(runs)
    if not labels:
        raise SparseCoreError("selectivity plot: no models given")
    layer_names = list(runs[labels[0]])
    for label in labels[1:]:
        if list(runs[label]) != layer_names:
            raise SparseCoreError(
                f"selectivity plot: model {label!r} has layers {list(runs[label])}, "
                f"model {labels[0]!r} has {layer_names}"
            )
    n = len(layer_names)
    fig = _figure(width=3.6 * n + 0.6, height=3.8)
    edges = [float(e) for e in np.linspace(0.0, 1.0, bins + 1)]
    colors = ["tab:orange", "tab:blue", "tab:green", "tab:red"]
    for i, layer in enumerate(layer_names):
        ax = fig.add_subplot(1, n, i + 1)
        for j, label in enumerate(labels):
            res = runs[label][layer]
            live = res.live
            color = colors[j % len(colors)]
            weights = np.full(live.shape, 100.0 / live.size) if live.size else None
            dead = int(res.dead.sum())
            text = f"{label}: mean {live.mean():.2f}" if live.size else f"{label}: no live units"
            if dead:
                text += f", {dead}/{res.units} dead"
            ax.hist(live, bins=edges, weights=weights, alpha=0.5, color=color, label=text)
            if live.size:
                ax.axvline(float(live.mean()), color=color, linestyle="--", linewidth=1.5)
        ax.set_xlim(0, 1)
        ax.set_xlabel("class selectivity index")
        if i == 0:
            ax.set_ylabel("units (% of live units)")
        ax.set_title(f"{layer} ({runs[labels[0]][layer].units} units)")
        ax.legend(fontsize="x-small", loc="upper right")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)
