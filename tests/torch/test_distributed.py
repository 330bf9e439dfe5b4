"""DistributedDataParallel, two real processes on gloo: every rank ends with the same masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run_ranks(tmp_path: Path, mode: str) -> list[dict]:
    init = tmp_path / f"init_{mode}"
    outs = [tmp_path / f"rank{r}_{mode}.json" for r in range(2)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), "2", str(init), str(outs[r]), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out.decode()
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.parametrize("mode", ["ddp", "local"])
def test_ranks_end_with_identical_masks(tmp_path, mode):
    a, b = _run_ranks(tmp_path, mode)
    assert a["updates"] == b["updates"] == 3
    assert a["checksum"] == b["checksum"]
    assert a["nnz"] == b["nnz"] and a["weights_zero"] and b["weights_zero"]
    if mode == "ddp":
        assert a["names"] == ["module.0.weight", "module.2.weight"]
        assert a["weight_sum"] == b["weight_sum"]  # DDP keeps weights in step too
    else:
        # different data and no gradient averaging: only the broadcast makes masks agree
        assert a["weight_sum"] != b["weight_sum"]
