"""A run folder is always one consistent state: a real `sparsecore train` job killed (SIGKILL, or
Ctrl-C's SIGINT) at 30 file operations, between every two renames of an epoch's commit, leaves
files of one epoch only, and resuming ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsecore.rundir import CURRENT, RunFolder, RunFolderError, check_run_folder

HARNESS = Path(__file__).with_name("kill_harness.py")


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    work = tmp_path_factory.mktemp("kills")
    out = work / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(work), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_kills_at_every_operation_of_a_commit(killed):
    operations = [op.split(" ", 1)[1] for op in killed["operations"]]
    results = killed["results"]
    kills = [r for r in results if r["killed"] == ["signal", 9]]
    assert len(kills) >= 20 and len(results) >= 25
    # the second epoch's commit: killed before each of its operations, so between every two
    # of its renames (of the state folder, of the `current` link)
    switches = [i for i, op in enumerate(operations) if op == "switch current"]
    second = set(range(switches[0] + 2, switches[1] + 2))
    assert second <= {int(r["point"]) - 1 for r in kills}
    assert {"rename state folder", "switch current", "place link checkpoint.pt"} <= {
        r["operation"].split(" ", 1)[1] for r in kills
    }


def test_every_kill_leaves_one_epoch_and_resume_ends_like_the_uninterrupted_run(killed):
    for r in killed["results"]:
        found = r["after_kill"]
        assert len(set(found.values())) == 1, r  # one epoch's files, or none at all
        assert r["resumed"] == ["exit", 0], r
        assert r["final_ok"], r  # weights, masks, history, metrics, mask updates all equal
        assert r["leftovers"] == [], r  # what the killed commit left was removed


def test_ctrl_c_says_what_was_saved_and_how_to_continue(killed):
    interrupted = [r for r in killed["results"] if r["point"].endswith(":INT")]
    assert len(interrupted) == 4
    for r in interrupted:
        assert r["killed"] == ["exit", 130], r
        saved = r["after_kill"]["checkpoint.pt"]
        (message,) = r["message"]
        assert message.startswith("sparsecore train: interrupted "), r
        if saved == 1:
            assert "in epoch 2; the last checkpoint is after epoch 1; continue with" in message
        else:
            assert saved == 2 and "after epoch 2, whose checkpoint is written" in message
        assert "`sparsecore train --resume " in message


def test_run_folder_layout_and_what_it_refuses(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.current() is None
    for epoch in (1, 2, 3):
        folder.commit({"a.txt": lambda p, e=epoch: p.write_text(f"a{e}")}, tag=epoch)
    assert folder.committed == 3
    assert (tmp_path / "run" / "a.txt").read_text() == "a3"
    assert os.readlink(tmp_path / "run" / "a.txt") == f"{CURRENT}/a.txt"
    # the current state and the one before it are kept, older ones removed
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "a.txt",
        CURRENT,
        "state-000002",
        "state-000003",
    ]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match=r"file: is a file, not a folder"):
        check_run_folder(tmp_path / "file")
    with pytest.raises(RunFolderError, match=r"sub: .*file is a file, not a folder"):
        check_run_folder(tmp_path / "file" / "sub")
