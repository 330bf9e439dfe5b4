"""The pytest configuration silences known third-party warnings only: each filter is tied to a
third-party module, and a warning raised by sparsecore still shows in a test run's summary."""

from __future__ import annotations

import builtins
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _apply(spec: str) -> None:
    """Install one ``action:message:category:module`` filter as pytest does for the ini list."""
    action, message, category, module = [*spec.split(":", 4), "", "", "", ""][:4]
    warnings.filterwarnings(
        action,  # type: ignore[arg-type]
        message=message,
        category=getattr(builtins, category),
        module=module,
    )


def test_every_filter_names_a_third_party_module(pytestconfig):
    filters = pytestconfig.getini("filterwarnings")
    assert filters, "the project filters the known third-party warnings"
    for spec in filters:
        module = spec.split(":")[3]
        assert module and not module.startswith("sparsecore"), spec


@pytest.mark.parametrize(
    "module,silenced",
    [
        ("keras.src.backend.tensorflow.core", True),
        ("keras.src.backend.common.variables", True),
        ("sparsecore.keras.callback", False),
        ("sparsecore.telemetry", False),
    ],
)
def test_the_filters_silence_keras_but_not_sparsecore(pytestconfig, module, silenced):
    message = (
        "__array__ implementation doesn't accept a copy keyword, so passing copy=False failed."
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        for spec in pytestconfig.getini("filterwarnings"):
            _apply(spec)
        warnings.warn_explicit(message, DeprecationWarning, "f.py", 1, module=module)
        # any other warning of the same module still shows
        warnings.warn_explicit("something else", DeprecationWarning, "f.py", 2, module=module)
    assert [str(w.message) for w in caught] == ([] if silenced else [message]) + ["something else"]


def test_a_sparsecore_warning_shows_in_a_test_run(tmp_path):
    test = tmp_path / "test_emits.py"
    test.write_text(
        textwrap.dedent(
            """
            import warnings

            from sparsecore.telemetry import RunRecord


            def test_fraction_accuracy_warns():
                # sparsecore's own warning: accuracies that look like fractions
                RunRecord.from_reports([], epochs=[{"epoch": 1, "test_acc": 0.5}])


            def test_keras_copy_keyword_is_silenced():
                warnings.warn_explicit(
                    "__array__ implementation doesn't accept a copy keyword, so passing "
                    "copy=False failed.", DeprecationWarning, "core.py", 172,
                    module="keras.src.backend.tensorflow.core",
                )
            """
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(ROOT),
            "-p",
            "no:cacheprovider",
            "-q",
            str(test),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "UserWarning" in result.stdout and "acc_unit='fraction'" in result.stdout
    assert "copy keyword" not in result.stdout
    assert "2 passed, 1 warning" in result.stdout
