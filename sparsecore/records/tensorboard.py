"""A run record's scalars as TensorBoard event files (the writer is an optional dependency)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import SparseCoreError
from .run_record import RunRecord, _is_number

__all__ = ["TENSORBOARD_EXTRA", "require_tensorboard", "write_tensorboard"]

#: The extra of the sparsecore package that installs a TensorBoard writer (tensorboardX).
TENSORBOARD_EXTRA = "tensorboard"


def write_tensorboard(record: RunRecord, logdir: str | os.PathLike[str]) -> Path:
    """Write the record's scalars to TensorBoard event files in ``logdir``.

    Uses ``torch.utils.tensorboard`` when the ``tensorboard`` package (and torch) is installed,
    else ``tensorboardX`` (``pip install "sparsecore[tensorboard]"``); both are optional and
    imported only here. Mask-update scalars are indexed by
    optimizer step (by update number when steps are unknown); epoch metrics by epoch.
    """
    writer_cls = _summary_writer()
    logdir = Path(logdir)
    writer = writer_cls(log_dir=str(logdir))
    try:
        for upd in record.applied:
            x = upd.step if upd.step is not None else upd.update
            writer.add_scalar("sparsity/density", upd.density, x)
            writer.add_scalar("sparsity/prune_rate", upd.prune_rate, x)
            for key in ("pruned", "grown", "net_pruned", "net_grown"):
                writer.add_scalar(f"updates/{key}", upd.total(key), x)
            if upd.ever_active_fraction is not None:
                writer.add_scalar("sparsity/ever_active_fraction", upd.ever_active_fraction, x)
            for layer in upd.layers:
                writer.add_scalar(f"density/{layer.name}", layer.density, x)
                writer.add_scalar(f"share/{layer.name}", layer.share, x)
                writer.add_scalar(f"net_grown/{layer.name}", layer.net_grown, x)
                if layer.ever_active_fraction is not None:
                    writer.add_scalar(f"ever_active/{layer.name}", layer.ever_active_fraction, x)
                if layer.units:  # recorded
                    writer.add_scalar(f"dead_units/{layer.name}", layer.dead_units, x)
                if layer.ablated:
                    writer.add_scalar(f"ablated_units/{layer.name}", layer.ablated, x)
        for epoch in record.epochs:
            for key in ("test_acc", "test_loss", "train_acc", "train_loss"):
                if _is_number(epoch.get(key)):
                    writer.add_scalar(f"epoch/{key}", float(epoch[key]), int(epoch["epoch"]))
        writer.flush()
    finally:
        writer.close()
    return logdir


def require_tensorboard() -> None:
    """Raise a clear error now, rather than at the end of a run, if no TensorBoard writer exists."""
    _summary_writer()


def _summary_writer() -> Any:
    try:
        import tensorboard  # noqa: F401  (torch's writer needs it)
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from tensorboardX import SummaryWriter as WriterX

        return WriterX
    except ImportError:
        raise SparseCoreError(
            "TensorBoard output needs 'tensorboardX' (or the 'tensorboard' package with torch): "
            f"pip install 'sparsecore[{TENSORBOARD_EXTRA}]'"
        ) from None
