"""One rank of ``sparsecore train`` under torchrun (run by test_ddp_job.py).

Usage: ``torchrun ... ddp_job_worker.py RESULT_DIR ARGS [+ ARGS ...]``: runs the command line's
``main`` (the job of ``sparsecore train``) once per ``+``-separated argument list, as
``torchrun -m sparsecore.cli train ...`` would, one after the other in this launch. Each run's
real result (the TrainResult that ``run_training`` returns on this rank) is kept by wrapping the
function, and written to RESULT_DIR/rankR.json: the exit status, the figures of every epoch, a
digest of every weight and of the pattern of non-zero weights of each sparse layer, and where
the run folder is. Each rank logs its run-folder file operations to RESULT_DIR/opsR.log
(``SPARSECORE_FAULT_LOG``): only rank 0 may have one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def record(status: int, result: Any) -> dict[str, Any]:
    if result is None:
        return {"status": status}
    params = dict(result.model.named_parameters())
    sparse = list(result.summary["layer_densities"])
    keys = ("epoch", "train_loss", "test_loss", "test_acc", "test_bpc", "density")
    return {
        "status": status,
        "epochs": [{k: e.get(k) for k in keys} for e in result.epochs],
        "weights": digest(list(result.model.state_dict().values())),
        "patterns": {name: digest([params[name] != 0]) for name in sparse},
        "out_dir": None if result.out_dir is None else str(result.out_dir),
        "summary_keys": sorted(result.summary),
    }


def main() -> None:
    results_dir = Path(sys.argv[1])
    runs: list[list[str]] = [[]]
    for arg in sys.argv[2:]:
        if arg == "+":
            runs.append([])
        else:
            runs[-1].append(arg)
    rank = int(os.environ["RANK"])
    os.environ["SPARSECORE_FAULT_LOG"] = str(results_dir / f"ops{rank}.log")

    import sparsecore.torch.train as job
    from sparsecore.cli import main as cli_main

    real = job.run_training
    kept: list[Any] = []

    def keep(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        kept.append(result)
        return result

    job.run_training = keep  # the command line imports it from the module when it runs
    out = []
    for argv in runs:
        kept.clear()
        status = cli_main(argv)
        out.append(record(status, kept[0] if kept else None))
        if status != 0:  # the other rank stops too (torchrun ends it): run nothing more
            break
    (results_dir / f"rank{rank}.json").write_text(json.dumps(out))
    if out[-1]["status"] != 0:
        sys.exit(out[-1]["status"])


if __name__ == "__main__":
    main()
