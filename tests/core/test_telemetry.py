"""Run records from a real SparseEngine on NumPy layers: counts, JSON round trip, bad files."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

import sparsecore as sc
from sparsecore.telemetry import (
    RECORD_VERSION,
    TELEMETRY_NAME,
    RunRecord,
    TelemetryError,
    load_run,
    write_tensorboard,
)

NAMES = ["fc1", "fc2", "out"]
SHAPES = [(24, 30), (12, 24), (5, 12)]


def run_engine(
    updates: int = 8, seed: int = 0, nan_at: int | None = None
) -> tuple[sc.SparseEngine, list[list[np.ndarray]]]:
    """A real engine driven by synthetic momentum; returns it and the masks after each update."""
    config = sc.SparseConfig(
        density=0.1,
        update_every=10,
        total_steps=10 * (updates + 1),
        seed=seed,
        on_nonfinite="skip",
    )
    engine = sc.SparseEngine(config, NAMES, SHAPES)
    masks = engine.initial_masks()
    rng = np.random.default_rng(seed)
    weights = [np.where(m, rng.standard_normal(m.shape), 0.0) for m in masks]
    all_masks = [masks]
    for step in range(1, 10 * updates + 1):
        if not engine.due(step):
            continue
        # layer i's momentum scaled by (i + 1): later layers look more important
        moms = [rng.standard_normal(s) * (i + 1) for i, s in enumerate(SHAPES)]
        if nan_at is not None and step == nan_at:
            moms[1][0, 0] = np.nan
        layers = [
            sc.Layer(n, w, m, momentum=mo) for n, w, m, mo in zip(NAMES, weights, masks, moms)
        ]
        result = engine.update(layers, step)
        masks = result.masks
        weights = [np.where(m, rng.standard_normal(m.shape), 0.0) for m in masks]
        all_masks.append(masks)
    return engine, all_masks


def test_record_counts_equal_engine_reports():
    engine, all_masks = run_engine()
    record = RunRecord.from_reports(engine.history)
    assert list(record.layers) == NAMES
    assert record.layers == {n: math.prod(s) for n, s in zip(NAMES, SHAPES)}
    assert len(record.updates) == len(engine.history) == 8
    ever = [np.zeros(s, dtype=bool) | m for s, m in zip(SHAPES, all_masks[0])]
    for upd, report, masks in zip(record.updates, engine.history, all_masks[1:]):
        assert upd.update == report.update and upd.step == report.step
        assert upd.prune_rate == report.prune_rate
        ever = [e | m for e, m in zip(ever, masks)]
        for layer, lr, mask, e in zip(upd.layers, report.layers, masks, ever):
            assert layer.nnz == lr.nnz_after == int(mask.sum())
            assert layer.density == lr.density
            assert (layer.pruned, layer.grown) == (lr.pruned, lr.grown)
            assert (layer.net_pruned, layer.net_grown) == (lr.net_pruned, lr.net_grown)
            assert layer.share == lr.share and layer.importance == lr.importance
            # ever active: counted independently from the masks themselves
            assert layer.ever_active == int(e.sum())
            assert layer.ever_active_fraction == int(e.sum()) / e.size
        assert upd.nnz == engine.target
        assert upd.ever_active_fraction == sum(int(e.sum()) for e in ever) / record.totals()["size"]
    totals = record.totals()
    for key in ("pruned", "grown", "net_pruned", "net_grown"):
        assert totals[key] == sum(getattr(lr, key) for r in engine.history for lr in r.layers)
        for i, name in enumerate(NAMES):
            assert totals["layers"][name][key] == sum(
                getattr(r.layers[i], key) for r in engine.history
            )
    assert totals["nnz"] == engine.target and totals["updates"] == 8
    # sparse momentum moves weights towards the layers with larger momentum
    final = totals["layers"]
    assert final["out"]["density"] > final["fc1"]["density"]
    assert totals["net_pruned"] == totals["net_grown"] > 0
    assert totals["ever_active_fraction"] > 0.1


def test_series_follow_updates():
    engine, _ = run_engine(updates=5)
    record = RunRecord.from_reports(engine.history)
    assert record.series("fc2", "nnz") == [r.layers[1].nnz_after for r in engine.history]
    with pytest.raises(KeyError, match="no layer 'nope'"):
        record.series("nope", "nnz")


def test_json_round_trip(tmp_path):
    engine, _ = run_engine()
    epochs = [{"epoch": 1, "test_acc": 71.5, "train_loss": 0.9}, {"epoch": 2, "test_acc": 80.25}]
    flops = {"layers": [{"name": "fc1", "dense_flops": 1000, "sparse_flops": 100}]}
    record = RunRecord.from_reports(
        engine.history, epochs=epochs, flops=flops, meta={"model": "toy", "method": "sparse"}
    )
    path = record.save(tmp_path / "run.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == "sparsecore-run" and raw["version"] == RECORD_VERSION
    assert raw["totals"]["final_test_acc"] == 80.25
    again = RunRecord.load(path)
    assert again.to_dict() == record.to_dict()
    assert again.updates == record.updates
    assert again.epochs == epochs and again.flops == flops
    assert load_run(path).to_dict() == record.to_dict()


def test_from_report_dicts_as_the_training_job_writes_them(tmp_path):
    engine, _ = run_engine(updates=4)
    dicts = [{"epoch": i + 1, **r.to_dict()} for i, r in enumerate(engine.history)]
    (tmp_path / "mask_updates.json").write_text(json.dumps(dicts))
    summary = {
        "model": "toy",
        "method": "sparse",
        "config": {"density": 0.1, "epochs": 5},
        "num_mask_updates": 4,
        "epochs": [{"epoch": e, "test_acc": 50.0 + e} for e in range(1, 6)],
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    record = load_run(tmp_path)
    direct = RunRecord.from_reports(engine.history)
    assert [u.layers for u in record.updates] == [u.layers for u in direct.updates]
    assert [u.epoch for u in record.updates] == [1, 2, 3, 4]
    assert record.meta["method"] == "sparse" and record.totals()["final_test_acc"] == 55.0
    assert load_run(tmp_path / "summary.json").to_dict() == record.to_dict()
    assert load_run(tmp_path / "mask_updates.json").layers == direct.layers
    # a saved telemetry file in the folder takes precedence
    record.meta["note"] = "saved"
    record.save(tmp_path / TELEMETRY_NAME)
    assert load_run(tmp_path).meta["note"] == "saved"


def test_skipped_update_is_recorded():
    engine, _ = run_engine(updates=4, nan_at=20)
    record = RunRecord.from_reports(engine.history)
    assert [u.skipped for u in record.updates] == [False, True, False, False]
    assert "NaN" in record.updates[1].reason
    totals = record.totals()
    assert totals["skipped_updates"] == 1 and totals["updates"] == 3
    assert len(record.applied) == 3
    assert RunRecord.from_dict(record.to_dict()).updates == record.updates


def test_dense_run_has_epochs_but_no_layers(tmp_path):
    summary = {"method": "dense", "num_mask_updates": 0, "epochs": [{"epoch": 1, "test_acc": 88.0}]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    record = load_run(tmp_path)
    assert record.layers == {} and record.updates == []
    assert record.totals()["best_test_acc"] == 88.0


# -- bad input ----------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    engine, _ = run_engine(updates=3)
    return RunRecord.from_reports(engine.history, epochs=[{"epoch": 1, "test_acc": 70.0}]).save(
        tmp_path / "run.json"
    )


def _edit(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def test_truncated_file_names_file_and_says_truncated(saved):
    text = saved.read_text()
    saved.write_text(text[: len(text) // 2])
    with pytest.raises(
        TelemetryError, match=r"run\.json: not valid JSON \(the file looks truncated\)"
    ):
        load_run(saved)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(TelemetryError, match="empty.json: the file is empty"):
        load_run(empty)
    with pytest.raises(TelemetryError, match="nothere.json: no such file"):
        load_run(tmp_path / "nothere.json")
    with pytest.raises(TelemetryError, match="not a run folder"):
        load_run(tmp_path)


def test_summary_without_its_mask_updates(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"num_mask_updates": 3, "epochs": []}))
    with pytest.raises(
        TelemetryError, match=r"made 3 mask updates but .*mask_updates.json is missing"
    ):
        load_run(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(version=RECORD_VERSION + 1), "version 2 is not readable"),
        (lambda d: d.update(version="1"), "'version' must be an integer"),
        (lambda d: d.update(format="other"), "not a sparsecore run record"),
        (lambda d: d.pop("updates"), "missing field 'updates'"),
        (
            lambda d: d["updates"][1]["layers"][0].pop("nnz"),
            r"updates\[1\], layer 'fc1': missing field 'nnz'",
        ),
        (
            lambda d: d["updates"][0]["layers"][2].update(nnz=-1),
            "layer 'out': nnz must be an integer >= 0, got -1",
        ),
        (
            lambda d: d["updates"][0]["layers"][2].update(nnz=10_000),
            "layer 'out': nnz 10000 exceeds the layer size 60",
        ),
        (
            lambda d: d["updates"][2]["layers"][1].update(
                nnz=d["updates"][2]["layers"][1]["nnz"] + 1
            ),
            "update 3: .* active weights, but earlier updates kept",
        ),
        (lambda d: d["updates"][0]["layers"][0].update(share="x"), "share must be a finite number"),
        (
            lambda d: d["updates"][0]["layers"][0].update(net_grown=10**6, grown=10**6 - 1),
            "net counts",
        ),
        (
            lambda d: d["updates"][0]["layers"][0].update(name="fcX"),
            r"layers \['fcX', 'fc2', 'out'\] differ",
        ),
        (lambda d: d["epochs"][0].update(test_acc=170.0), "test_acc must be a percentage"),
        (lambda d: d["layers"][0].update(size=0), r"layers\[0\].size must be an integer >= 1"),
        (
            lambda d: d["updates"][0]["layers"][0].update(dead_units=25),
            r"dead_units 25 needs units, and at most that many \(units 24\)",
        ),
        (
            lambda d: d["updates"][0]["layers"][0].update(revived=10**6),
            "revived 1000000 exceeds the",
        ),
    ],
)
def test_bad_fields_are_named(saved, change, message):
    _edit(saved, change)
    with pytest.raises(TelemetryError, match=message) as info:
        load_run(saved)
    assert str(saved) in str(info.value)


def test_not_a_record(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(TelemetryError, match="other.json: not a sparsecore run record"):
        load_run(path)
    path.write_text(json.dumps([{"update": 1}]))
    with pytest.raises(TelemetryError, match=r"mask update #1: missing field 'prune_rate'"):
        load_run(path)


# -- TensorBoard -------------------------------------------------------------------------------------
def _read_events(folder: Path) -> list:
    """Parse TFRecord event files (length, crc, payload, crc) with tensorboardX's protobufs."""
    from tensorboardX.proto import event_pb2

    events = []
    for file in sorted(folder.glob("events.out.tfevents.*")):
        data = file.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            events.append(event_pb2.Event.FromString(payload))
            pos += 12 + length + 4
    return events


def test_tensorboard_scalars(tmp_path):
    engine, _ = run_engine(updates=3)
    epochs = [{"epoch": 1, "test_acc": 60.0}, {"epoch": 2, "test_acc": 70.0}]
    record = RunRecord.from_reports(engine.history, epochs=epochs)
    write_tensorboard(record, tmp_path / "tb")
    scalars: dict[str, list[tuple[int, float]]] = {}
    for event in _read_events(tmp_path / "tb"):
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    steps = [r.step for r in engine.history]
    assert [s for s, _ in scalars["density/fc1"]] == steps
    assert [v for _, v in scalars["density/out"]] == pytest.approx(
        [r.layers[2].density for r in engine.history]
    )
    assert [v for _, v in scalars["updates/net_grown"]] == [
        sum(lr.net_grown for lr in r.layers) for r in engine.history
    ]
    assert scalars["epoch/test_acc"] == [(1, 60.0), (2, 70.0)]


def test_numpy_scalar_metrics_are_accepted_and_saved_as_numbers(tmp_path):
    engine, _ = run_engine(updates=2)
    epochs = [{"epoch": 1, "test_acc": np.float32(71.5), "test_loss": np.float64(0.8)}]
    record = RunRecord.from_reports(engine.history, epochs=epochs)
    again = RunRecord.load(record.save(tmp_path / "run.json"))
    assert again.epochs == [{"epoch": 1, "test_acc": 71.5, "test_loss": 0.8}]
    assert again.totals()["final_test_acc"] == 71.5
    bad = [{"epoch": 1, "test_acc": np.bool_(True)}]
    with pytest.raises(TelemetryError, match="test_acc must be a percentage"):
        RunRecord.from_reports(engine.history, epochs=bad)


def test_accuracy_unit_fraction_is_converted_and_percent_fractions_warn():
    engine, _ = run_engine(updates=2)
    fractions = [{"epoch": 1, "test_acc": 0.25, "train_acc": 0.5}, {"epoch": 2, "test_acc": 0.8}]
    record = RunRecord.from_reports(engine.history, epochs=fractions, acc_unit="fraction")
    assert [e["test_acc"] for e in record.epochs] == [25.0, 80.0]
    assert record.epochs[0]["train_acc"] == 50.0 and fractions[0]["test_acc"] == 0.25
    assert record.totals()["final_test_acc"] == 80.0
    with pytest.warns(UserWarning, match="acc_unit='fraction'"):
        RunRecord.from_reports(engine.history, epochs=fractions)  # percent by default
    with pytest.raises(TelemetryError, match=r"epochs\[0\]\.test_acc must be a fraction"):
        RunRecord.from_reports(
            engine.history, epochs=[{"epoch": 1, "test_acc": 25.0}], acc_unit="fraction"
        )
    with pytest.raises(TelemetryError, match="acc_unit must be"):
        RunRecord.from_reports(engine.history, epochs=fractions, acc_unit="%")


def test_the_tensorboard_extra_installs_a_writer_and_the_error_names_it(monkeypatch):
    """``pip install "sparsecore[tensorboard]"`` brings a package write_tensorboard can use;
    without any writer, the error says which extra to install."""
    import builtins
    import re

    from sparsecore import telemetry

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    extra = re.search(rf"^{telemetry.TENSORBOARD_EXTRA} = \[(.*)\]$", pyproject, flags=re.M)
    assert extra is not None and '"tensorboardX' in extra.group(1)

    real_import = builtins.__import__

    def no_writers(name, *args, **kwargs):
        if name.split(".")[0] in ("tensorboard", "tensorboardX", "torch"):
            raise ImportError(f"no module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_writers)
    with pytest.raises(sc.SparseCoreError, match=r"pip install 'sparsecore\[tensorboard\]'"):
        telemetry.require_tensorboard()


def test_dead_units_reach_the_record_and_survive_json(tmp_path):
    """Dead units as the engine reported them; a report of before the count reads as unknown."""
    engine, _ = run_engine(updates=3)
    record = RunRecord.from_reports(engine.history)
    for upd, report in zip(record.updates, engine.history):
        for layer, lr in zip(upd.layers, report.layers):
            assert (layer.units, layer.dead_units, layer.revived) == (
                lr.units,
                lr.dead_units,
                lr.revived,
            )
            assert layer.units == dict(zip(NAMES, SHAPES))[layer.name][0]
    again = RunRecord.load(record.save(tmp_path / "r.json"))
    assert [[(x.units, x.dead_units) for x in u.layers] for u in again.updates] == [
        [(x.units, x.dead_units) for x in u.layers] for u in record.updates
    ]
    assert again.totals()["layers"]["fc1"]["units"] == 24
    old = [r.to_dict() for r in engine.history]
    for r in old:  # a report written before dead units were counted
        for layer in r["layers"]:
            for key in ("units", "dead_units", "revived"):
                del layer[key]
    legacy = RunRecord.from_reports(old)
    # not recorded: 0 units (no layer has none), and null in the file as before
    assert all(x.units == 0 and x.dead_fraction is None for x in legacy.updates[0].layers)
    saved = legacy.to_dict()["updates"][0]["layers"]
    assert all(x["units"] is None and x["dead_units"] is None for x in saved)
