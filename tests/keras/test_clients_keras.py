"""The Keras client of the defaults study (benchmarks/clients) runs on this session's backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras

CLIENT = Path(__file__).resolve().parents[2] / "benchmarks" / "clients" / "keras_mnist_convnet.py"


def test_keras_client_runs_with_the_defaults(tmp_path):
    out = tmp_path / "r.json"
    cmd = [
        sys.executable, str(CLIENT), "--backend", keras.backend.backend(), "--data", "embedded",
        "--limit-train", "256", "--epochs", "1", "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["init"] == "ER" and result["config"]["cover_units"] is True
    assert result["momentum_source"] == "Adam's m / (sqrt(v) + epsilon)"
    assert abs(result["density"] - 0.1) < 1e-3
    assert set(result["dead_units"]) == {"conv1", "conv2"}
    assert 0 <= result["final"]["test_acc"] <= 100
