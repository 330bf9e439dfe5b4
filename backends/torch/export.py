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

    CSR tensors are densified (zeros outside their pattern) to the original weight shape. All
    or nothing: every entry is checked (format, CSR structure, shapes against the model, and
    with ``strict`` the key set) before the model changes; a bad one raises
    :class:`SparseCoreError` naming it. Read the file with ``torch.load(..., weights_only=True)``
    (an export holds only tensors and plain containers).
    """
    if not isinstance(exported, dict) or exported.get("format") != EXPORT_FORMAT:
        raise SparseCoreError(
            f"not a sparsecore export (expected format {EXPORT_FORMAT!r}, got "
            f"{exported.get('format') if isinstance(exported, dict) else type(exported).__name__!r})"
        )
    state, shapes = exported.get("state"), exported.get("shapes")
    if not isinstance(state, dict) or not isinstance(shapes, dict):
        raise SparseCoreError("not a sparsecore export: its 'state' and 'shapes' must be dicts")
    current = model.state_dict()
    dense: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise SparseCoreError(
                f"parameter {key!r}: expected a tensor, got {type(value).__name__}"
            )
        if key in shapes:
            dense[key], masks[key] = _densify(key, value, shapes[key])
        else:
            dense[key] = value
        want = current.get(key)
        if want is None:
            if strict:
                raise SparseCoreError(f"parameter {key!r} of the export is not in the model")
        elif tuple(dense[key].shape) != tuple(want.shape):
            raise SparseCoreError(
                f"parameter {key!r}: the export holds shape {tuple(dense[key].shape)}, the "
                f"model {tuple(want.shape)}"
            )
    missing = [k for k in current if k not in dense]
    if strict and missing:
        raise SparseCoreError(f"the export lacks the model's parameter(s) {missing}")
    model.load_state_dict(dense, strict=strict)
    return masks


def _densify(key: str, value: torch.Tensor, saved_shape: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A CSR export entry as (dense weight, mask), after checking its structure."""
    try:
        shape = tuple(int(d) for d in saved_shape)
    except (TypeError, ValueError):
        raise SparseCoreError(f"parameter {key!r}: bad shape {saved_shape!r}") from None
    if len(shape) < 1 or min(shape) < 1:
        raise SparseCoreError(f"parameter {key!r}: bad shape {saved_shape!r}")
    rows, cols = shape[0], math.prod(shape[1:])
    if value.layout != torch.sparse_csr or tuple(value.shape) != (rows, cols):
        raise SparseCoreError(
            f"parameter {key!r}: expected a CSR tensor of shape {(rows, cols)}, got "
            f"{value.layout} {tuple(value.shape)}"
        )
    crow, col = value.crow_indices(), value.col_indices()
    try:
        torch._validate_sparse_csr_tensor_args(crow, col, value.values(), (rows, cols))
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[0]
        raise SparseCoreError(f"parameter {key!r}: not a valid CSR tensor ({detail})") from None
    row_ids = torch.repeat_interleave(torch.arange(rows, device=crow.device), crow[1:] - crow[:-1])
    flat = torch.zeros(rows, cols, dtype=value.dtype, device=value.device)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=value.device)
    flat[row_ids, col] = value.values()
    mask[row_ids, col] = True
    if int(mask.sum()) != col.numel():
        raise SparseCoreError(f"parameter {key!r}: the CSR tensor names a position twice")
    return flat.reshape(shape), mask.reshape(shape)
