"""Collect per-unit activations of chosen PyTorch layers over a dataset, for selectivity analysis.

Forward hooks record each chosen module's output batch by batch under ``torch.no_grad()`` in eval
mode; conv outputs ``(N, C, H, W)`` are averaged over space in the hook, so only ``(N, C)`` is
kept and a whole test set fits in memory. The result feeds
:func:`sparsecore.records.selectivity.class_selectivity`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsecore.errors import SparseCoreError
from sparsecore.records.selectivity import SelectivityResult, class_selectivity

__all__ = ["collect_activations", "default_layers", "layer_selectivity"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_layers(model: nn.Module) -> list[str]:
    """Names of every linear/conv module except the last one (the class scores)."""
    names = [name for name, m in model.named_modules() if isinstance(m, _WEIGHTED)]
    return names[:-1]


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    data: torch.Tensor | Iterable[Any],
    layers: Sequence[str] | None = None,
    *,
    batch_size: int = 1000,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, np.ndarray]:
    """``{layer: (N, units) float32 array}`` of the outputs of ``layers`` over ``data``.

    ``data`` is an input tensor (split into batches of ``batch_size``) or an iterable of batches
    (tensors, or tuples whose first element is the input, as a ``DataLoader`` yields).
    ``layers`` are module names from ``model.named_modules()`` (default: :func:`default_layers`).
    ``transform`` is applied to each recorded output before the spatial mean: pass
    ``torch.relu`` for models that apply ReLU functionally after a conv/linear module (such as
    LeNet-5 here), so that the recorded values are what the next layer sees. The model is run in
    eval mode and restored to its previous mode afterwards; hooks are always removed.
    """
    names = list(default_layers(model) if layers is None else layers)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise SparseCoreError(
            f"no module named {missing[0]!r} in the model; modules with weights are "
            f"{[n for n, m in modules.items() if isinstance(m, _WEIGHTED)]}"
        )
    if not names:
        raise SparseCoreError("no layers chosen: pass the module names to record")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SparseCoreError(f"batch_size must be an integer >= 1, got {batch_size!r}")

    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise SparseCoreError(
                    f"layer {name!r}: output is a {type(output).__name__}, not a tensor"
                )
            out = output.detach()
            if transform is not None:
                out = transform(out)
            if out.dim() < 2:
                raise SparseCoreError(
                    f"layer {name!r}: output of shape {tuple(out.shape)} has no unit axis"
                )
            if out.dim() > 2:
                out = out.flatten(2).mean(dim=2)
            chunks[name].append(out.float().cpu().numpy())

        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(data, batch_size):
            if device is not None:
                batch = batch.to(device)
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not chunks[names[0]]:
        raise SparseCoreError("no data: the dataset gave no batches")
    return {n: np.concatenate(chunks[n], axis=0) for n in names}


def layer_selectivity(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    layers: Sequence[str] | None = None,
    *,
    num_classes: int | None = None,
    batch_size: int = 1000,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, SelectivityResult]:
    """Class selectivity of every unit of ``layers`` on ``(inputs, labels)``."""
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    acts = collect_activations(model, inputs, layers, batch_size=batch_size, transform=transform)
    return {
        name: class_selectivity(a, y, num_classes, name=f"layer {name!r}")
        for name, a in acts.items()
    }


def _batches(data: torch.Tensor | Iterable[Any], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size]
        return
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise SparseCoreError(f"a data batch must be a tensor, got {type(x).__name__}")
        yield x
