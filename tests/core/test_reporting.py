"""``sparsecore report`` on a recorded run: the table, the PNG files, and clear errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sparsecore as sc
from sparsecore.cli import main as cli_main
from sparsecore.reporting import flops_rows, main
from sparsecore.telemetry import RunRecord, load_run

NAMES = ["conv1", "fc1", "fc2"]
SHAPES = [(8, 1, 3, 3), (32, 72), (10, 32)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record_run(folder: Path, *, epochs: int = 4, flops: dict | None = None) -> sc.SparseEngine:
    """Drive a real engine for ``epochs`` epoch-end updates and write the run folder the way
    ``sparsecore train`` does (summary.json + mask_updates.json)."""
    config = sc.SparseConfig(
        density=0.2, update_every=None, update_at_epoch_end=True, total_steps=10 * epochs
    )
    engine = sc.SparseEngine(config, NAMES, SHAPES)
    masks = engine.initial_masks()
    rng = np.random.default_rng(3)
    updates, metrics = [], []
    for epoch in range(1, epochs + 1):
        metrics.append({"epoch": epoch, "test_acc": 60.0 + 5 * epoch, "train_loss": 1.0 / epoch})
        if epoch == epochs:
            break
        weights = [np.where(m, rng.standard_normal(m.shape), 0.0) for m in masks]
        moms = [rng.standard_normal(s) * (1 + i) for i, s in enumerate(SHAPES)]
        layers = [sc.Layer(n, w, m, momentum=v) for n, w, m, v in zip(NAMES, weights, masks, moms)]
        result = engine.update(layers, 10 * epoch)
        masks = result.masks
        updates.append({"epoch": epoch, **result.report.to_dict()})
    summary = {
        "model": "toy",
        "method": "sparse",
        "config": {"density": 0.2, "epochs": epochs},
        "num_mask_updates": len(updates),
        "epochs": metrics,
    }
    if flops is not None:
        summary["flops"] = flops
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "mask_updates.json").write_text(json.dumps(updates))
    return engine


def dense_run(folder: Path, epochs: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": "toy",
        "method": "dense",
        "config": {"density": 1.0, "epochs": epochs},
        "num_mask_updates": 0,
        "epochs": [{"epoch": e, "test_acc": 62.0 + 5 * e} for e in range(1, epochs + 1)],
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _is_png(path: Path) -> tuple[int, int]:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    return image.shape[1], image.shape[0]


def test_report_table_and_plots(tmp_path):
    run = tmp_path / "run"
    engine = record_run(run)
    base = dense_run(tmp_path / "dense")
    out = io.StringIO()
    assert main([str(run), "--baseline", str(base)], stream=out) == 0
    text = out.getvalue()
    totals = RunRecord.from_reports(engine.history).totals()
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.split()}
    for name in NAMES:
        row = lines[name]
        info = totals["layers"][name]
        assert row[1:4] == [str(info["size"]), str(info["nnz"]), f"{100 * info['density']:.2f}%"]
        assert row[5:9] == [str(info[k]) for k in ("pruned", "grown", "net_pruned", "net_grown")]
    assert lines["all"][2] == str(engine.target)
    assert "run: model toy, method sparse, target density 0.2, 4 epochs" in text
    assert "mask updates: 3" in text
    assert "test accuracy (this run): final 80.00% after epoch 4" in text
    assert "test accuracy (baseline): final 82.00% after epoch 4" in text
    expected = ["density", "importance_share", "pruned_grown", "ever_active", "accuracy"]
    for name in expected:
        path = run / "report" / f"{name}.png"
        assert f"plot: {path}" in text
        width, height = _is_png(path)
        assert width >= 600 and height >= 350
    assert not (run / "report" / "flops.png").exists()  # no accounting recorded in this run


def test_report_flops_section_and_other_folder(tmp_path):
    flops = {
        "layers": [
            {
                "name": "conv1",
                "dense_flops": 5.0e6,
                "sparse_flops": 1.0e6,
                "dense_ms": 2.0,
                "sparse_ms": 0.8,
            },
            {
                "name": "fc1",
                "dense_flops": 4.6e5,
                "sparse_flops": 9.2e4,
                "dense_ms": 1.0,
                "sparse_ms": 0.25,
            },
        ]
    }
    run = tmp_path / "run"
    record_run(run, flops=flops)
    rows = flops_rows(load_run(run))
    assert [r["name"] for r in rows] == ["conv1", "fc1"]
    out = io.StringIO()
    assert main([str(run), "--plots", str(tmp_path / "pngs")], stream=out) == 0
    text = out.getvalue()
    assert "5.0x" in text and "4.00x" in text and "2.50x" in text  # FLOP ratio, measured speedups
    _is_png(tmp_path / "pngs" / "flops.png")
    assert not (run / "report").exists()


def test_report_from_json_record_and_save_record(tmp_path):
    run = tmp_path / "run"
    record_run(run, epochs=3)
    saved = tmp_path / "rec" / "run.json"
    saved.parent.mkdir()
    out = io.StringIO()
    assert main([str(run), "--no-plots", "--save-record", str(saved)], stream=out) == 0
    assert not (run / "report").exists()
    assert load_run(saved).to_dict() == load_run(run).to_dict()
    out2 = io.StringIO()
    assert main([str(saved)], stream=out2) == 0
    assert out2.getvalue().splitlines()[:8] == out.getvalue().splitlines()[:8]
    assert (saved.parent / "report" / "density.png").is_file()


def test_report_tensorboard(tmp_path):
    run = tmp_path / "run"
    record_run(run, epochs=3)
    out = io.StringIO()
    assert main([str(run), "--no-plots", "--tensorboard", str(tmp_path / "tb")], stream=out) == 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_dense_run_reports_accuracy_only(tmp_path):
    run = dense_run(tmp_path / "dense")
    out = io.StringIO()
    assert main([str(run)], stream=out) == 0
    assert "mask updates: 0" in out.getvalue()
    assert sorted(p.name for p in (run / "report").iterdir()) == ["accuracy.png"]


def test_bad_input_exits_2_with_message(tmp_path, capsys):
    run = tmp_path / "run"
    record_run(run)
    text = (run / "mask_updates.json").read_text()
    (run / "mask_updates.json").write_text(text[: len(text) // 3])
    assert main([str(run)], stream=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsecore report: error: ")
    assert "mask_updates.json: not valid JSON (the file looks truncated)" in err
    assert not (run / "report").exists()
    assert main([str(tmp_path / "missing")], stream=io.StringIO()) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err


def test_cli_dispatches_report(tmp_path, capsys):
    run = tmp_path / "run"
    record_run(run)
    assert cli_main(["report", str(run), "--no-plots"]) == 0
    assert "mask updates: 3" in capsys.readouterr().out
    assert cli_main(["report", str(tmp_path / "nope")]) == 2


def test_report_command_does_not_import_frameworks(tmp_path):
    run = tmp_path / "run"
    record_run(run)
    code = (
        "import sys; from sparsecore.reporting import main; "
        f"assert main([{str(run)!r}]) == 0; "
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'cupy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize(
    "module", ["sparsecore.telemetry", "sparsecore.selectivity", "sparsecore.plots"]
)
def test_modules_import_light(module):
    code = f"import sys, {module}; assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_docs_table_is_what_report_prints_for_the_recorded_run():
    """docs/reports.md shows the report of the committed LeNet-5 run records, verbatim."""
    from sparsecore.reporting import format_table

    root = Path(__file__).resolve().parents[2]
    results = root / "docs" / "results"
    record = load_run(results / "lenet5_sparse_run.json")
    baseline = load_run(results / "lenet5_dense_run.json")
    page = (root / "docs" / "reports.md").read_text()
    start = page.index("```\nrun: model lenet5") + 4
    shown = page[start : page.index("```", start)]
    printed = format_table(record, baseline)
    # the page leaves out the one-line column legend, which it explains in prose instead
    printed = "\n".join(line for line in printed.splitlines() if not line.startswith("density: "))
    assert shown.strip() == printed.strip()


def test_one_epoch_runs_say_1_epoch_and_the_accuracy_axis_has_whole_epochs(tmp_path):
    from sparsecore.plots import accuracy_figure
    from sparsecore.reporting import format_table

    run = tmp_path / "run"
    record_run(run, epochs=1)
    assert format_table(load_run(run)).splitlines()[0].endswith(", 1 epoch")
    record_run(run, epochs=3)
    record = load_run(run)
    assert format_table(record).splitlines()[0].endswith(", 3 epochs")
    figure = accuracy_figure(record, load_run(dense_run(tmp_path / "dense", epochs=3)))
    ticks = [t for t in figure.axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_the_table_shows_dead_units_and_warns_about_mostly_dead_layers():
    from sparsecore.report import LayerReport, UpdateReport
    from sparsecore.reporting import dead_unit_warnings, format_table
    from sparsecore.telemetry import RunRecord

    def layer(name: str, dead: int) -> LayerReport:
        return LayerReport(name, 40, 4, 4, 2, 2, 2, 2, 0.1, 0.5, 36, units=8, dead_units=dead)

    record = RunRecord.from_reports([UpdateReport(1, 0.5, (layer("a", 5), layer("b", 4)), step=10)])
    table = format_table(record)
    header, _, row_a, row_b, row_all = table.splitlines()[3:8]
    assert header.split()[-2:] == ["dead", "units"]
    assert (
        row_a.split()[-1] == "5/8" and row_b.split()[-1] == "4/8" and row_all.split()[-1] == "9/16"
    )
    warnings = dead_unit_warnings(record)
    assert len(warnings) == 1 and warnings[0].startswith("warning: layer 'a': 5 of 8 output units")
    assert warnings[0] in table  # only 'a': 4 of 8 is not most
