"""One data model for what an update did, and the old import paths of the records package.

The engine's reports and a run record's updates are the same classes (``UpdateReport`` and
``LayerReport``), so every count has one name; run records written by earlier versions read
and write back unchanged; the data model's old names still import.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import sparsecore as sc
from sparsecore.records import LayerReport, RunRecord, UpdateReport, load_run
from sparsecore.records.run_record import _json_safe

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
NAMES = ["fc1", "fc2", "out"]
SHAPES = [(24, 30), (12, 24), (5, 12)]


def run_engine(updates: int) -> sc.SparseEngine:
    """A real engine driven by synthetic momentum for ``updates`` mask updates."""
    config = sc.SparseConfig(density=0.1, update_every=10, total_steps=10 * (updates + 1))
    engine = sc.SparseEngine(config, NAMES, SHAPES)
    masks = engine.initial_masks()
    rng = np.random.default_rng(0)
    for step in range(10, 10 * updates + 1, 10):
        weights = [np.where(m, rng.standard_normal(m.shape), 0.0) for m in masks]
        moms = [rng.standard_normal(s) * (i + 1) for i, s in enumerate(SHAPES)]
        layers = [sc.Layer(*args) for args in zip(NAMES, weights, masks, moms)]
        masks = engine.update(layers, step).masks
    return engine


def test_a_record_holds_the_engines_reports_under_the_same_names():
    engine = run_engine(updates=3)
    record = RunRecord.from_reports(engine.history, epochs=[{"epoch": 1}])
    for upd, report in zip(record.updates, engine.history):
        assert type(upd) is UpdateReport and type(report) is UpdateReport
        assert (upd.update, upd.step, upd.prune_rate) == (
            report.update,
            report.step,
            report.prune_rate,
        )
        assert upd.total_nnz == report.total_nnz and upd.totals() == report.totals()
        for layer, lr in zip(upd.layers, report.layers):
            assert type(layer) is LayerReport
            # the record adds the ever-active count the engine keeps in ``extra``
            assert layer.ever_active == report.extra["ever_active"][NAMES.index(layer.name)]
            for key in ("nnz_before", "nnz_after", "pruned", "grown", "net_pruned", "net_grown"):
                assert getattr(layer, key) == getattr(lr, key)
            assert layer.nnz == layer.nnz_after  # the files' key reads the same count
    # a record read back from its JSON is equal, field for field
    again = RunRecord.from_dict(json.loads(json.dumps(_json_safe(record.to_dict()))))
    assert again.updates == record.updates


def test_an_engine_report_round_trips_through_its_dict_unchanged():
    engine = run_engine(updates=2)
    for report in engine.history:
        data = report.to_dict()
        # no new keys in mask_updates.json or a checkpoint's history
        assert "epoch" not in data and all("ever_active" not in x for x in data["layers"])
        assert UpdateReport.from_dict(json.loads(json.dumps(data))) == report


@pytest.mark.parametrize("name", ["lenet5_sparse_run.json", "lenet5_dense_run.json"])
def test_a_record_of_an_earlier_version_reads_and_writes_back(name, tmp_path):
    path = RESULTS / name
    before = json.loads(path.read_text())
    record = load_run(path)
    after = json.loads(record.save(tmp_path / name).read_text())
    # counts this version writes that the file's version did not have yet: null (not recorded)
    for upd in after["updates"]:
        for layer in upd["layers"]:
            for key in ("units", "dead_units", "revived", "ablated"):
                assert layer.pop(key) is None
    for layer in after["totals"]["layers"].values():
        assert (layer.pop("units"), layer.pop("dead_units"), layer.pop("ablated_units")) == (
            None,
            None,
            None,
        )
        assert layer.pop("revived") == 0
    assert after == before


def test_the_old_names_of_the_data_model_still_import():
    from sparsecore.report import LayerReport as OldLayerReport
    from sparsecore.report import UpdateReport as OldUpdateReport
    from sparsecore.telemetry import LayerUpdate, UpdateRecord
    from sparsecore.telemetry import RunRecord as OldRunRecord

    assert OldUpdateReport is UpdateRecord is UpdateReport is sc.UpdateReport
    assert OldLayerReport is LayerUpdate is LayerReport is sc.LayerReport
    assert OldRunRecord is RunRecord
