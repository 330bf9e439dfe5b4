"""Initial masks: how many weights each layer starts with, and which ones.

Counts are exact integers summing to ``N = round(density * sum n_l)``. Densities follow ``uniform``,
``ER`` or ``ERK``; a layer whose density would exceed the ceiling (1, or ``max_density``) is filled
to the ceiling and the others re-solved (RigL's rule), which is precisely the water-filling split of
:func:`sparsecore.redistribute.split_budget` with layer sizes as capacities. Positions are the
largest position hashes of update 0, so masks are reproducible from the seed alone.

With ``cover_units`` no output unit starts without a weight where the budget allows: every layer
gets at least one weight per output unit (when the total N holds that many), and inside a layer
each unit first takes its position of largest hash, the rest of the count going to the largest
hashes left. A unit with no weight is born dead (:mod:`sparsecore.units`).

With ``scale_init`` (:func:`init_scales`) each output unit's initial weights are multiplied by
``sqrt(fan_in / active fan_in)``: an initialiser chooses its scale for the dense fan-in, so a unit
keeping k of its fan_in inputs would start with about k/fan_in of the dense output variance; the
factor restores it per unit (the sparsity-aware initialisation of Evci et al., AAAI 2022).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .errors import SparseCoreError
from .hashing import HashKey, layer_hash
from .redistribute import split_budget
from .validation import check_integer, check_real, check_shape, is_integer

INIT_METHODS = ("uniform", "ER", "ERK")


def _fan_in_out(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    """(input units, output units) of a weight whose output axis is ``axis``.

    The two channel axes sit together. A non-negative ``axis`` means a PyTorch layout, channels
    first: (out, in, k...) with axis 0, or (in, out, k...) for transposed convolutions with axis 1.
    A negative ``axis`` means a Keras kernel, channels last: (k..., in, out) with axis -1, or
    (k..., out, in) for transposed and depthwise kernels with axis -2. The input units are the
    other axis of the pair; kernel dimensions are not counted (that is what ERK adds). Any other
    axis falls back to ``size / n_out``.
    """
    ndim = len(shape)
    n_out = shape[axis]
    if ndim == 1:
        return 1, n_out
    if ndim == 2:
        return shape[1 - axis % 2], n_out
    if axis in (0, 1):
        return shape[1 - axis], n_out
    if axis in (-1, -2):
        return shape[-3 - axis], n_out
    return math.prod(shape) // n_out, n_out


def _raw_density(shape: tuple[int, ...], method: str, axis: int) -> float:
    size = math.prod(shape)
    if method == "uniform":
        return 1.0
    if method == "ER":
        n_in, n_out = _fan_in_out(shape, axis)
        return (n_in + n_out) / (n_in * n_out)
    if method == "ERK":
        return sum(shape) / size
    raise SparseCoreError(f"unknown init method {method!r}; choose one of {list(INIT_METHODS)}")


def target_count(shapes: Sequence[tuple[int, ...]], density: float) -> int:
    """``N = round(density * sum n_l)``: the total number of active weights, fixed for good."""
    density = _check_density(density)
    sizes = [math.prod(check_shape(f"layer {i}", s)) for i, s in enumerate(shapes)]
    return int(round(density * sum(sizes)))


def layer_counts(
    shapes: Sequence[tuple[int, ...]],
    density: float,
    method: str = "uniform",
    *,
    axes: Sequence[int] | None = None,
    max_density: float = 1.0,
    min_density: float = 0.0,
    cover_units: bool = False,
) -> list[int]:
    """Exact initial active count per layer (summing to :func:`target_count`).

    ``cover_units``: at least one weight per output unit (along ``axes``) in every layer, when
    the total count allows it for all layers together; otherwise no such floor. A setting that
    leaves no weight active (``density=0.01`` of a 3x3 layer rounds to 0) is refused rather than
    zeroing every sparse layer.
    """
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence):
        raise SparseCoreError(f"shapes must be a list of layer shapes, got {shapes!r}")
    shapes = [check_shape(f"layer {i}", s) for i, s in enumerate(shapes)]
    if not shapes:
        raise SparseCoreError("no layers given: at least one sparse layer is needed")
    axes = [0] * len(shapes) if axes is None else list(axes)
    if len(axes) != len(shapes):
        raise SparseCoreError(f"got {len(shapes)} shapes but {len(axes)} axes; they must match")
    for i, (shape, axis) in enumerate(zip(shapes, axes)):
        if not is_integer(axis) or not -len(shape) <= int(axis) < len(shape):
            raise SparseCoreError(
                f"layer {i}: output axis {axis!r} is out of range for shape {shape}"
            )
    axes = [int(a) for a in axes]
    density = _check_density(density)
    max_density = check_real("max_density", max_density, low=0.0, high=1.0, low_open=True)
    min_density = check_real(
        f"min_density (at most max_density={max_density:g})",
        min_density,
        low=0.0,
        high=max_density,
    )
    sizes = np.array([math.prod(s) for s in shapes], dtype=np.int64)
    total = target_count(shapes, density)
    if total == 0:
        raise SparseCoreError(
            f"density {density:g} of {int(sizes.sum())} weights keeps round({density:g} * "
            f"{int(sizes.sum())}) = 0 active weights: every sparse layer would be zero; use a "
            f"density above {0.5 / sizes.sum():.3g}"
        )
    ceiling = np.floor(max_density * sizes).astype(np.int64)
    floor = np.minimum(np.ceil(min_density * sizes).astype(np.int64), ceiling)
    if int(ceiling.sum()) < total:
        raise SparseCoreError(
            f"density {density} needs {total} active weights but max_density {max_density} "
            f"allows only {int(ceiling.sum())}"
        )
    if int(floor.sum()) > total:
        raise SparseCoreError(
            f"min_density {min_density} needs {int(floor.sum())} active weights but density "
            f"{density} gives only {total}"
        )
    raw = np.array([_raw_density(s, method, a) for s, a in zip(shapes, axes)])
    counts = floor + split_budget(total - int(floor.sum()), raw * sizes, ceiling - floor)
    if cover_units:
        units = np.array([s[a] for s, a in zip(shapes, axes)], dtype=np.int64)
        lowest = np.maximum(floor, np.minimum(units, ceiling))
        counts = _raise_to(counts, lowest, floor, total, raw * sizes, ceiling)
    return [int(c) for c in counts]


def _raise_to(
    counts: np.ndarray,
    lowest: np.ndarray,
    floor: np.ndarray,
    total: int,
    weights: np.ndarray,
    ceiling: np.ndarray,
) -> np.ndarray:
    """``counts`` with every layer raised to ``lowest`` where the total allows it for all.

    Water-filling from below: layers under their lowest count are set to it, and the rest of the
    total is split again over the others (their ``floor`` first, then in proportion to
    ``weights``) until none falls under; if the lowest counts need more than ``total``,
    ``counts`` is returned unchanged.
    """
    if int(lowest.sum()) > total:
        return counts
    fixed = counts < lowest
    while True:
        free = ~fixed
        rest = total - int(lowest[fixed].sum()) - int(floor[free].sum())
        out = np.where(fixed, lowest, floor)
        out[free] += split_budget(rest, weights[free], ceiling[free] - floor[free])
        below = free & (out < lowest)
        if not below.any():
            return out
        fixed |= below


def layer_densities(
    shapes: Sequence[tuple[int, ...]], density: float, method: str = "uniform", **kwargs: object
) -> list[float]:
    """Initial density per layer (exact counts divided by sizes); see :func:`layer_counts`."""
    counts = layer_counts(shapes, density, method, **kwargs)  # type: ignore[arg-type]
    return [c / math.prod(s) for c, s in zip(counts, shapes)]


def initial_mask(
    shape: tuple[int, ...], count: int, *, seed: int, layer: int, cover_axis: int | None = None
) -> np.ndarray:
    """Boolean mask with ``count`` active positions: the largest hashes of update 0.

    ``cover_axis``: the output axis; each output unit along it first takes its own position of
    largest hash (the units with the largest such hashes when ``count`` is below the number of
    units), then the rest of ``count`` goes to the largest hashes left.
    """
    layer = check_integer("layer", layer, minimum=0)
    shape = check_shape(f"layer {layer}", shape)
    seed = check_integer("seed", seed, minimum=0)
    size = math.prod(shape)
    if not is_integer(count) or not 0 <= count <= size:
        raise SparseCoreError(f"layer {layer}: cannot activate {count!r} of {size} positions")
    count = int(count)
    if cover_axis is not None and not -len(shape) <= cover_axis < len(shape):
        raise SparseCoreError(
            f"layer {layer}: output axis {cover_axis} is out of range for {shape}"
        )
    hashes = layer_hash(HashKey(seed, 0, layer), shape)
    mask = np.zeros(size, dtype=bool)
    if cover_axis is not None and count:
        units = shape[cover_axis]
        ids = np.moveaxis(np.arange(size).reshape(shape), cover_axis, 0).reshape(units, -1)
        rows = np.moveaxis(hashes, cover_axis, 0).reshape(units, -1)
        best = ids[np.arange(units), rows.argmax(axis=1)]  # each unit's largest hash
        flat = hashes.reshape(-1)
        if count <= units:
            best = best[np.argsort(flat[best])[::-1][:count]]
        mask[best] = True
        count -= int(best.size)
    flat_hashes = hashes.reshape(-1).astype(np.int64)
    flat_hashes[mask] = -1  # taken already
    if count:
        # Hashes of one layer are distinct, so the count-th largest is a clean threshold.
        threshold = np.partition(flat_hashes, size - count)[size - count]
        mask[flat_hashes >= threshold] = True
    return mask.reshape(shape)


def initial_masks(
    shapes: Sequence[tuple[int, ...]],
    density: float,
    method: str = "uniform",
    *,
    seed: int = 0,
    axes: Sequence[int] | None = None,
    max_density: float = 1.0,
    min_density: float = 0.0,
    cover_units: bool = False,
) -> list[np.ndarray]:
    """Initial boolean masks for layers of ``shapes`` (NumPy), exact counts, seeded.

    ``cover_units``: every output unit (along ``axes``, default 0) starts with a weight where
    the budget allows (see the module docstring).
    """
    counts = layer_counts(
        shapes,
        density,
        method,
        axes=axes,
        max_density=max_density,
        min_density=min_density,
        cover_units=cover_units,
    )
    seed = check_integer("seed", seed, minimum=0)
    axes = [0] * len(shapes) if axes is None else list(axes)
    return [
        initial_mask(tuple(s), c, seed=seed, layer=i, cover_axis=a if cover_units else None)
        for i, (s, c, a) in enumerate(zip(shapes, counts, axes))
    ]


def init_scales(mask: np.ndarray, axis: int = 0) -> np.ndarray:
    """Per-position factors for a layer's initial weights: ``sqrt(fan_in / k)`` at the active
    positions of an output unit with ``k`` active weights (``fan_in`` = positions per unit), 0
    elsewhere.

    ``weights * init_scales(mask, axis)`` is the masked layer with each unit's output variance at
    initialisation restored to the dense layer's, whatever fraction of its inputs the unit kept.
    Meant for freshly initialised weights only: on trained weights it changes the function.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 0 or not -mask.ndim <= axis < mask.ndim:
        raise SparseCoreError(f"output axis {axis} is out of range for a mask of {mask.shape}")
    moved = np.moveaxis(mask, axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    per_unit = np.sqrt(rows.shape[1] / np.maximum(rows.sum(axis=1), 1))
    factors = np.where(rows, per_unit[:, None], 0.0)
    return np.moveaxis(factors.reshape(moved.shape), 0, axis)


def _check_density(density: float) -> float:
    return check_real("density", density, low=0.0, high=1.0, low_open=True)
