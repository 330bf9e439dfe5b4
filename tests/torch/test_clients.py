"""The client scripts of the defaults study (benchmarks/clients) run, and say what they ran.

Each runs for a few steps in its own process on the embedded Fashion-MNIST subset (the study
itself reads the full data set), as ``study.py`` calls it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLIENTS = Path(__file__).resolve().parents[2] / "benchmarks" / "clients"
QUICK = ["--data", "embedded", "--limit-train", "256", "--epochs", "1", "--threads", "1"]


def _run(tmp_path: Path, script: str, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, str(CLIENTS / script), *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_torch_mnist_client_default_and_narrowed(tmp_path):
    default = _run(tmp_path, "torch_mnist.py", *QUICK, "--opt", "update_every=2")
    assert default["config"]["init"] == "ER" and default["config"]["revive_dead_units"] is True
    assert default["density"] == pytest.approx(0.1, abs=1e-4)
    assert default["momentum_source"].endswith("Adadelta keeps no momentum")
    assert 0 <= default["final"]["test_acc"] <= 100
    assert set(default["dead_units"]) == {"conv1", "conv2", "fc1"}
    assert [layer["units"] for layer in default["last_update"]["layers"]] == [32, 64, 128, 10]
    # the study's narrowed network has the weight count study.py computes for it
    sys.path.insert(0, str(CLIENTS.parent))
    sys.path.insert(0, str(CLIENTS))
    try:
        import study
    finally:
        sys.path[:2] = []
    width = study.narrow_width("torch_mnist", 0.1)
    narrow = _run(tmp_path, "torch_mnist.py", *QUICK, "--dense", "--width", str(width))
    assert narrow["weights"] == study.weights_at("torch_mnist", width)
    assert abs(narrow["weights"] - 0.1 * default["weights"]) < 0.01 * default["weights"]


def test_gpt2_client_makes_the_blocks_sparse(tmp_path):
    result = _run(tmp_path, "gpt2_tiny.py", "--steps", "2", "--val-blocks", "8", "--threads", "1")
    assert result["sparse_layers"] == [
        f"transformer.h.{i}.{name}.weight"
        for i in range(2)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert result["density"] == pytest.approx(0.2, abs=1e-4)
    assert result["momentum_source"] == "AdamW's exp_avg / (sqrt(exp_avg_sq) + eps)"
    assert result["text"].startswith("pydoc_data.topics") and result["vocab"] > 50
    assert 0 < result["final"]["val_loss"] < 10
