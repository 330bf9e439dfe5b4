"""``sparsecore train`` writes a run record; ``sparsecore report`` reads it: real SGD, real images."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from sparsecore.cli import main
from sparsecore.telemetry import RunRecord, load_run

TINY = ["--limit-train", "300", "--limit-test", "200", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    run, tb = root / "sparse", root / "tb"
    args = ["train", "--data", "embedded", "--out", str(run), *TINY, "--model", "lenet5"]
    assert main([*args, "--epochs", "3", "--density", "0.1", "--tensorboard", str(tb)]) == 0
    return run, tb


def test_train_writes_a_run_record_equal_to_its_reports(sparse_run):
    run, _ = sparse_run
    record = RunRecord.load(run / "telemetry.json")
    updates = json.loads((run / "mask_updates.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert len(record.updates) == len(updates) == 2  # epoch ends 1 and 2, none after the last
    assert list(record.layers) == ["conv1.weight", "conv2.weight", "fc3.weight", "fc4.weight"]
    for upd, raw in zip(record.updates, updates):
        assert upd.epoch == raw["epoch"] and upd.step == raw["step"]
        for layer, lr in zip(upd.layers, raw["layers"]):
            assert (layer.nnz, layer.pruned, layer.grown) == (
                lr["nnz_after"],
                lr["pruned"],
                lr["grown"],
            )
            assert (layer.net_pruned, layer.net_grown) == (lr["net_pruned"], lr["net_grown"])
            assert layer.ever_active is not None and layer.ever_active >= layer.nnz
    assert [e["test_acc"] for e in record.epochs] == [e["test_acc"] for e in summary["epochs"]]
    assert record.meta["method"] == "sparse" and record.meta["model"] == "lenet5"
    # FLOP accounting from the final masks: per layer, sparse/dense FLOPs = nnz / size
    flops = {row["name"]: row for row in record.flops["layers"]}
    assert set(flops) == {"conv1", "conv2", "fc3", "fc4"}
    final = record.updates[-1]
    for name, row in flops.items():
        layer = final.layer(f"{name}.weight")
        assert row["sparse_forward"] * layer.size == row["dense_forward"] * layer.nnz
        assert row["compact_flops"] <= row["dense_flops"]
    assert flops["fc4"]["dense_forward"] == 2 * 100 * 500 * 10  # batch 100, 500 -> 10


def test_report_on_the_recorded_run(sparse_run, capsys, tmp_path):
    run, _ = sparse_run
    dense = tmp_path / "dense"
    base = ["train", "--data", "embedded", "--out", str(dense), *TINY, "--model", "lenet5"]
    assert main([*base, "--method", "dense", "--epochs", "3"]) == 0
    capsys.readouterr()
    assert main(["report", str(run), "--baseline", str(dense), "--plots", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "run: model lenet5, method sparse, target density 0.1, 3 epochs" in out
    assert "mask updates: 2" in out
    assert "test accuracy (baseline)" in out and "FLOPs of one training step" in out
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == [
        "accuracy.png",
        "density.png",
        "ever_active.png",
        "flops.png",
        "importance_share.png",
        "pruned_grown.png",
    ]
    # a dense run has no mask updates and no FLOP section, and reports its accuracy
    record = load_run(dense)
    assert record.updates == [] and record.flops is None and len(record.epochs) == 3


def test_tensorboard_events_written_at_the_end(sparse_run):
    from tensorboardX.proto import event_pb2

    _, tb = sparse_run
    tags = set()
    for file in tb.glob("events.out.tfevents.*"):
        data = file.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            pos += 12 + length + 4
    assert {"density/conv1.weight", "epoch/test_acc", "updates/net_grown"} <= tags
