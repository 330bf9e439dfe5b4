"""``sparsecore.torch.compact``: a sparse model as a smaller dense one with the same outputs.

Sparse momentum empties whole units: filters with no active weight, inputs that nothing reads.
:func:`compact` finds them along the model's graph (:mod:`sparsecore.compaction` over a
``torch.fx`` trace, :mod:`.compaction_graph`) and returns a plain ``nn.Module`` built from
smaller ``nn.Linear``/``nn.Conv2d``/``BatchNorm`` layers (:mod:`.compaction_build`), for inference
or dense fine-tuning, together with a report of what was removed. The compact model gives the
masked dense model's outputs in training and evaluation mode (batch norm's running statistics
included), and :func:`compact` checks that on the example input before returning it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from sparsecore.compaction import CompactionPlan, CompactionReport, plan_compaction
from sparsecore.errors import SparseCoreError

from .compaction_build import build_compact
from .compaction_graph import TracedModel, masks_by_module, trace_model
from .eval_mode import evaluation_mode

__all__ = ["compact", "compaction_plan"]


def _handle_of(model: nn.Module) -> Any:
    """The live ``SparseTraining`` attached to ``model``, if any (read, never changed)."""
    from . import attached

    return attached.handle_of(model)


def _source(model: Any) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    """The module to compact, its masks by module name, and where the masks came from."""
    from .adapter import SparseTraining

    handle = model if isinstance(model, SparseTraining) else None
    if handle is None and not isinstance(model, nn.Module):
        raise SparseCoreError(
            f"compact needs a torch.nn.Module or the handle attach() returned, got "
            f"{type(model).__name__}"
        )
    if handle is None:
        handle = _handle_of(model)
    if handle is not None:
        handle._check_live()
        module = handle.model
        return module, masks_by_module(module, handle.names, handle.masks), "attach"
    return model, {}, "weights"


def _example_inputs(example_input: Any) -> tuple[torch.Tensor, ...]:
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise SparseCoreError(
            f"example_input must be a tensor (or a tuple of tensors) the model accepts, got "
            f"{type(example_input).__name__}"
        )
    return tuple(inputs)


def compaction_plan(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    padded_constants: str = "fold",
) -> tuple[CompactionPlan, TracedModel]:
    """The compaction plan of ``model`` (and its trace): what :func:`compact` would keep.

    ``masks`` by module name (``"fc1"``) or weight name (``"fc1.weight"``): a weight counts
    when it is nonzero and (where a mask is given) active. Changes nothing.
    """
    inputs = _example_inputs(example_input)
    by_module = {k.removesuffix(".weight"): v for k, v in (masks or {}).items()}
    traced = trace_model(model, inputs, by_module)
    return plan_compaction(traced.ops, padded_constants=padded_constants), traced


def compact(
    model: Any,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    *,
    padded_constants: str = "fold",
    check: bool = True,
) -> tuple[nn.Module, CompactionReport]:
    """A smaller plain ``nn.Module`` with the same outputs as ``model``, and what was removed.

    ``model``: a model under :func:`sparsecore.torch.attach` (or its handle), or any model. A
    weight counts when it is nonzero and, for an attached model, in its mask: an active weight
    that is exactly 0 adds nothing to the masked computation, so it goes too.
    ``example_input``: a batch the model accepts (a tensor, or a tuple for several inputs); it
    gives every tensor's shape and the check. The model runs once on it in evaluation mode and is
    left exactly as it was (weights, statistics, modes, hooks).

    Returns ``(compact_model, report)``. The compact model is a ``torch.fx.GraphModule`` of
    ordinary layers in the original model's dtype, device and modes; it computes what the masked
    model computes, in both training and evaluation mode, for inputs of any batch size (and any
    image size where the original allows one). ``padded_constants``: ``"fold"`` adds a constant
    channel entering a zero-padded convolution as a per-position bias map, ``"keep"`` computes
    that channel instead. ``report`` (:class:`sparsecore.compaction.CompactionReport`) lists per
    layer the units kept and why the others went; with ``check=True`` it also holds the largest
    difference between the two models' outputs on the example input, and :func:`compact` raises
    :class:`sparsecore.SparseCoreError` if that difference is beyond rounding (which would mean a
    part of the model the trace does not capture, such as code branching on ``self.training``).
    """
    module, masks, source = _source(model)
    plan, traced = compaction_plan(module, example_input, masks, padded_constants=padded_constants)
    weighted = {
        op.name: op.mask for op in traced.ops if op.kind == "weighted" and op.mask is not None
    }
    compact_model = build_compact(
        traced,
        plan,
        {k: np.asarray(v) for k, v in weighted.items()},
        class_name=f"Compact{type(module).__name__}",
        training=module.training,
    )
    report = _named_report(plan.report(), traced)
    notes = [
        "weights counted: "
        + ("active in attach()'s masks and nonzero" if source == "attach" else "nonzero")
    ]
    opaque = [
        name
        for name, role in traced.roles.items()
        if role.action == "opaque" and role.op is not None
    ]
    if opaque:
        notes.append(f"kept whole (not analysed): {', '.join(opaque)}")
    report = replace(report, notes=tuple(notes))
    if check:
        report = _check(compact_model, traced, _example_inputs(example_input), report)
    return compact_model, report


def _named_report(report: CompactionReport, traced: TracedModel) -> CompactionReport:
    """Layers named by their module (``features.0``) rather than the trace's node name."""
    targets = {
        node.name: str(node.target)
        for node in traced.graph_module.graph.nodes
        if node.op == "call_module"
    }
    layers = tuple(replace(x, name=targets.get(x.name, x.name)) for x in report.layers)
    return replace(report, layers=layers)


def _check(
    compact_model: nn.Module,
    traced: TracedModel,
    inputs: tuple[torch.Tensor, ...],
    report: CompactionReport,
) -> CompactionReport:
    """Run the compact model on the example input (evaluation mode) against the original's
    outputs; record the largest difference, raise if it is beyond rounding."""
    with evaluation_mode(compact_model), torch.no_grad():
        got = compact_model(*inputs)
    want_leaves = [t for t in tree_leaves(traced.output) if isinstance(t, torch.Tensor)]
    got_leaves = [t for t in tree_leaves(got) if isinstance(t, torch.Tensor)]
    if len(want_leaves) != len(got_leaves):
        raise SparseCoreError("compaction changed the structure of the model's outputs")
    diff, scale = 0.0, 0.0
    tolerance = 0.0
    for w, g in zip(want_leaves, got_leaves):
        if w.shape != g.shape:
            raise SparseCoreError(
                f"compaction changed an output's shape from {tuple(w.shape)} to {tuple(g.shape)}"
            )
        if not w.is_floating_point():
            if not torch.equal(w, g):
                raise SparseCoreError("compaction changed an integer output of the model")
            continue
        finite = torch.isfinite(w)
        if not torch.equal(finite, torch.isfinite(g)):
            raise SparseCoreError("compaction changed which outputs are finite")
        if finite.any():
            diff = max(diff, float((w[finite] - g[finite]).abs().max()))
            scale = max(scale, float(w[finite].abs().max()))
        tolerance = max(tolerance, math.sqrt(torch.finfo(w.dtype).eps))
    if diff > tolerance * max(scale, 1.0):
        raise SparseCoreError(
            f"the compact model's outputs differ from the model's by up to {diff:.3g} (outputs up "
            f"to {scale:.3g}) on the example input. Something in the model's forward is not in "
            f"its torch.fx trace (code that branches on self.training or on values); please "
            f"report it with the model"
        )
    return replace(report, max_abs_difference=diff, output_scale=scale)
