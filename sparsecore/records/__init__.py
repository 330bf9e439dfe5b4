"""Run records, reports and plots: what a sparse run did to its masks, and how to read it.

- :mod:`~sparsecore.records.updates`: what one mask update did (:class:`UpdateReport`, one
  :class:`LayerReport` per layer), the one data model the engine returns and a run record keeps;
- :mod:`~sparsecore.records.run_record`: a run's updates, epochs and FLOPs as checked JSON
  (:class:`RunRecord`, :func:`load_run`);
- :mod:`~sparsecore.records.tensorboard`: a record's scalars as TensorBoard events;
- :mod:`~sparsecore.records.layer_table`: the per-layer table of ``sparsecore report`` and of
  the adapters' ``summary()``;
- :mod:`~sparsecore.records.report_command`: the ``sparsecore report`` command;
- :mod:`~sparsecore.records.plots` and :mod:`~sparsecore.records.selectivity`: PNG plots of a
  record, and the class selectivity of units (matplotlib imported only when plotting).

Nothing here imports the engine: the algorithm produces reports, this package reads them.
"""

from .run_record import RunRecord, TelemetryError, load_run
from .updates import LayerReport, UpdateReport

__all__ = ["LayerReport", "RunRecord", "TelemetryError", "UpdateReport", "load_run"]
