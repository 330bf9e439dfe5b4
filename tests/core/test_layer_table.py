"""The per-layer table: the same rows and renderer serve ``sparsecore report`` and ``summary()``;
a column added to a list appears in that table."""

from __future__ import annotations

import io

import numpy as np

import sparsecore as sc
import sparsecore.layer_table as lt
from sparsecore.reporting import main as report_main
from sparsecore.telemetry import RunRecord

NAMES = ["conv1", "fc1", "fc2"]
SHAPES = [(8, 1, 3, 3), (32, 72), (10, 32)]


def _run(updates: int):
    config = sc.SparseConfig(density=0.2, update_every=10, total_steps=100)
    engine = sc.SparseEngine(config, NAMES, SHAPES)
    masks = engine.initial_masks()
    rng = np.random.default_rng(0)
    for u in range(updates):
        weights = [np.where(m, rng.standard_normal(m.shape), 0.0) for m in masks]
        moms = [rng.standard_normal(s) * (1 + i) for i, s in enumerate(SHAPES)]
        layers = [sc.Layer(n, w, m, momentum=v) for n, w, m, v in zip(NAMES, weights, masks, moms)]
        masks = engine.update(layers, 10 * (u + 1)).masks
    return engine, masks


def _rows(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("layer")))
    return {line.split()[0]: line.split() for line in lines[header + 2 :] if line.split()}


def test_summary_shows_the_live_masks_and_the_last_update():
    engine, masks = _run(updates=2)
    text = lt.summary_text(
        "Run",
        engine.history,
        shapes=dict(zip(NAMES, SHAPES)),
        nnz={n: int(m.sum()) for n, m in zip(NAMES, masks)},
        step=20,
    )
    head, header = text.splitlines()[:2]
    total = sum(int(m.sum()) for m in masks)
    size = sum(m.size for m in masks)
    assert (
        head
        == f"Run: 3 sparse weights, {total} of {size} active (density {total / size:.4f}), step 20, 2 mask updates"
    )
    assert header.split() == [
        "layer", "shape", "size", "active", "density", "ever", "active", "last", "pruned",
        "last", "grown", "share", "dead", "units",
    ]  # fmt: skip
    rows = _rows(text)
    last = engine.history[-1]
    for i, (name, mask) in enumerate(zip(NAMES, masks)):
        row = rows[name]
        shape_cells = len(SHAPES[i])  # "(8," "1," ... split on spaces
        cells = row[1 + shape_cells :]
        report = last.layers[i]
        ever = int(np.asarray(engine.ever_active[i]).sum())
        assert cells == [
            str(mask.size),
            str(int(mask.sum())),
            f"{100 * mask.mean():.2f}%",
            f"{100 * ever / mask.size:.2f}%",
            str(report.pruned),
            str(report.grown),
            f"{100 * report.share:.1f}%",
            f"{report.dead_units}/{report.units}",
        ], name
    totals = last.totals()
    assert rows["all"][1:] == [
        str(size),
        str(total),
        f"{100 * total / size:.2f}%",
        f"{100 * last.extra['ever_active_fraction']:.2f}%",
        str(totals["pruned"]),
        str(totals["grown"]),
        "100.0%",
        f"{sum(x.dead_units for x in last.layers)}/{sum(x.units for x in last.layers)}",
    ]
    assert "(after step 20)" in text.splitlines()[-1]


def test_summary_before_any_update():
    _, masks = _run(updates=0)
    text = lt.summary_text(
        "Run",
        [],
        shapes=dict(zip(NAMES, SHAPES)),
        nnz={n: int(m.sum()) for n, m in zip(NAMES, masks)},
    )
    density = sum(int(m.sum()) for m in masks) / sum(m.size for m in masks)
    assert text.splitlines()[0].endswith(f"(density {density:.4f}), 0 mask updates")
    row = _rows(text)["fc1"]
    # ever active is the initial mask itself; the last-update columns are empty
    assert row[-5:] == [f"{100 * masks[1].mean():.2f}%", "-", "-", "-", "-"]


def test_a_column_added_to_the_list_appears_in_the_report(tmp_path, monkeypatch):
    engine, _ = _run(updates=3)
    record = RunRecord.from_reports(engine.history, meta={"model": "toy"})
    path = record.save(tmp_path / "run.json")
    column = lt.Column("updates", lambda s: "-" if s.last is None else "3x")
    monkeypatch.setattr(lt, "REPORT_COLUMNS", (*lt.REPORT_COLUMNS, column))
    import sparsecore.reporting as reporting

    monkeypatch.setattr(reporting, "REPORT_COLUMNS", lt.REPORT_COLUMNS)
    out = io.StringIO()
    assert report_main([str(path), "--no-plots"], stream=out) == 0
    rows = _rows(out.getvalue())
    assert all(rows[name][-1] == "3x" for name in NAMES)
    assert rows["all"][-1] == "3x"


def test_report_and_summary_rows_agree():
    """Both tables read the same rows: the report's final state is the summary's live one."""
    engine, masks = _run(updates=3)
    record = RunRecord.from_reports(engine.history)
    from_record = lt.layer_stats(record)
    live = lt.layer_stats(
        record,
        shapes=dict(zip(NAMES, SHAPES)),
        nnz={n: int(m.sum()) for n, m in zip(NAMES, masks)},
    )
    for a, b in zip(from_record, live):
        assert (a.name, a.nnz, a.ever_active, a.last) == (b.name, b.nnz, b.ever_active, b.last)
