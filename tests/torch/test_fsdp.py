"""``attach`` on an FSDP2 model (``fully_shard``), real gloo processes (fsdp_worker.py).

On 2 ranks: masks equal a single-process update's bit for bit at every update (given the same
gradients), a whole-batch single-process run agrees to 1e-12 over 12 float64 steps, a
``torch.distributed.checkpoint`` save and resume equals the uninterrupted run bit for bit, and
what the sharded update cannot run is refused; the library's own momentum (SGD without
momentum) and Adam with ``reset_optimizer_state`` give the single-process masks and state. On 3
ranks: the same training, then the 2-rank checkpoint loads (resharded) to the same whole tensors
and trains on to the 2-rank result within the tolerance. Each run is bounded: the process group's timeout is 60 s, a failing rank exits
at once, and the test kills what is left after 150 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("fsdp_worker.py")


def run_ranks(tmp_path: Path, world: int, mode: str, ckpt: Path) -> dict:
    init, out = tmp_path / f"init_{mode}", tmp_path / f"out_{mode}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(init), str(out), str(ckpt), mode]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=150)[0].decode())
    finally:
        for p in procs:  # a hung rank must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return json.loads(out.read_text())


def test_fsdp_attach_checkpoint_and_reshard(tmp_path):
    ckpt = tmp_path / "ckpt" / "step6"
    saved = run_ranks(tmp_path, 2, "save", ckpt)
    assert saved["updates"] == 3 and saved["resumed"] and saved["refused"] == 6
    assert saved["free_max_diff"] <= 1e-12
    assert saved["own_momentum"] == 0.0  # the library's own average, restored exactly
    assert saved["adam_updates"] == 2  # Adam's exp_avg, reset_optimizer_state=True
    assert (ckpt / ".metadata").exists()  # a DCP checkpoint: one file per rank plus metadata
    loaded = run_ranks(tmp_path, 3, "load", ckpt)
    assert loaded["updates"] == 3 and loaded["resharded"]
    assert loaded["free_max_diff"] <= 1e-12
