"""Run a model once in evaluation mode and leave every module in the mode it had."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then each module's own ``training`` flag back (not one
    flag for the whole model: a submodule may be in another mode than its parent). A forward
    pass in training mode would move batch norm's running statistics: counting, tracing or
    checking a model must change nothing in it."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
