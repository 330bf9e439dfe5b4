"""Test-suite settings shared by every layer of tests.

- Hypothesis profiles: ``ci`` (default, modest example counts so the suite stays fast on 2 cores)
  and ``thorough`` (``HYPOTHESIS_PROFILE=thorough``) for a deeper local run.
- ``SPARSECORE_FORBID_SKIPS=1`` (set by tox, hence by CI) turns any skipped test that is not marked
  ``gpu`` into a failure of the run: a missing dependency must not pass silently.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_bad_skips: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import cupy

        has_gpu = bool(cupy.cuda.is_available())
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "gpu" not in report.keywords:
        _bad_skips.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("SPARSECORE_FORBID_SKIPS") == "1" and _bad_skips:
        print("\nERROR: tests skipped outside the GPU-only set (forbidden in CI):")
        for nodeid in _bad_skips:
            print(f"  {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
