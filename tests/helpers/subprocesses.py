"""Running code in a fresh Python process, optionally one that cannot import sparsecore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_python(
    code: str,
    folder: Any,
    *,
    sparsecore: bool = True,
    timeout: int = 300,
    env: dict[str, str] | None = None,
) -> Any:
    """Run ``code`` in a fresh Python process (same environment, so the same Keras backend) and
    return the JSON it prints last. ``sparsecore=False`` runs it on a ``sys.path`` from which sparsecore cannot be
    imported: every path entry that holds it is replaced by a copy of the folder (symbolic
    links) without it, and ``site`` is not run, so neither ``.pth`` files nor the editable
    install's finder can bring it back. ``env`` adds or replaces environment variables."""
    env = {**os.environ, **(env or {})}
    cmd = [sys.executable]
    if not sparsecore:
        cmd.append("-S")
        env["PYTHONPATH"] = os.pathsep.join(_path_without_sparsecore(Path(folder) / "site"))
        env.pop("PYTHONSAFEPATH", None)
    proc = subprocess.run(
        [*cmd, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(folder),
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _path_without_sparsecore(farm: Any) -> list[str]:
    def ours(name: str) -> bool:
        low = name.lower()
        return low.startswith(("sparsecore", "__editable__.sparsecore", "__editable___sparsecore"))

    out: list[str] = []
    for i, entry in enumerate(p for p in sys.path if p and os.path.isdir(p)):
        path = Path(entry).resolve()
        if (path / "sparsecore").exists() or any(ours(n) for n in os.listdir(path)):
            copy = Path(farm) / str(i)
            copy.mkdir(parents=True, exist_ok=True)
            for name in os.listdir(path):
                if not ours(name) and name != "sparsecore":
                    (copy / name).symlink_to(path / name)
            out.append(str(copy))
        else:
            out.append(str(path))
    return out
