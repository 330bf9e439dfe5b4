"""Run by test_run_folder.py: a `sparsecore train` job killed at many file operations.

Usage: kill_harness.py WORKDIR OUT_JSON. The points (SPARSECORE_FAULT_AT values) are chosen from
the reference run's log of file operations (:func:`choose_points`): every operation of the second
epoch's commit (a previous state exists; between every two renames), a few of the first and the
last commit's, with SIGKILL, and SIGINT at four of them. This process imports everything and runs
the uninterrupted
reference job once (which also logs the file operations); every other job runs in a child forked
from it (a real process, killed by a real SIGKILL or SIGINT), so that none pays for the imports
again. For each point: the killed job, a check that the run folder holds one epoch's files (or
none), then `--resume` (or, if no checkpoint was written, the same command again) in another
child, and the final weights, masks, metrics and mask updates compared with the reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)

from sparsecore.cli import main  # noqa: E402 (after the thread count)
from sparsecore.rundir import FAULT_AT, FAULT_LOG  # noqa: E402

ARGS = [
    "train",
    "--data",
    "embedded",
    "--limit-train",
    "200",
    "--limit-test",
    "100",
    "--epochs",
    "3",
    "--density",
    "0.1",
    "--threads",
    "1",
    "--no-progress",
]
FILES = ("checkpoint.pt", "summary.json", "mask_updates.json", "telemetry.json")
TIMES = ("epoch_time_s", "wall_time_s")


def _quiet_main(argv: list[str], log: Path) -> int:
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return main(argv)


def in_child(fn, *args) -> tuple[str, int]:
    """Run ``fn(*args)`` in a forked child; ("exit", status) or ("signal", number)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = int(fn(*args))
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "signal", os.WTERMSIG(status)
    return "exit", os.WEXITSTATUS(status)


def killed_job(out: Path, point: str, log: Path) -> int:
    os.environ[FAULT_AT] = point
    return _quiet_main([*ARGS, "--out", str(out)], log)


def resumed_job(out: Path, log: Path) -> int:
    if (out / "checkpoint.pt").exists():
        return _quiet_main(["train", "--resume", str(out), "--no-progress", "--threads", "1"], log)
    return _quiet_main([*ARGS, "--out", str(out)], log)


def consistent(out: Path) -> dict:
    """What a reader finds through the run folder's names: the epoch of each file (None where
    there is none) and whether mask_updates.json is the checkpoint's list."""
    found: dict = {name: None for name in FILES}
    if (out / "checkpoint.pt").exists():
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        found["checkpoint.pt"] = int(ckpt["epoch"])
    if (out / "summary.json").exists():
        found["summary.json"] = json.loads((out / "summary.json").read_text())["epochs_completed"]
    if (out / "telemetry.json").exists():
        found["telemetry.json"] = len(json.loads((out / "telemetry.json").read_text())["epochs"])
    if (out / "mask_updates.json").exists():
        updates = json.loads((out / "mask_updates.json").read_text())
        found["mask_updates.json"] = (
            found["checkpoint.pt"]
            if (found["checkpoint.pt"] is not None and updates == ckpt["mask_updates"])
            else "differs from the checkpoint's"
        )
    return found


def choose_points(operations: list[str]) -> list[str]:
    """Every operation of the second commit; in the first, its first operation, the rename of
    its state, its first link, the switch and the operation after; in the last, the rename, the
    switch and the removal of the old state. SIGINT at four points of the second commit."""
    names = [op.split(" ", 1)[1] for op in operations]
    switches = [i for i, n in enumerate(names) if n == "switch current"]
    first, second = switches[0], switches[1]
    commit2 = list(range(first + 2, second + 2))  # from its first operation to the fsync after
    chosen = [0, names.index("rename state folder"), names.index("place link checkpoint.pt")]
    chosen += [first, first + 1, *commit2]
    last = len(names) - 1 - names[::-1].index("rename state folder")
    chosen += [last, switches[-1], len(names) - 1]
    points = [str(i + 1) for i in sorted(set(chosen))]
    interrupted = [commit2[1], commit2[0] + names[commit2[0] :].index("rename state folder")]
    interrupted += [second, second + 1]
    return points + [f"{i + 1}:INT" for i in interrupted]


def final_state(out: Path) -> dict:
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "model": ckpt["model"],
        "masks": ckpt["sparse"]["masks"],
        "history": ckpt["sparse"]["engine"]["history"],
        "metrics": [{k: v for k, v in e.items() if k not in TIMES} for e in summary["epochs"]],
        "mask_updates": json.loads((out / "mask_updates.json").read_text()),
        "completed": summary["completed"],
    }


def same(a: dict, b: dict) -> bool:
    return (
        a.keys() == b.keys()
        and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        and all(torch.equal(x, y) for x, y in zip(a["masks"], b["masks"]))
        and a["history"] == b["history"]
        and a["metrics"] == b["metrics"]
        and a["mask_updates"] == b["mask_updates"]
        and a["completed"] == b["completed"] is True
    )


def main_harness() -> None:
    work, out_json = Path(sys.argv[1]), Path(sys.argv[2])
    reference = work / "reference"
    os.environ[FAULT_LOG] = str(work / "operations.log")
    assert _quiet_main([*ARGS, "--out", str(reference)], work / "reference.log") == 0
    del os.environ[FAULT_LOG]
    operations = (work / "operations.log").read_text().splitlines()
    points = choose_points(operations)
    want = final_state(reference)
    results = []
    for point in points:
        out = work / f"run-{point.replace(':', '-')}"
        log = work / f"run-{point.replace(':', '-')}.log"
        how = in_child(killed_job, out, point, log)
        after_kill = consistent(out)
        message = log.read_text().strip().splitlines()[-1:] if log.exists() else []
        resumed = in_child(resumed_job, out, work / "resumed.log")
        final_ok = resumed == ("exit", 0) and same(final_state(out), want)
        leftovers = sorted(
            p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")
        )
        results.append(
            {
                "point": point,
                "operation": operations[int(point.split(":")[0]) - 1],
                "killed": how,
                "after_kill": after_kill,
                "message": message,
                "resumed": resumed,
                "final_ok": final_ok,
                "leftovers": leftovers,
            }
        )
        shutil.rmtree(out)
    out_json.write_text(json.dumps({"operations": operations, "results": results}, indent=1))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main_harness()
