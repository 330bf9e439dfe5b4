"""The complete example of docs/keras.md runs as written (in a fresh process and folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "keras.md"


def example_code() -> str:
    text = DOC.read_text()
    section = text[text.index("## A complete example") :]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "docs/keras.md: no python block under 'A complete example'"
    return match.group(1)


def test_complete_example_runs(tmp_path):
    code = example_code()
    assert "SparseCallback" in code and "load_model" in code
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "density per epoch: [0.05, 0.05, 0.05, 0.05]" in out
    assert "mask updates: 3" in out
    assert "resumed after 3 mask updates" in out
    assert (tmp_path / "lenet300-sparse.keras").is_file()
    assert (tmp_path / "lenet300-plain.keras").is_file()
    assert "fc1/kernel" in out and "(784, 300)" in out  # the summary table
    accuracy = float(out.rsplit("test accuracy", 1)[1])
    assert accuracy > 0.6  # trained, sparse, on real images
