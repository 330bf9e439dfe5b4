"""Moved to :mod:`sparsecore.records.run_record` and :mod:`sparsecore.records.tensorboard`.

This module keeps the old import path working. ``LayerUpdate`` and ``UpdateRecord``, the run
record's own classes before there was one data model, are now the engine's
:class:`~sparsecore.records.updates.LayerReport` and
:class:`~sparsecore.records.updates.UpdateReport` (``nnz`` reads ``nnz_after``).
"""

from __future__ import annotations

from .records.run_record import (
    ACCURACY_KEYS,
    RECORD_FORMAT,
    RECORD_VERSION,
    TELEMETRY_NAME,
    RunRecord,
    TelemetryError,
    flops_section,
    load_run,
    record_from_run,
)
from .records.tensorboard import TENSORBOARD_EXTRA, require_tensorboard, write_tensorboard
from .records.updates import LayerReport as LayerUpdate
from .records.updates import UpdateReport as UpdateRecord

__all__ = [
    "ACCURACY_KEYS",
    "RECORD_FORMAT",
    "RECORD_VERSION",
    "TELEMETRY_NAME",
    "TENSORBOARD_EXTRA",
    "LayerUpdate",
    "RunRecord",
    "TelemetryError",
    "UpdateRecord",
    "flops_section",
    "load_run",
    "record_from_run",
    "require_tensorboard",
    "write_tensorboard",
]
