"""FLOP accounting for a PyTorch model: fills :func:`sparsecore.flops.layer_flops` from the
shapes seen in one forward pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparsecore.flops import LayerFlops, ModelFlops, layer_flops, model_flops

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
    needs no input gradient. The model runs once under ``torch.no_grad()``.
    """
    masks = dict(masks or {})
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
    try:
        with torch.no_grad():
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
        if isinstance(module, nn.Linear):
            batch = 1
            for d in in_shape[:-1]:
                batch *= d
            layers.append(layer_flops(name, mask_np, batch, input_grad=not is_input))
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
                )
            )
    return model_flops(layers)
