"""The language-model side of ``sparsecore train`` (``--model lstm-lm | gpt-mini``).

The job's loop, checkpoints, outputs and resume are those of the image job
(:mod:`sparsecore.torch.train`); what differs is here: the data (a plain-text file, the
Debian package's Jargon File, or the embedded excerpt: :mod:`sparsecore.job.text`), the examples
(windows of :data:`CONTEXT` characters, each position predicting the next), the loss (mean
cross-entropy per character) and the extra metric, bits per character (the loss / ln 2).
Accuracy is the share of next characters predicted right (top 1). The optimizer is the job's
SGD with Nesterov momentum, with the gradient clipped to a global norm of :data:`CLIP_NORM`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sparsecore.job.text import TextDataset, find_text

from .lm_models import JOB_INCLUDE, LM_MODELS

__all__ = [
    "CONTEXT",
    "bits_per_char",
    "is_language_model",
    "job_include",
    "lm_tensors",
    "load_lm_data",
    "loss_sum",
]

#: Characters per example window (the models see this many, each predicting the next).
CONTEXT = 64

#: Gradients are clipped to this global norm before each step (the usual guard of recurrent and
#: attention models trained with SGD against a rare exploding step).
CLIP_NORM = 1.0


def is_language_model(model: str) -> bool:
    return model in LM_MODELS


def job_include(model: str) -> list[type[nn.Module]]:
    """What the job includes in the sparse selection beyond the defaults (the LSTM weights)."""
    return list(JOB_INCLUDE.get(model, []))


def load_lm_data(data: str | None, record: dict[str, Any] | None) -> TextDataset:
    """``--data`` if given; on a resume without it, the text the checkpoint records."""
    if data is None and record is not None:
        data = str(record.get("source"))
        if data != "embedded" and not Path(data).is_file():
            raise FileNotFoundError(
                f"the checkpoint's text file {data} is not there any more; pass --data with "
                f"the file that now holds that text"
            )
    return find_text(data)


def data_source(dataset: TextDataset) -> str:
    """How to find ``dataset`` again: ``embedded``, or the file it was read from."""
    return "embedded" if dataset.source.startswith("embedded:") else dataset.source


def lm_tensors(
    dataset: TextDataset, limit_train: int | None, limit_test: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training and validation windows ``(x, y)`` (int64, ``(n, CONTEXT)``), the first
    ``limit_train`` / ``limit_test`` windows when given."""
    x_train, y_train = dataset.windows(CONTEXT, "train")
    x_test, y_test = dataset.windows(CONTEXT, "valid")
    if limit_train is not None:
        x_train, y_train = x_train[:limit_train], y_train[:limit_train]
    if limit_test is not None:
        x_test, y_test = x_test[:limit_test], y_test[:limit_test]
    return (
        torch.from_numpy(x_train),
        torch.from_numpy(y_train),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
    )


def loss_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over examples of each example's mean cross-entropy (per character for sequences)."""
    if logits.ndim == 3:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]
    return F.cross_entropy(logits, y, reduction="sum")


def mean_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per example (per character for sequences): the training loss."""
    if logits.ndim == 3:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return F.cross_entropy(logits, y)


def correct_sum(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Sum over examples of the share of right top-1 predictions (1 or 0 for a class label)."""
    hits = (logits.argmax(-1) == y).to(torch.float64)
    return float(hits.mean(dim=1).sum() if hits.ndim == 2 else hits.sum())


def bits_per_char(loss: float) -> float:
    """Bits per character of a mean cross-entropy in nats."""
    return loss / math.log(2.0)
