"""The built wheel carries the CUDA sources and every module of the source tree (an editable
install would hide a missing glob or a subpackage missing from pyproject's package list)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import sparsecore.kernels as K

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_the_kernel_sources(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("sparsecore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in (*K.KERNEL_SOURCES, *K.HEADERS):
        assert f"sparsecore/kernels/{source}" in names, f"{source} missing from {wheel.name}"
    for module in (
        "__init__.py",
        "layout.py",
        "launch.py",
        "emulate.py",
        "cpu.py",
        "structures.py",
    ):
        assert f"sparsecore/kernels/{module}" in names
    # every module of every folder pyproject maps, under its package's name in the wheel
    folders = {"sparsecore": "sparsecore", "backends/torch": "sparsecore/torch"}
    folders.update({"backends/keras": "sparsecore/keras", "backends/cupy": "sparsecore/cupy"})
    folders["kernels"] = "sparsecore/kernels"
    for folder, package in folders.items():
        for path in (ROOT / folder).rglob("*.py"):
            inside = path.relative_to(ROOT / folder).as_posix()
            assert f"{package}/{inside}" in names, f"{folder}/{inside} missing from the wheel"
    assert "sparsecore/cupy/__init__.py" in names
    assert "sparsecore/torch/cuda_kernels.py" in names
