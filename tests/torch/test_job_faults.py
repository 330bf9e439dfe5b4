"""`sparsecore train` never ends in a traceback for something the user did, a resumed run is the
run that was saved (its options and its data) or it is refused, and a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsecore.cli import main
from sparsecore.datasets import FASHION_MNIST_FILES, load_embedded_fashion_mnist, write_idx
from sparsecore.rundir import FAULT_AT

TINY = ["--limit-train", "200", "--limit-test", "100", "--threads", "1", "--no-progress"]


def _train(out: Path, *args: str) -> int:
    return main(["train", "--data", "embedded", "--out", str(out), *TINY, *args])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _idx_folder(path: Path, images: np.ndarray, n_train: int = 300) -> Path:
    sub = load_embedded_fashion_mnist()
    path.mkdir()
    arrays = {
        "train_images": images[:n_train],
        "train_labels": sub.train_labels[:n_train].astype("uint8"),
        "test_images": images[n_train : n_train + 100],
        "test_labels": sub.test_labels[:100].astype("uint8"),
    }
    for key, stem in FASHION_MNIST_FILES.items():
        write_idx(path / stem, arrays[key])
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch sparse run on the embedded data."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert _train(run, "--epochs", "2", "--density", "0.1") == 0
    return run


# -- the run folder, the data and the checkpoint that --out, --data and --resume name ------------


def test_out_naming_a_file_or_a_path_below_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert _train(tmp_path / "file", "--epochs", "1") == 2
    assert _one_error_line(capsys).endswith(
        "file: is a file, not a folder (--out names the run folder)"
    )
    assert _train(tmp_path / "file" / "run", "--epochs", "1") == 2
    line = _one_error_line(capsys)
    assert f"{tmp_path / 'file'} is a file, not a folder" in line


def test_resume_of_a_truncated_or_foreign_checkpoint(finished, tmp_path, capsys):
    data = (finished / "checkpoint.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    assert main(["train", "--resume", str(truncated)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"sparsecore train: error: {truncated}: not a readable checkpoint")

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert main(["train", "--resume", str(foreign)]) == 2
    assert "foreign.pt: not a sparsecore checkpoint (field 'config' is missing)" in (
        _one_error_line(capsys)
    )

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04this is not a pickle at all")
    assert main(["train", "--resume", str(garbage)]) == 2
    assert "garbage.pt: not a" in _one_error_line(capsys)


class _RunsCode:
    """A pickle that would run code when loaded without weights_only (it writes a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from a checkpoint ran"))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys, how):
    marker = tmp_path / "ran.txt"
    evil = tmp_path / "run" / "checkpoint.pt"
    evil.parent.mkdir()
    payload = {"config": {}, "epoch": 1, "model": _RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    assert main(["train", "--resume", str(evil.parent)]) == 2
    line = _one_error_line(capsys)
    assert "not a sparsecore checkpoint: it holds Python objects other than tensors" in line
    assert "no code in it ran" in line
    assert not marker.exists()
    # the same file through plain pickle would have run it: the test's payload is real
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()


def test_idx_header_whose_dimensions_overflow(tmp_path, capsys):
    data = _idx_folder(tmp_path / "fm", load_embedded_fashion_mnist().train_images)
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2**32 - 1, 2**32 - 1, 2**32 - 1)
    (data / FASHION_MNIST_FILES["train_images"]).write_bytes(header + b"\x00" * 64)
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--epochs", "1"])
    assert rc == 2
    line = _one_error_line(capsys)
    assert "train-images-idx3-ubyte: truncated data: header shape (4294967295, 4294967295" in line


def test_images_of_the_wrong_size_for_the_model(tmp_path, capsys):
    big = np.zeros((400, 32, 32), dtype=np.uint8)
    data = _idx_folder(tmp_path / "fm32", big)
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--epochs", "1"])
    assert rc == 2
    line = _one_error_line(capsys)
    assert line.endswith(
        "fm32/train-images-idx3-ubyte: images are 32x32 pixels; model lenet300 takes 28x28 "
        "Fashion-MNIST images"
    )
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_diverging_loss_ends_in_one_line(tmp_path, capsys):
    assert _train(tmp_path / "r", "--epochs", "1", "--lr", "1e20", "--method", "dense") == 2
    assert "training loss became" in _one_error_line(capsys)
    # finite (huge) training losses but weights that make the test loss NaN: refused too, where
    # the run used to be reported as completed with a NaN test loss
    assert _train(tmp_path / "r2", "--epochs", "1", "--lr", "1e6", "--method", "dense") == 2
    assert _one_error_line(capsys).endswith(
        "test loss became nan after epoch 1 (lr 1e+06); lower --lr"
    )


def test_ctrl_c_before_the_first_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(FAULT_AT, "1:INT")  # Ctrl-C at the first file operation of the job
    assert _train(tmp_path / "r", "--epochs", "2") == 130
    assert _one_error_line(capsys) == (
        "sparsecore train: interrupted in epoch 1; no checkpoint was written yet, so start the "
        "run again"
    )


# -- a resumed run is the run that was saved ---------------------------------------------------


def _final(run: Path) -> tuple[dict, list]:
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    return ckpt["model"], json.loads((run / "mask_updates.json").read_text())


def test_resume_without_data_uses_the_recorded_data(finished, tmp_path, capsys):
    split = tmp_path / "split"
    assert _train(split, "--epochs", "2", "--density", "0.1", "--stop-after", "1") == 0
    capsys.readouterr()
    # no --data: the embedded subset the checkpoint records, not the default search (which
    # finds the full Fashion-MNIST where the Debian package is installed)
    assert main(["train", "--resume", str(split), "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "dataset: fashion-mnist-subset" in out and "resumed after epoch 1" in out
    (a, updates_a), (b, updates_b) = _final(finished), _final(split)
    assert all(torch.equal(a[k], b[k]) for k in a) and updates_a == updates_b
    summary = json.loads((split / "summary.json").read_text())
    assert summary["dataset"]["name"] == "fashion-mnist-subset"
    assert summary["dataset"]["fingerprint"]["train_size"] == 6000
    ckpt = torch.load(split / "checkpoint.pt", weights_only=True)
    assert ckpt["data"]["source"] == "embedded"


def test_resume_with_other_data_is_refused_field_by_field(finished, tmp_path, capsys):
    other = _idx_folder(tmp_path / "fm", load_embedded_fashion_mnist().train_images)
    rc = main(["train", "--resume", str(finished), "--data", str(other), "--epochs", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{finished / 'checkpoint.pt'}: the data differ from the checkpoint's" in err
    assert "\n  data name: 'fashion-mnist-subset' (checkpoint) -> 'fashion-mnist' (now)" in err
    assert "\n  data train_size: 6000 (checkpoint) -> 300 (now)" in err
    assert "\n  data train_sha256: '" in err
    # options: one line per field, old and new; a shorter run is refused too
    rc = main(["train", "--resume", str(finished), "--epochs", "1", "--density", "0.2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "\n  density: 0.1 (checkpoint) -> 0.2 (given)" in err
    assert "\n  epochs: 2 (checkpoint) -> 1 (given): a run can be extended, not shortened" in err


def test_more_epochs_extend_a_finished_run(finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "extended"
    shutil.copytree(finished, run, symlinks=True)
    capsys.readouterr()
    rc = main(["train", "--resume", str(run), "--epochs", "4", "--no-progress", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "extended from 2 to 4 epochs" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["epochs_completed"] == 4
    assert summary["config"]["epochs"] == 4 and summary["schedule_epochs"] == 2
    epochs = summary["epochs"]
    # the learning rate stays at its last value (both decays were in the first two epochs)
    assert [e["lr"] for e in epochs] == pytest.approx([0.1, 0.01, 0.001, 0.001])
    updates = json.loads((run / "mask_updates.json").read_text())
    # updates after epochs 1, 2 and 3 (none after the new last); past the original schedule's
    # end the prune rate is its final value
    assert [u["epoch"] for u in updates] == [1, 2, 3]
    assert updates[0] == _final(finished)[1][0]
    assert updates[1]["prune_rate"] == updates[2]["prune_rate"] == pytest.approx(0.005)
    assert summary["final_density"] == pytest.approx(0.1, abs=1e-6)
