"""benchmarks/scaling.py runs (one process, a tiny model): its rows hold every measurement, the
model has the size asked for, and the bytes attach keeps per weight are those of its tensors.
No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_scaling_benchmark_runs(tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import scaling
    finally:
        sys.path.remove(str(BENCHMARKS))
    threads = torch.get_num_threads()
    try:
        scaling.main(["--sizes", "0.2", "--ranks", "1", "--repeats", "2", "--seq", "16",
                      "--out", str(tmp_path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    (row,) = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    d, blocks = scaling.shape_for(0.2)
    assert (
        row["sparse_weights"] == scaling.sparse_weights(d, blocks) == 12 * d * d * blocks + d * 256
    )
    assert row["ranks"] == 1 and row["update_backend"] == "numba"
    # float32 SGD with momentum: a mask byte, its int32 copy for the re-masking, ever-active
    assert row["attach_bytes_per_weight_on_rank0"] == 1 + 4 + 1
    for key in ("dense_step", "sparse_step", "update", "floor", "overhead_per_step"):
        assert set(row[key]) == {"median", "min", "max"}
    assert row["update"]["min"] > 0 and row["floor"]["min"] > 0
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert "upd/floor" in capsys.readouterr().out
