"""Sparse weights out of and back into a model, as ``torch.sparse_csr`` tensors.

A sparse weight of shape ``(out, *rest)`` is stored as a CSR matrix of shape ``(out, prod(rest))``
built from its *mask*, so an active weight that happens to be exactly 0 (just regrown) stays an
explicit entry and the mask survives the round trip. Everything else in the model's state dict is
kept as it is.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from sparsecore.errors import SparseCoreError

EXPORT_FORMAT = "sparsecore.csr/1"


def to_csr(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CSR matrix ``(shape[0], rest)`` holding ``weight`` at exactly the positions of ``mask``."""
    rows = weight.shape[0]
    w2 = weight.detach().reshape(rows, -1)
    m2 = mask.reshape(rows, -1)
    counts = m2.sum(dim=1)
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = torch.cumsum(counts, 0)
    cols = torch.nonzero(m2)[:, 1]
    with warnings.catch_warnings():  # torch announces its sparse layouts as beta on every build
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, cols, w2[m2], size=tuple(w2.shape), check_invariants=False
        )


def export_sparse(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{'format', 'state', 'shapes'}``: the model's state dict with CSR tensors for ``masks``."""
    state = model.state_dict()
    out: dict[str, Any] = {}
    shapes: dict[str, list[int]] = {}
    for key, value in state.items():
        if key in masks:
            out[key] = to_csr(value, masks[key])
            shapes[key] = list(value.shape)
        else:
            out[key] = value.detach().clone()
    return {"format": EXPORT_FORMAT, "state": out, "shapes": shapes}


def load_sparse(
    model: nn.Module, exported: dict[str, Any], *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Load :func:`export_sparse` output into ``model``; returns the masks by parameter name.

    CSR tensors are densified (zeros outside their pattern) to the original weight shape.
    """
    if not isinstance(exported, dict) or exported.get("format") != EXPORT_FORMAT:
        raise SparseCoreError(
            f"not a sparsecore export (expected format {EXPORT_FORMAT!r}, got "
            f"{exported.get('format') if isinstance(exported, dict) else type(exported).__name__!r})"
        )
    shapes = exported["shapes"]
    dense: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, value in exported["state"].items():
        if key in shapes:
            shape = tuple(int(d) for d in shapes[key])
            if value.layout != torch.sparse_csr or tuple(value.shape) != (
                shape[0],
                math.prod(shape[1:]),
            ):
                raise SparseCoreError(
                    f"parameter {key!r}: expected a CSR tensor of shape "
                    f"{(shape[0], math.prod(shape[1:]))}, got {value.layout} {tuple(value.shape)}"
                )
            crow, cols = value.crow_indices(), value.col_indices()
            rows = torch.repeat_interleave(
                torch.arange(shape[0], device=crow.device), crow[1:] - crow[:-1]
            )
            flat = torch.zeros(
                shape[0], math.prod(shape[1:]), dtype=value.dtype, device=value.device
            )
            mask = torch.zeros(flat.shape, dtype=torch.bool, device=value.device)
            flat[rows, cols] = value.values()
            mask[rows, cols] = True
            dense[key] = flat.reshape(shape)
            masks[key] = mask.reshape(shape)
        else:
            dense[key] = value
    model.load_state_dict(dense, strict=strict)
    return masks
