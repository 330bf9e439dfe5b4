"""DistributedDataParallel, two real processes on gloo: every rank ends with the same masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run_ranks(tmp_path: Path, mode: str, worker: Path = WORKER) -> list[dict]:
    init = tmp_path / f"init_{mode}"
    outs = [tmp_path / f"rank{r}_{mode}.json" for r in range(2)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    extra = [mode] if worker == WORKER else []
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), "2", str(init), str(outs[r]), *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    try:
        for p in procs:
            out, _ = p.communicate(timeout=180)
            assert p.returncode == 0, out.decode()
    finally:
        for p in procs:  # a hung rank must not outlive the test
            if p.poll() is None:
                p.kill()
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.parametrize("mode", ["ddp", "local"])
def test_ranks_end_with_identical_masks(tmp_path, mode):
    a, b = _run_ranks(tmp_path, mode)
    assert a["updates"] == b["updates"] == 3
    assert a["checksum"] == b["checksum"]
    assert a["history"] == b["history"]  # rank 0's reports, recorded on every rank
    assert a["nnz"] == b["nnz"] and a["weights_zero"] and b["weights_zero"]
    if mode == "ddp":
        assert a["names"] == ["module.0.weight", "module.2.weight"]
        assert a["weight_sum"] == b["weight_sum"]  # DDP keeps weights in step too
    else:
        # different data and no gradient averaging: only the broadcast makes masks agree
        assert a["weight_sum"] != b["weight_sum"]


AGREE_WORKER = Path(__file__).with_name("agree_worker.py")


def test_ranks_agree_on_skip_raise_and_uncounted_steps(tmp_path):
    """Plain torch.distributed, NaN on one rank only: all ranks decide alike, none hangs (the
    process group times out after 60 s, so a rank left waiting fails the test)."""
    a, b = _run_ranks(tmp_path, "agree", worker=AGREE_WORKER)

    skip_a, skip_b = a["skip"], b["skip"]
    assert skip_a["history"] == skip_b["history"]  # the same reports on every rank
    skipped = [r for r in skip_a["history"] if r["skipped"]]
    assert [r["step"] for r in skipped] == [4]
    assert skipped[0]["reason"].startswith("rank 1: layer '2.weight': momentum contains NaN")
    assert "not made on any of the 2 ranks" in skipped[0]["reason"]
    assert [r["step"] for r in skip_a["history"]] == [2, 4, 6, 8, 10]
    assert skip_a["warning"] == skip_b["warning"] and len(skip_a["warning"]) == 1
    assert skip_a["masks"] == skip_b["masks"] and skip_a["steps"] == skip_b["steps"] == 10
    assert skip_a["zero_outside"] and skip_b["zero_outside"]

    raise_a, raise_b = a["raise"], b["raise"]
    assert raise_a["error"] == raise_b["error"]
    assert raise_a["error"].startswith(
        "NonFiniteError: rank 0: layer '0.weight': momentum contains NaN or Inf"
    )
    assert raise_a["history"] == raise_b["history"] and len(raise_a["history"]) == 1

    manual_a, manual_b = a["manual"], b["manual"]
    assert manual_a["steps"] == manual_b["steps"] == 7  # the NaN step counted on no rank
    assert manual_a["history"] == manual_b["history"]
    # the due update skipped with the uncounted step comes after the next counted one
    assert [(r["step"], r["skipped"]) for r in manual_a["history"]] == [
        (3, True),
        (3, False),
        (6, False),
    ]
    assert (
        manual_a["history"][0]["skipped"]
        and "rank 1: layer '0.weight': gradient" in (manual_a["history"][0]["reason"])
    )
    assert manual_a["masks"] == manual_b["masks"]

    fail_a, fail_b = a["fail"], b["fail"]
    assert fail_a["error"] == (
        "SparseCoreError: the mask update after step 2 failed on rank(s) [1]; it was not made on "
        "any rank (nothing changed)"
    )
    assert fail_b["error"] == "RuntimeError: growth failed here"
    assert fail_a["history"] == fail_b["history"] == []
    assert fail_a["masks"] == fail_b["masks"]
