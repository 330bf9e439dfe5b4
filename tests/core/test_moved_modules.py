"""Every module that moved keeps working under its old import path, and the command still runs.

A moved module's old name is either the same module object (``sys.modules`` alias: attributes,
private helpers and monkeypatching work through both names) or, where two modules were merged,
a module re-exporting every public name.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: old import path -> new one (same module object)
ALIASES = {
    "sparsecore.reporting": "sparsecore.records.report_command",
    "sparsecore.layer_table": "sparsecore.records.layer_table",
    "sparsecore.plots": "sparsecore.records.plots",
    "sparsecore.selectivity": "sparsecore.records.selectivity",
    "sparsecore.cli": "sparsecore.job.cli",
    "sparsecore.datasets": "sparsecore.job.datasets",
    "sparsecore.recipe": "sparsecore.job.recipe",
    "sparsecore.text": "sparsecore.job.text",
    "sparsecore.rundir": "sparsecore.job.rundir",
    "sparsecore.cpu_kernels": "sparsecore.kernels.cpu",
    "sparsecore.structures": "sparsecore.kernels.structures",
}

#: old import path -> the new modules whose public names it re-exports
RE_EXPORTS = {
    "sparsecore.report": ("sparsecore.records.updates",),
    "sparsecore.telemetry": ("sparsecore.records.run_record", "sparsecore.records.tensorboard"),
}


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_a_moved_module_is_the_same_module_under_its_old_name(old):
    assert importlib.import_module(old) is importlib.import_module(ALIASES[old])


@pytest.mark.parametrize("old", sorted(RE_EXPORTS))
def test_a_merged_module_re_exports_every_public_name(old):
    module = importlib.import_module(old)
    for new in RE_EXPORTS[old]:
        target = importlib.import_module(new)
        for name in target.__all__:
            assert getattr(module, name) is getattr(target, name), f"{old}.{name}"


def test_the_console_script_and_python_m_run_the_command():
    """pyproject's entry point names an importable function; ``python -m sparsecore.cli`` (the
    old path) still runs the command."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^sparsecore = "([\w.]+):(\w+)"$', pyproject, flags=re.M)
    assert match is not None
    entry = getattr(importlib.import_module(match.group(1)), match.group(2))
    assert entry is importlib.import_module("sparsecore.cli").main
    out = subprocess.run(
        [sys.executable, "-m", "sparsecore.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.startswith("sparsecore "), out.stderr
