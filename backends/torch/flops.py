"""FLOP accounting for a PyTorch model: fills :func:`sparsecore.flops.layer_flops` from the
shapes seen in one forward pass, and its compact counts from the model's compaction plan (the
shapes :func:`sparsecore.torch.compact` runs)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsecore.errors import SparseCoreError
from sparsecore.flops import LayerFlops, ModelFlops, layer_flops, model_flops

from .eval_mode import evaluation_mode

__all__ = ["count_flops"]


def count_flops(
    model: nn.Module,
    example_input: torch.Tensor,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> ModelFlops:
    """Dense, sparse and compact FLOPs of every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` for
    one batch like ``example_input``.

    ``masks`` maps a module name (``"fc1"``) or its weight's name (``"fc1.weight"``) to a bool
    mask; layers without one use ``weight != 0``. A layer that reads ``example_input`` itself
    needs no input gradient. The model runs once under ``torch.no_grad()``, in evaluation mode,
    and is left in the modes it had: counting changes nothing (batch norm's running statistics
    included).

    The compact counts are those of the compaction plan across layers (units nothing reads and
    constant inputs removed, see :mod:`sparsecore.compaction`); for a model that ``torch.fx``
    cannot trace they fall back, with a warning, to each layer's own empty rows and columns.
    """
    masks = dict(masks or {})
    kept = _kept_channels(model, example_input, masks)
    seen: list[tuple[str, nn.Module, tuple[int, ...], tuple[int, ...], bool]] = []
    hooks = []

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            seen.append((name, module, tuple(x.shape), tuple(output.shape), x is example_input))

        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hooks.append(module.register_forward_hook(hook(name)))
    # Evaluation mode: in training mode the pass would move batch norm's running statistics
    # (a training run writing its telemetry would then not equal the same run resumed).
    try:
        with evaluation_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()

    layers: list[LayerFlops] = []
    for name, module, in_shape, out_shape, is_input in seen:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        mask = masks.get(name, masks.get(f"{name}.weight"))
        if mask is None:
            mask = weight.detach() != 0
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(
                f"mask of layer {name!r} has shape {tuple(mask.shape)}, weight has "
                f"{tuple(weight.shape)}"
            )
        mask_np = mask.detach().to("cpu", torch.bool).numpy()
        compact: dict[str, Any] = {}
        if kept is not None:  # a layer the plan keeps whole (e.g. called twice) runs in full
            groups = getattr(module, "groups", 1)
            full = (np.arange(mask_np.shape[0]), np.arange(mask_np.shape[1] * groups))
            outs, ins = kept.get(name, full)
            compact = {"kept_outputs": outs, "kept_inputs": ins}
        if isinstance(module, nn.Linear):
            batch = 1
            for d in in_shape[:-1]:
                batch *= d
            layers.append(layer_flops(name, mask_np, batch, input_grad=not is_input, **compact))
        else:
            assert isinstance(module, nn.Conv2d)
            batch = in_shape[0] if len(in_shape) == 4 else 1
            layers.append(
                layer_flops(
                    name,
                    mask_np,
                    batch,
                    output_hw=out_shape[-2:],
                    groups=module.groups,
                    input_grad=not is_input,
                    **compact,
                )
            )
    return model_flops(layers)


def _kept_channels(
    model: nn.Module, example_input: torch.Tensor, masks: Mapping[str, torch.Tensor]
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Per module name: the output units and input channels its compact layer computes with
    (a layer the plan keeps whole keeps everything); None when the model cannot be traced."""
    from .compaction import compaction_plan

    try:
        plan, traced = compaction_plan(model, example_input, masks)
    except SparseCoreError as err:
        warnings.warn(
            f"compact FLOPs count each layer on its own (no cross-layer compaction): {err}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    targets = {
        node.name: str(node.target)
        for node in traced.graph_module.graph.nodes
        if node.op == "call_module"
    }
    return {
        targets[op.name]: (plan[op.name].layout, plan[op.name].in_layout)
        for op in traced.ops
        if op.kind == "weighted" and op.name in targets
    }
