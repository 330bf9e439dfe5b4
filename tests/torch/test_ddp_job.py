"""``sparsecore train`` data-parallel under ``torchrun --standalone --nproc_per_node 2`` (two real
gloo processes): the language-model job stopped after its first epoch and resumed, then an image
job, in one launch. Every rank ends with the same weights and masks and reports the same
validation figures; only rank 0 prints and writes the run folder; the run matches a
single-process run of the same command. Bounded: the launch is killed after 150 s."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsecore.cli import main

WORKER = Path(__file__).with_name("ddp_job_worker.py")
# 33 windows of 64 characters in global batches of 16: 16, 16 and 1 per epoch, so the last batch
# leaves rank 1 without an example (it joins the gradient all-reduce with a stand-in of weight 0)
TINY = ["--data", "embedded", "--limit-train", "33", "--limit-test", "15", "--batch-size", "16",
        "--density", "0.2", "--threads", "1", "--no-progress"]  # fmt: skip
LM = ["train", "--model", "gpt-mini", *TINY, "--epochs", "2"]
IMAGES = ["train", "--model", "lenet300", "--data", "embedded", "--limit-train", "250",
          "--limit-test", "100", "--density", "0.1", "--epochs", "2", "--threads", "1",
          "--no-progress"]  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore::sparsecore.DeadUnitsWarning")


def _digest(tensors: list[torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _torchrun(tmp_path: Path, *runs: list[str]) -> tuple[list[list[dict]], list[str]]:
    """Launch the worker on 2 ranks; each rank's records of ``runs`` and its stdout."""
    results, logs = tmp_path / "results", tmp_path / "logs"
    results.mkdir()
    argv = [arg for run in runs for arg in ["+", *run]][1:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "--log-dir", str(logs), "--redirects", "1"]
    command += [str(WORKER), str(results), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150
    )
    stdout = [
        "".join(p.read_text() for p in sorted(logs.glob(f"**/attempt_*/{r}/stdout.log")))
        for r in range(2)
    ]
    assert done.returncode == 0, done.stdout + done.stderr + "\n".join(stdout)
    records = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert (results / "ops0.log").is_file()
    assert not (results / "ops1.log").exists()  # rank 1 wrote no file of the run folders
    return records, stdout


def test_language_model_and_image_jobs_under_torchrun(tmp_path):
    run, images, single = tmp_path / "lm", tmp_path / "images", tmp_path / "single"
    records, stdout = _torchrun(
        tmp_path,
        [*LM, "--stop-after", "1", "--out", str(run)],
        ["train", "--resume", str(run), "--no-progress"],
        [*IMAGES, "--out", str(images)],
    )
    (first, resumed, image), (first1, resumed1, image1) = records
    # rank 0 prints every line once; rank 1 nothing
    assert stdout[1].strip() == ""
    lines = stdout[0].splitlines()
    assert sum(line.startswith("sparsecore train: gpt-mini") for line in lines) == 2  # and resume
    assert sum("distributed: 2 ranks" in line for line in lines) == 3
    assert "each global batch of 16 split into 8 per rank, 1 thread per rank" in stdout[0]
    for epoch in ("1/2", "2/2"):
        assert sum(f"epoch {epoch}" in line and "valid loss" in line for line in lines) == 1
        assert sum(f"epoch {epoch}" in line and "test loss" in line for line in lines) == 1
    # every rank: the same weights, non-zero patterns and figures, epoch by epoch
    for a, b in [(first, first1), (resumed, resumed1), (image, image1)]:
        assert a["status"] == b["status"] == 0
        assert a["weights"] == b["weights"] and a["patterns"] == b["patterns"]
        assert a["epochs"] == b["epochs"]
        assert all(math.isfinite(e["test_loss"]) for e in a["epochs"])
        assert a["out_dir"] is not None and b["out_dir"] is None  # rank 0 writes
    assert [e["epoch"] for e in first["epochs"]] == [1]
    assert resumed["epochs"][0] == first["epochs"][0]  # the resume reads epoch 1's record
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    assert all(math.isfinite(e["test_bpc"]) for e in resumed["epochs"])

    # the run folder: complete, rank 0's state, masks of exactly the asked density
    for name in ("checkpoint.pt", "summary.json", "mask_updates.json", "telemetry.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["epochs_completed"] == 2
    assert summary["distributed"] == {"ranks": 2, "backend": "gloo", "wrapper": "ddp"}
    assert [e["test_loss"] for e in summary["epochs"]] == [
        e["test_loss"] for e in resumed["epochs"]
    ]
    assert len(json.loads((run / "mask_updates.json").read_text())) == 1  # after epoch 1
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2
    assert _digest(list(ckpt["model"].values())) == resumed["weights"]
    masks = ckpt["sparse"]["masks"]
    total = sum(m.numel() for m in masks)
    assert sum(int(m.sum()) for m in masks) == round(0.2 * total)
    for name, mask in zip(ckpt["sparse"]["names"], masks):
        assert not bool((ckpt["model"][name][~mask] != 0).any()), name

    # the same global batches as one process: the figures agree to rounding (the gradient sums
    # run in another order)
    assert main([*LM, "--out", str(single)]) == 0
    alone = json.loads((single / "summary.json").read_text())
    assert "distributed" not in alone
    for d, s in zip(summary["epochs"], alone["epochs"]):
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)
        assert d["test_loss"] == pytest.approx(s["test_loss"], rel=1e-3)

    # an image model trains the same way
    image_summary = json.loads((images / "summary.json").read_text())
    assert image_summary["completed"] and image_summary["distributed"]["ranks"] == 2
    assert image_summary["final_density"] == pytest.approx(0.1, abs=1e-4)
    assert image["epochs"][-1]["test_loss"] == image_summary["final_test_loss"]
