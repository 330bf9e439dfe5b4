"""Initial masks: how many weights each layer starts with, and which ones.

Counts are exact integers summing to ``N = round(density * sum n_l)``. Densities follow ``uniform``,
``ER`` or ``ERK``; a layer whose density would exceed the ceiling (1, or ``max_density``) is filled
to the ceiling and the others re-solved (RigL's rule), which is precisely the water-filling split of
:func:`sparsecore.redistribute.split_budget` with layer sizes as capacities. Positions are the
largest position hashes of update 0, so masks are reproducible from the seed alone.
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
) -> list[int]:
    """Exact initial active count per layer (summing to :func:`target_count`).

    A setting that leaves no weight active (``density=0.01`` of a 3x3 layer rounds to 0) is
    refused rather than zeroing every sparse layer.
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
    extra = split_budget(total - int(floor.sum()), raw * sizes, ceiling - floor)
    return [int(c) for c in floor + extra]


def layer_densities(
    shapes: Sequence[tuple[int, ...]], density: float, method: str = "uniform", **kwargs: object
) -> list[float]:
    """Initial density per layer (exact counts divided by sizes); see :func:`layer_counts`."""
    counts = layer_counts(shapes, density, method, **kwargs)  # type: ignore[arg-type]
    return [c / math.prod(s) for c, s in zip(counts, shapes)]


def initial_mask(shape: tuple[int, ...], count: int, *, seed: int, layer: int) -> np.ndarray:
    """Boolean mask with ``count`` active positions: the largest hashes of update 0."""
    layer = check_integer("layer", layer, minimum=0)
    shape = check_shape(f"layer {layer}", shape)
    seed = check_integer("seed", seed, minimum=0)
    size = math.prod(shape)
    if not is_integer(count) or not 0 <= count <= size:
        raise SparseCoreError(f"layer {layer}: cannot activate {count!r} of {size} positions")
    count = int(count)
    hashes = layer_hash(HashKey(seed, 0, layer), shape).reshape(-1)
    mask = np.zeros(size, dtype=bool)
    if count:
        # Hashes of one layer are distinct, so the count-th largest is a clean threshold.
        threshold = np.partition(hashes, size - count)[size - count]
        mask[hashes >= threshold] = True
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
) -> list[np.ndarray]:
    """Initial boolean masks for layers of ``shapes`` (NumPy), exact counts, seeded."""
    counts = layer_counts(
        shapes, density, method, axes=axes, max_density=max_density, min_density=min_density
    )
    seed = check_integer("seed", seed, minimum=0)
    return [
        initial_mask(tuple(s), c, seed=seed, layer=i)
        for i, (s, c) in enumerate(zip(shapes, counts))
    ]


def _check_density(density: float) -> float:
    return check_real("density", density, low=0.0, high=1.0, low_open=True)
