"""The launch script of docs/distributed.md, as written, under ``torchrun --nproc_per_node 2``:
FSDP2 (``fully_shard``) then DDP in one launch, four mask updates each, the same density reported by rank 0.
Bounded: torchrun's own processes on gloo, killed after 150 s."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"


def launch_script() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (block,) = [b for b in blocks if b.startswith("# train_sparse.py")]
    return block


def test_torchrun_two_processes(tmp_path):
    script = tmp_path / "train_sparse.py"
    script.write_text(launch_script())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(script), "fsdp", "ddp"]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.findall(r"^(\w+): (\d+) mask updates, density ([0-9.]+)$", done.stdout, re.M)
    assert [mode for mode, _, _ in found] == ["fsdp", "ddp"], done.stdout  # rank 0 prints
    for _, updates, density in found:
        assert int(updates) == 4  # after steps 20, 40, 60 and 80 of 100
        assert abs(float(density) - 0.1) < 5e-4  # the whole layers' density, exact counts
