"""``sparsecore train --framework keras``: the Keras job behind the main command."""

from __future__ import annotations

import json

import keras
import numpy as np

from sparsecore.cli import main
from sparsecore.keras import SparseMask


def test_train_keras_sparse_writes_summary_and_model(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--framework", "keras", "--method", "sparse", "--epochs", "2"]
    args += [
        "--limit-train",
        "1000",
        "--limit-test",
        "300",
        "--out",
        str(out),
        "--data",
        "embedded",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["framework"] == "keras" and summary["completed"]
    assert summary["final_density"] == 0.05
    assert summary["final_measured_density"] <= 0.05
    assert summary["num_mask_updates"] == 1  # after epoch 1, none after the last
    assert len(summary["epochs"]) == 2 and 0 <= summary["final_test_acc"] <= 100
    model = keras.models.load_model(out / "model.keras")
    masks = [layer.kernel.constraint for layer in model.layers if hasattr(layer, "kernel")]
    assert all(isinstance(m, SparseMask) for m in masks) and len(masks) == 3
    total = sum(int(m.mask_numpy().sum()) for m in masks)
    size = sum(int(np.prod(m.shape)) for m in masks)
    assert total == round(0.05 * size)
    assert "final test accuracy" in capsys.readouterr().out
    # a second run into the same folder is refused unless --overwrite
    assert main(args) == 2


def test_train_keras_dense_and_bad_options(tmp_path, capsys):
    out = tmp_path / "dense"
    args = ["train", "--framework", "keras", "--method", "dense", "--epochs", "1"]
    args += ["--limit-train", "500", "--limit-test", "200", "--out", str(out), "--data", "embedded"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_density"] == 1.0 and summary["num_mask_updates"] == 0
    assert (
        main(["train", "--framework", "keras", "--model", "vgg", "--out", str(tmp_path / "v")]) == 2
    )
    assert "no Keras version" in capsys.readouterr().err
    assert main(["train", "--framework", "keras", "--resume", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_train_keras_takes_the_mask_options(tmp_path):
    """The Keras job takes the same mask options as the PyTorch one (one shared recipe)."""
    out = tmp_path / "erk"
    args = ["train", "--framework", "keras", "--epochs", "3", "--data", "embedded"]
    args += ["--limit-train", "1000", "--limit-test", "200", "--out", str(out)]
    args += ["--init", "ERK", "--growth", "momentum_neuron", "--max-density", "0.5"]
    assert main([*args, "--progress"]) == 2  # no live progress line in the Keras job
    assert main([*args, "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    assert (config["init"], config["growth"], config["max_density"]) == (
        "ERK",
        "momentum_neuron",
        0.5,
    )
    assert summary["num_mask_updates"] == 2
    # fc3 (100 -> 10) would become fully dense after the first update without the ceiling
    for epoch in summary["epochs"]:
        assert max(epoch["layer_densities"].values()) <= 0.5
    assert summary["epochs"][-1]["layer_densities"]["fc3/kernel"] == 0.5
    assert summary["final_measured_density"] == 0.05


def test_train_keras_checks_out_and_images_before_training(tmp_path, capsys):
    """--out naming a file, or images of another size: one line, exit 2, before any training;
    a finished run's folder holds model, summary and run record of the same commit."""
    (tmp_path / "file").write_text("x")
    base = ["train", "--framework", "keras", "--epochs", "1", "--data", "embedded"]
    assert main([*base, "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "file: is a file, not a folder (--out names the run folder)"
    )
    assert main([*base, "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err

    from sparsecore.datasets import FASHION_MNIST_FILES, write_idx

    data = tmp_path / "fm32"
    data.mkdir()
    for key, stem in FASHION_MNIST_FILES.items():
        n = 100 if "train" in key else 20
        write_idx(data / stem, np.zeros((n, 32, 32) if "images" in key else n, dtype=np.uint8))
    args = ["train", "--framework", "keras", "--data", str(data), "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "images are 32x32 pixels; model lenet300 takes 28x28" in err[0]
    assert not (tmp_path / "r").exists()


def test_train_keras_ctrl_c_says_nothing_was_saved(tmp_path):
    """A real SIGINT in the middle of the Keras job (sent when epoch 1's line is written):
    TrainingInterrupted says where it stopped (the command prints it and exits with 130, as the
    PyTorch job's tests check), and the run folder gets nothing."""
    import io
    import os
    import signal

    import pytest

    from sparsecore.datasets import load_embedded_fashion_mnist
    from sparsecore.keras.train import KerasTrainConfig, run_training
    from sparsecore.recipe import TrainingInterrupted

    class CtrlCAfterEpochOne(io.StringIO):
        def write(self, text: str) -> int:
            if text.startswith("epoch 1/"):
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(text)

    cfg = KerasTrainConfig(epochs=5, limit_train=200, limit_test=50)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:
        run_training(
            cfg, dataset=load_embedded_fashion_mnist(), out_dir=out, stream=CtrlCAfterEpochOne()
        )
    assert info.value.message() == (
        "interrupted in epoch 2; this job writes its results when it ends, so nothing was saved"
    )
    assert not (out / "summary.json").exists()
