"""A run folder that always holds one consistent state, whenever the job is stopped.

The training jobs write several files per epoch (checkpoint, summary, mask updates, telemetry).
Replaced one after another, a kill between two replacements leaves a checkpoint of epoch 2 beside
JSON files of epoch 1. Here each commit writes the whole set into a new folder ``state-NNNNNN``,
flushes every file and the folder to disk (fsync), renames it into place, and then switches one
symbolic link, ``current``, to it with an atomic rename: that rename is the commit point. The
names users read (``run/summary.json``, ``run/checkpoint.pt``, ...) are links to
``current/<name>``, so every file a reader opens comes from the same commit, and a reader that
wants several files resolves ``current`` once (:meth:`RunFolder.current`). The previous state is
kept until the next commit, for readers that resolved ``current`` just before a switch; leftovers
of an interrupted commit (a ``.tmp`` folder or link, a state never made current) are removed by the
next job in the folder.

For tests, ``SPARSECORE_FAULT_AT=N`` (or ``N:INT``) makes the process kill itself with SIGKILL
(SIGINT) just before the N-th file operation of this module, counted from the first operation
that sees this value of the variable; ``SPARSECORE_FAULT_LOG=PATH`` appends the name of every
operation to PATH. They let a test stop a real job between any two operations, deterministically.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["CURRENT", "FAULT_AT", "FAULT_LOG", "RunFolder", "RunFolderError"]

CURRENT = "current"
FAULT_AT = "SPARSECORE_FAULT_AT"
FAULT_LOG = "SPARSECORE_FAULT_LOG"
_STATE = re.compile(r"^\.?state-(\d{6})(\.tmp)?$")

_ops_done = 0  # file operations since the fault hook's variable took its value
_armed_with: str | None = None  # that value


class RunFolderError(ValueError):
    """The run folder cannot be used: it is a file, lies below a file, or cannot be written."""


def check_run_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder a job can write to (it need not exist yet); else raise naming it.

    Refuses a path that is a file, or has a file where one of its parent folders should be.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RunFolderError(f"{p}: is a file, not a folder (--out names the run folder)")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunFolderError(f"{p}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK) and not p.exists():
                raise RunFolderError(f"{p}: cannot create it, {parent} is not writable")
            break
    if p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
        raise RunFolderError(f"{p}: the folder is not writable")
    return p


def _operation(name: str) -> None:
    """Count one file operation; the fault hook may stop the process right here."""
    global _ops_done, _armed_with
    fault = os.environ.get(FAULT_AT)
    if fault != _armed_with:
        _armed_with, _ops_done = fault, 0
    _ops_done += 1
    log = os.environ.get(FAULT_LOG)
    if log:
        with open(log, "a") as f:
            f.write(f"{_ops_done} {name}\n")
    if fault:
        at, _, how = fault.partition(":")
        if _ops_done == int(at):
            os.kill(os.getpid(), signal.SIGINT if how.upper() == "INT" else signal.SIGKILL)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file below ``path`` (a writer may have made a folder, e.g. a saved model)."""
    if path.is_dir():
        for child in sorted(path.iterdir()):
            _fsync_tree(child)
    _fsync_path(path)


def _seq(name: str) -> int | None:
    match = _STATE.match(name)
    return int(match.group(1)) if match else None


class RunFolder:
    """The run folder at ``path``; see the module doc."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = check_run_folder(path)
        #: The ``tag`` of the last commit of this object that reached its commit point.
        self.committed: object = None

    def current(self) -> Path | None:
        """The state folder of the last commit, resolved once (None before the first commit)."""
        link = self.path / CURRENT
        if not link.is_symlink():
            return None
        target = self.path / os.readlink(link)
        return target if target.is_dir() else None

    def commit(self, files: dict[str, Callable[[Path], Any]], tag: object = None) -> Path:
        """Write a new state: ``files`` maps each file name to a function that writes that file
        at the path it is given. Returns the new state folder, now ``current``. ``tag`` (an
        epoch, say) goes to :attr:`committed` as soon as the state is current, so that a caller
        interrupted in the operations that follow knows it was saved."""
        self.path.mkdir(parents=True, exist_ok=True)
        seq = 1 + max((s for s in map(_seq, os.listdir(self.path)) if s is not None), default=0)
        tmp = self.path / f".state-{seq:06d}.tmp"
        final = self.path / f"state-{seq:06d}"
        _operation("make state folder")
        tmp.mkdir()
        for name, write in files.items():
            _operation(f"write {name}")
            write(tmp / name)
            _operation(f"fsync {name}")
            _fsync_tree(tmp / name)
        _operation("fsync state folder")
        _fsync_path(tmp)
        _operation("rename state folder")
        os.rename(tmp, final)
        _operation("fsync run folder")
        _fsync_path(self.path)
        for name in files:  # dangling until the first switch: a reader sees all or nothing
            self._link(name, f"{CURRENT}/{name}")
        _operation("link current")
        self._symlink(final.name, self.path / f".{CURRENT}.tmp")
        _operation("switch current")
        os.replace(self.path / f".{CURRENT}.tmp", self.path / CURRENT)  # the commit point
        self.committed = tag
        _operation("fsync run folder")
        _fsync_path(self.path)
        self.tidy(names=files)
        return final

    def _link(self, name: str, target: str) -> None:
        link = self.path / name
        if link.is_symlink() and os.readlink(link) == target:
            return
        tmp = self.path / f".{name}.tmp"
        _operation(f"link {name}")
        self._symlink(target, tmp)
        _operation(f"place link {name}")
        os.replace(tmp, link)  # also replaces a plain file of an older run folder layout

    @staticmethod
    def _symlink(target: str, at: Path) -> None:
        if at.is_symlink() or at.exists():
            at.unlink()
        os.symlink(target, at)

    def tidy(self, names: Iterable[str] | None = None) -> None:
        """Remove what interrupted commits left and states older than the previous one.

        ``names``: the files of the current state; other links into ``current`` (from a run of
        another kind written here before) are removed too.
        """
        if not self.path.is_dir():
            return
        current = self.current()
        seqs = sorted(
            s
            for n in os.listdir(self.path)
            if (s := _seq(n)) is not None and not n.endswith(".tmp")
        )
        keep: set[str] = set()
        if current is not None:
            now = _seq(current.name)
            older = [s for s in seqs if now is not None and s < now]
            keep = {current.name, *(f"state-{s:06d}" for s in older[-1:])}
        for entry in sorted(os.listdir(self.path)):
            path = self.path / entry
            stale_state = _seq(entry) is not None and entry not in keep
            stale_tmp = entry.startswith(".") and entry.endswith(".tmp")
            stale_link = (
                names is not None
                and path.is_symlink()
                and entry not in names
                and entry != CURRENT
                and os.readlink(path).startswith(f"{CURRENT}/")
            )
            if stale_state or stale_tmp or stale_link:
                _operation(f"remove {entry}")
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
