"""The training job shows warnings as one line each, without Python's file:line and source."""

from __future__ import annotations

import warnings

from sparsecore.cli import warnings_as_lines
from sparsecore.errors import DeadUnitsWarning


def test_job_warnings_are_one_line_each(capsys):
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with warnings_as_lines():
            warnings.warn(
                "sparsecore: layer 'fc1.weight': 155 of 300 units", DeadUnitsWarning, stacklevel=1
            )
    err = capsys.readouterr().err
    assert (
        err
        == "sparsecore train: DeadUnitsWarning: sparsecore: layer 'fc1.weight': 155 of 300 units\n"
    )
    assert warnings.showwarning is before  # restored for the caller


def test_other_libraries_warnings_are_shown_as_before():
    seen = []

    def record(message, category, filename, lineno, file=None, line=None):
        seen.append((str(message), category))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        with warnings_as_lines():
            warnings.warn("a third-party remark", UserWarning, stacklevel=1)
    assert seen == [("a third-party remark", UserWarning)]
