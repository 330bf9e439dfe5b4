"""Moved to :mod:`sparsecore.records.updates` (the one data model of what an update did).

This module keeps the old import path working: ``from sparsecore.report import UpdateReport``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .records.updates import COUNT_KEYS, LayerReport, UpdateReport

__all__ = ["COUNT_KEYS", "LayerReport", "UpdateReport", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``sparsecore report`` (:mod:`sparsecore.records.report_command`, loaded on demand)."""
    from .records.report_command import main as report_main

    return report_main(argv)
