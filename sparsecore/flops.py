"""Speedup accounting: how many floating-point operations a sparse layer needs, three ways.

For each linear or conv2d layer, from its shape, mask and (for convolutions) output size:

- ``dense``: the layer computed densely, as frameworks do with masked weights;
- ``sparse``: only the active weights (what the sparse kernels compute);
- ``compact``: the dense layer after channel compaction (the speedup a dense library gets by
  shrinking the layer, which is what structured sparsity buys). On its own, a layer loses the
  output channels and the input channels that have no active weight. Given the channels a
  compaction plan keeps (``kept_outputs``/``kept_inputs``, from :mod:`sparsecore.compaction`),
  it is the shape the compact network really runs, which also counts what other layers make
  useless: units that nothing downstream reads, input channels that hold a constant (folded
  into the bias), and the channels a residual addition or a group forces back in.

A multiply-add counts as 2 FLOPs; bias additions and activations are ignored. Forward is one
product; backward is the input gradient plus the weight gradient (the input gradient is skipped
for a layer fed by the data, ``input_grad=False``). The sparse backward computes the weight
gradient on the mask only; ``sparse_backward_dense_wgrad`` is the step inside the window before
a mask update, where the weight gradient is dense.

The paper this library follows estimated its speedups from dense time scaled by weight and
activation density; these counts are the weight part of that estimate and say nothing about
time. ``benchmarks/kernels_cpu.py`` measures time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["LayerFlops", "ModelFlops", "layer_flops", "model_flops"]


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one layer for one batch (see the module docstring for the definitions)."""

    name: str
    kind: str
    dense_forward: int
    dense_backward: int
    sparse_forward: int
    sparse_backward: int
    sparse_backward_dense_wgrad: int
    compact_forward: int
    compact_backward: int
    #: output units and input channels of the layer, and how many of each the compact count keeps
    units: int = 0
    units_kept: int = 0
    inputs: int = 0
    inputs_kept: int = 0

    @property
    def units_removed(self) -> int:
        """Output units (filters) the compact network does not compute."""
        return self.units - self.units_kept

    @property
    def inputs_removed(self) -> int:
        """Input channels the compact network does not read."""
        return self.inputs - self.inputs_kept

    @property
    def dense(self) -> int:
        return self.dense_forward + self.dense_backward

    @property
    def sparse(self) -> int:
        return self.sparse_forward + self.sparse_backward

    @property
    def compact(self) -> int:
        return self.compact_forward + self.compact_backward


@dataclass(frozen=True)
class ModelFlops:
    """Per-layer counts and their sums; ratios are dense / other (inf when other is 0)."""

    layers: tuple[LayerFlops, ...]

    def total(self, field: str) -> int:
        return int(sum(getattr(layer, field) for layer in self.layers))

    def speedup(self, versus: str = "sparse", part: str = "") -> float:
        """Dense FLOPs over ``versus`` FLOPs (``part`` '' for both passes, or '_forward' /
        '_backward')."""
        dense = self.total(f"dense{part}")
        other = self.total(f"{versus}{part}")
        return dense / other if other else float("inf")

    def table(self) -> str:
        """Readable per-layer table (MFLOPs) with the model totals."""
        head = (
            f"{'layer':<20}{'dense fwd':>12}{'dense bwd':>12}{'sparse fwd':>12}"
            f"{'sparse bwd':>12}{'compact fwd':>13}{'compact bwd':>13}"
        )
        rows = [head]
        fields = (
            "dense_forward",
            "dense_backward",
            "sparse_forward",
            "sparse_backward",
            "compact_forward",
            "compact_backward",
        )
        for layer in self.layers:
            vals = [getattr(layer, f) / 1e6 for f in fields]
            rows.append(f"{layer.name:<20}" + "".join(f"{v:>12.2f} " for v in vals))
        totals = [self.total(f) / 1e6 for f in fields]
        rows.append(f"{'total':<20}" + "".join(f"{v:>12.2f} " for v in totals))
        return "\n".join(rows)


def _kept_per_group(
    mask: npt.NDArray[np.bool_],
    groups: int,
    kept: tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]] | None = None,
) -> list[tuple[int, int]]:
    """Per group, (output channels kept, input channels kept): by default those with an active
    weight, else the given ``(outputs, inputs)`` (boolean, over all channels)."""
    n_out = mask.shape[0]
    per_group = n_out // groups
    per_in = mask.shape[1]
    counts = []
    for g in range(groups):
        if kept is not None:
            rows = int(np.count_nonzero(kept[0][g * per_group : (g + 1) * per_group]))
            cols = int(np.count_nonzero(kept[1][g * per_in : (g + 1) * per_in]))
        else:
            block = mask[g * per_group : (g + 1) * per_group]
            axes_out = tuple(range(1, block.ndim))
            rows = int(np.count_nonzero(block.any(axis=axes_out)))
            cols = int(np.count_nonzero(block.any(axis=(0, *range(2, block.ndim)))))
        counts.append((rows, cols))
    return counts


def _kept_channels(
    name: str, indices: Sequence[int] | npt.ArrayLike, size: int, what: str
) -> npt.NDArray[np.bool_]:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= size or np.unique(idx).size != idx.size):
        raise ValueError(
            f"layer {name!r}: {what} must be distinct channel indices in [0, {size}), got "
            f"{idx.tolist()}"
        )
    out = np.zeros(size, dtype=bool)
    out[idx] = True
    return out


def layer_flops(
    name: str,
    mask: npt.NDArray[np.bool_],
    batch: int,
    output_hw: Sequence[int] | None = None,
    groups: int = 1,
    input_grad: bool = True,
    kept_outputs: Sequence[int] | npt.ArrayLike | None = None,
    kept_inputs: Sequence[int] | npt.ArrayLike | None = None,
) -> LayerFlops:
    """Count the FLOPs of one linear layer (2-D mask ``(out, in)``) or conv2d layer (4-D mask
    ``(O, C // groups, kh, kw)`` with ``output_hw``) for a batch of ``batch`` samples.

    ``kept_outputs``/``kept_inputs``: the output units and input channels the compact network
    computes with (both or neither; a compaction plan's ``layout`` and ``in_layout``); without
    them the compact count removes only this layer's own empty rows and columns."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask of layer {name!r} must have dtype bool, got {mask.dtype}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 0:
        raise ValueError(f"batch of layer {name!r} must be a non-negative int, got {batch!r}")
    if mask.ndim == 2:
        kind = "linear"
        positions = 1
        if groups != 1:
            raise ValueError(f"layer {name!r}: a linear layer has groups=1, got {groups!r}")
    elif mask.ndim == 4:
        kind = "conv2d"
        if output_hw is None or len(output_hw) != 2 or min(output_hw) < 1:
            raise ValueError(
                f"layer {name!r}: a conv2d layer needs output_hw (Ho, Wo), got {output_hw!r}"
            )
        positions = int(output_hw[0]) * int(output_hw[1])
        if groups < 1 or mask.shape[0] % groups:
            raise ValueError(
                f"layer {name!r}: groups {groups!r} does not divide {mask.shape[0]} out channels"
            )
    else:
        raise ValueError(
            f"mask of layer {name!r} must be 2-D (linear) or 4-D (conv2d), got shape {mask.shape}"
        )
    taps = int(np.prod(mask.shape[2:])) if kind == "conv2d" else 1
    per_mac = 2 * int(batch) * positions
    dense_macs = int(mask.size)
    sparse_macs = int(np.count_nonzero(mask))
    if (kept_outputs is None) != (kept_inputs is None):
        raise ValueError(f"layer {name!r}: give both kept_outputs and kept_inputs, or neither")
    kept = None
    if kept_outputs is not None and kept_inputs is not None:
        kept = (
            _kept_channels(name, kept_outputs, mask.shape[0], "kept_outputs"),
            _kept_channels(name, kept_inputs, mask.shape[1] * groups, "kept_inputs"),
        )
    per_group = _kept_per_group(mask, groups, kept)
    compact_macs = sum(rows * cols for rows, cols in per_group) * taps
    n_back = 2 if input_grad else 1
    return LayerFlops(
        name=name,
        kind=kind,
        dense_forward=per_mac * dense_macs,
        dense_backward=n_back * per_mac * dense_macs,
        sparse_forward=per_mac * sparse_macs,
        sparse_backward=n_back * per_mac * sparse_macs,
        sparse_backward_dense_wgrad=(n_back - 1) * per_mac * sparse_macs + per_mac * dense_macs,
        compact_forward=per_mac * compact_macs,
        compact_backward=n_back * per_mac * compact_macs,
        units=int(mask.shape[0]),
        units_kept=sum(rows for rows, _ in per_group),
        inputs=int(mask.shape[1]) * groups,
        inputs_kept=sum(cols for _, cols in per_group),
    )


def model_flops(layers: Iterable[LayerFlops]) -> ModelFlops:
    """Collect per-layer counts into a model report."""
    return ModelFlops(layers=tuple(layers))
