"""Cost of one sparse-momentum mask update over ResNet-50 on a GPU, per backend, against a floor.

The work is that of ``benchmarks/mask_update.py`` (PERFORMANCE.md section 1): one full engine
update (importance, prune, redistribute, regrow, apply) over ResNet-50's 54 weight tensors
(25.5M weights), density 0.1, prune rate 0.5, float32 weights and momentum, here held in GPU
memory. Candidates:

- ``cupy``: :class:`sparsecore.cupy.CupyBackend` on CuPy arrays;
- ``torch``: :class:`sparsecore.torch.backend.TorchBackend` on CUDA tensors;
- ``floor``: one streaming read of every weight and momentum tensor on the GPU (``|W|.sum()`` and
  ``|P|.sum()`` per layer, with CuPy), the normaliser.

Before timing, both backends' new masks and weights are checked against the NumPy reference bit
for bit (on the host). Each timed call ends with a device synchronisation, so the wall time is
the update's whole cost, host work and the per-layer scalars that come back included. Runs are
interleaved and repeated; the table gives medians, spreads and the per-round ratio to the floor::

    python benchmarks/mask_update_gpu.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import sparsecore as sc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mask_update import (  # the CPU benchmark's workload and helpers
    DENSITY,
    PRUNE_RATE,
    commit,
    full_update,
    make_layers,
)


def gpu_candidates(
    layers: list[sc.Layer],
) -> tuple[dict[str, Callable[[], Any]], Callable[[], None]]:
    """name -> zero-argument callable, and the synchronisation that ends every timed call."""
    import cupy
    import torch

    from sparsecore.cupy import CupyBackend
    from sparsecore.torch.backend import TorchBackend

    cupy_layers = [
        sc.Layer(x.name, cupy.asarray(x.weight), cupy.asarray(x.mask), cupy.asarray(x.momentum))
        for x in layers
    ]
    torch_layers = [
        sc.Layer(
            x.name,
            torch.from_numpy(x.weight).cuda(),
            torch.from_numpy(x.mask).cuda(),
            torch.from_numpy(x.momentum).cuda(),
        )
        for x in layers
    ]

    def floor() -> float:
        total = cupy.zeros((), dtype=cupy.float32)
        for x in cupy_layers:
            total += cupy.abs(x.weight).sum() + cupy.abs(x.momentum).sum()
        return float(total)

    def synchronize() -> None:
        cupy.cuda.runtime.deviceSynchronize()

    fns: dict[str, Callable[[], Any]] = {
        "floor": floor,
        "cupy": functools.partial(full_update, cupy_layers, CupyBackend()),
        "torch": functools.partial(full_update, torch_layers, TorchBackend()),
    }
    return fns, synchronize


def to_host(a: Any) -> np.ndarray:
    """A CuPy array or a CUDA tensor, copied to a NumPy array."""
    if hasattr(a, "cpu"):
        return np.asarray(a.cpu().numpy())
    return np.asarray(a.get() if hasattr(a, "get") else a)


def check_agreement(layers: list[sc.Layer], fns: dict[str, Callable[[], Any]]) -> None:
    reference = full_update(layers, sc.get_backend("numpy"))
    for name in ("cupy", "torch"):
        got = [to_host(a) for a in fns[name]()]
        same = all(
            np.array_equal(g.view(np.uint8), np.asarray(r).view(np.uint8))
            for g, r in zip(got, reference)
        )
        print(f"# {name}: masks and weights equal to numpy's bit for bit: {same}")
        if not same:
            raise SystemExit(f"{name} disagrees with the NumPy reference")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)

    import cupy

    layers = make_layers()
    n = sum(x.weight.size for x in layers)
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{props['name'].decode()}, commit {os.environ.get('SPARSECORE_COMMIT') or commit()}")  # fmt: skip
    print(f"# ResNet-50: {len(layers)} tensors, {n / 1e6:.2f}M weights, density {DENSITY}, "
          f"prune rate {PRUNE_RATE}, float32, on the GPU")  # fmt: skip
    fns, synchronize = gpu_candidates(layers)
    check_agreement(layers, fns)
    for fn in fns.values():  # warm-up: kernel compilation, allocator pools
        fn()
        synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            synchronize()
            start = time.perf_counter()
            fns[name]()
            synchronize()
            times[name].append(time.perf_counter() - start)
    print(f"{'':8} {'wall ms (median, min-max)':>28} {'ratio to floor (median, min-max)':>34}")
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, times["floor"])]
        print(
            f"{name:8} {1e3 * statistics.median(t):10.2f} ({1e3 * min(t):7.2f}-{1e3 * max(t):7.2f})"
            f" {statistics.median(ratios):14.1f} ({min(ratios):6.1f}-{max(ratios):6.1f})"
        )


if __name__ == "__main__":
    main()
