"""``sparsecore train``'s mask options (--max-density, --min-density, --redistribution, --growth,
--stop-at): real LeNet-300-100 runs on the embedded Fashion-MNIST subset, checked on what the
masks and the mask-update reports show, against a run without the option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsecore.cli import main

# 400 images, batch 100: 4 steps per epoch; epoch-end mask updates after every epoch but the last.
TINY = ["--limit-train", "400", "--limit-test", "200", "--threads", "1", "--no-progress"]
SPARSE = ["--method", "sparse", "--density", "0.1"]


def _train(run: Path, *args: str) -> int:
    return main(["train", "--data", "embedded", "--out", str(run), *TINY, *args])


def _updates(run: Path) -> list[dict]:
    return json.loads((run / "mask_updates.json").read_text())


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)


def _engine_config(run: Path) -> dict:
    return _checkpoint(run)["sparse"]["engine"]["config"]


def _max_layer_density(run: Path) -> float:
    return max(layer["density"] for u in _updates(run) for layer in u["layers"])


def test_max_density_caps_every_layer(tmp_path):
    assert _train(tmp_path / "free", *SPARSE, "--epochs", "3") == 0
    # without the ceiling the small output layer fills up far beyond 25%
    assert _max_layer_density(tmp_path / "free") > 0.5
    assert _train(tmp_path / "capped", *SPARSE, "--epochs", "3", "--max-density", "0.25") == 0
    run = tmp_path / "capped"
    assert _max_layer_density(run) <= 0.25
    for u in _updates(run):
        assert u["total_nnz"] == round(0.1 * (784 * 300 + 300 * 100 + 100 * 10))
    masks = _checkpoint(run)["sparse"]["masks"]
    assert all(float(m.float().mean()) <= 0.25 for m in masks)
    assert _engine_config(run)["max_density"] == 0.25
    assert json.loads((run / "summary.json").read_text())["config"]["max_density"] == 0.25


def test_min_density_is_a_floor_for_pruning(tmp_path):
    assert _train(tmp_path / "free", *SPARSE, "--epochs", "3") == 0
    fc1 = [u["layers"][0]["density"] for u in _updates(tmp_path / "free")]
    assert min(fc1) < 0.09  # momentum redistribution moves budget out of the first layer
    assert _train(tmp_path / "floor", *SPARSE, "--epochs", "3", "--min-density", "0.09") == 0
    for u in _updates(tmp_path / "floor"):
        assert all(layer["density"] >= 0.09 for layer in u["layers"])
    assert _engine_config(tmp_path / "floor")["min_density"] == 0.09


def test_redistribution_none_keeps_each_layers_count(tmp_path):
    run = tmp_path / "none"
    assert _train(run, *SPARSE, "--epochs", "3", "--redistribution", "none") == 0
    updates = _updates(run)
    assert len(updates) == 2
    for u in updates:
        for layer in u["layers"]:
            assert layer["pruned"] > 0 and layer["grown"] == layer["pruned"]
            assert layer["nnz_after"] == layer["nnz_before"]
    assert _engine_config(run)["redistribution"] == "none"


@pytest.mark.parametrize("mode", ["magnitude", "nonzero"])
def test_redistribution_mode_reaches_the_engine(tmp_path, mode):
    run = tmp_path / mode
    assert _train(run, *SPARSE, "--epochs", "2", "--redistribution", mode) == 0
    assert _engine_config(run)["redistribution"] == mode
    (u,) = _updates(run)
    shares = [layer["share"] for layer in u["layers"]]
    if mode == "nonzero":
        # importance = nnz, and all layers start at 10%: shares proportional to layer sizes
        sizes = [784 * 300, 300 * 100, 100 * 10]
        assert shares == pytest.approx([s / sum(sizes) for s in sizes], rel=1e-3)


def test_growth_momentum_neuron_changes_the_masks(tmp_path):
    assert _train(tmp_path / "plain", *SPARSE, "--epochs", "2") == 0
    args = [*SPARSE, "--epochs", "2", "--growth", "momentum_neuron"]
    assert _train(tmp_path / "neuron", *args) == 0
    assert _engine_config(tmp_path / "neuron")["growth"] == "momentum_neuron"
    assert _engine_config(tmp_path / "plain")["growth"] == "momentum"
    plain = _checkpoint(tmp_path / "plain")["sparse"]["masks"]
    neuron = _checkpoint(tmp_path / "neuron")["sparse"]["masks"]
    # same budgets per layer (growth does not change the split), different positions
    assert [int(m.sum()) for m in plain] == [int(m.sum()) for m in neuron]
    assert not torch.equal(plain[0], neuron[0])


def test_stop_at_freezes_the_masks(tmp_path):
    assert _train(tmp_path / "all", *SPARSE, "--epochs", "4") == 0
    assert [u["epoch"] for u in _updates(tmp_path / "all")] == [1, 2, 3]
    # 16 steps; 0.5 -> no update at or after step 8 (the end of epoch 2)
    assert _train(tmp_path / "half", *SPARSE, "--epochs", "4", "--stop-at", "0.5") == 0
    assert [u["epoch"] for u in _updates(tmp_path / "half")] == [1]
    assert _engine_config(tmp_path / "half")["stop_at"] == 8
    # step-count updates honour it too (every 2 steps -> steps 2, 4, 6 only)
    args = [*SPARSE, "--epochs", "4", "--stop-at", "0.5", "--update-every", "2"]
    assert _train(tmp_path / "steps", *args) == 0
    assert [u["step"] for u in _updates(tmp_path / "steps")] == [2, 4, 6]


def test_mask_options_survive_resume(tmp_path):
    run = tmp_path / "run"
    args = [*SPARSE, "--epochs", "3", "--max-density", "0.3", "--redistribution", "magnitude"]
    assert _train(run, *args, "--stop-after", "1") == 0
    assert main(["train", "--resume", str(run), "--data", "embedded", *TINY]) == 0
    config = json.loads((run / "summary.json").read_text())["config"]
    assert (config["max_density"], config["redistribution"]) == (0.3, "magnitude")
    assert _engine_config(run)["max_density"] == 0.3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-density", "0.05"], "max_density: 0.05 is below density 0.1"),
        (["--max-density", "1.5"], "invalid max_density: 1.5"),
        (["--min-density", "-0.1"], "invalid min_density: -0.1"),
        (["--min-density", "0.5", "--max-density", "0.4"], "invalid min_density: 0.5"),
        (["--stop-at", "1.5"], "invalid stop_at: 1.5"),
        (["--stop-at", "0"], "invalid stop_at: 0.0"),
    ],
)
def test_bad_mask_options_are_reported_and_write_nothing(tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert _train(run, *SPARSE, "--epochs", "1", *args) == 2
    assert message in capsys.readouterr().err
    assert not (run / "checkpoint.pt").exists()


def test_unknown_modes_are_rejected_by_the_parser(tmp_path):
    for flag in ("--redistribution", "--growth"):
        with pytest.raises(SystemExit):
            _train(tmp_path / "run", flag, "bogus")


def test_help_documents_the_mask_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--max-density", "--min-density", "--redistribution", "--growth", "--stop-at"):
        assert flag in text


def test_the_job_runs_the_papers_recipe_and_offers_the_dead_unit_rules(tmp_path):
    assert _train(tmp_path / "plain", *SPARSE, "--epochs", "2") == 0
    config = _engine_config(tmp_path / "plain")
    assert (config["init"], config["growth"], config["cover_units"]) == (
        "uniform",
        "momentum",
        False,
    )
    assert config["revive_dead_units"] is False
    args = [*SPARSE, "--epochs", "2", "--cover-units", "--revive-dead-units"]
    assert _train(tmp_path / "revive", *args) == 0
    config = _engine_config(tmp_path / "revive")
    assert config["cover_units"] is True and config["revive_dead_units"] is True
    (u,) = _updates(tmp_path / "revive")
    assert all(layer["units"] == n for layer, n in zip(u["layers"], (300, 100, 10)))
