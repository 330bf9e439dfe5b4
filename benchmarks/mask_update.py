"""Cost of one sparse-momentum mask update over ResNet-50, per backend, against a streaming floor.

Work (PERFORMANCE.md section 1): one full engine update (importance, prune, redistribute, regrow,
apply) over ResNet-50's 54 weight tensors (53 convolutions + the classifier, 25.5M weights),
density 0.1, prune rate 0.5, float32 weights (masked) and momentum drawn from a normal
distribution. The normaliser, measured in the same run, is one streaming read of every weight and
momentum tensor (``np.abs(W).sum()`` and ``np.abs(P).sum()`` over all layers): it scales with the
machine's speed and load, so the ratios are what to compare between machines.

Runs are interleaved (each round times every candidate, in a rotated order) and repeated; the
table gives the median wall time, its spread (min-max), and the median per-round ratio to the
floor with its spread. CPU time (all threads) is shown too, with its ratio of medians to the
floor's: on a shared machine it is the steadier figure. The Numba first-call time (compilation, then the on-disk cache) is measured in fresh
processes. Usage::

    python benchmarks/mask_update.py [--repeats 9] [--backends numpy,numba,numba_generic,torch]

``numba`` is the Numba backend with its fused update (two reads per layer, the new weights
computed with the masks); ``numba_generic`` the same backend through the generic engine path
(selection, boolean passes and ``apply_masks`` as separate calls).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import sparsecore as sc

# (out, in, kh, kw) of every convolution of torchvision's ResNet-50 in definition order, then fc.
_BOTTLENECKS = [(64, 3), (128, 4), (256, 6), (512, 3)]  # (planes, blocks) per stage


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 54 weight shapes: conv1, 16 bottlenecks (1x1, 3x3, 1x1, plus a 1x1 downsample in the
    first block of each stage), and the 2048->1000 classifier."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7)]
    channels = 64
    for planes, blocks in _BOTTLENECKS:
        for block in range(blocks):
            shapes += [(planes, channels, 1, 1), (planes, planes, 3, 3), (4 * planes, planes, 1, 1)]
            if block == 0:
                shapes.append((4 * planes, channels, 1, 1))
            channels = 4 * planes
    shapes.append((1000, 2048))
    return shapes


RESNET50_SHAPES = resnet50_shapes()
assert len(RESNET50_SHAPES) == 54
DENSITY, PRUNE_RATE = 0.1, 0.5


def make_layers(seed: int = 0) -> list[sc.Layer]:
    rng = np.random.default_rng(seed)
    layers = []
    for i, shape in enumerate(RESNET50_SHAPES):
        mask = rng.random(shape, dtype=np.float32) < DENSITY
        weight = rng.standard_normal(shape, dtype=np.float32) * mask
        momentum = rng.standard_normal(shape, dtype=np.float32)
        layers.append(sc.Layer(f"w{i}", weight, mask, momentum))
    return layers


def floor(layers: list[sc.Layer]) -> float:
    """One streaming read of W and P: the normaliser."""
    total = 0.0
    for x in layers:
        total += float(np.abs(x.weight).sum()) + float(np.abs(np.asarray(x.momentum)).sum())
    return total


def full_update(layers: list[Any], backend: sc.ArrayBackend) -> list[Any]:
    """New weights and masks. A backend with the fused update returns the weights with the
    masks (``result.weights``); the others apply the masks in a second call."""
    result = sc.update(layers, prune_rate=PRUNE_RATE, update_index=1, seed=0, backend=backend)
    weights = result.weights
    if weights is None:
        weights = sc.apply_masks(layers, result.masks, backend=backend)
    return weights + result.masks


def candidates(names: list[str], layers: list[sc.Layer]) -> dict[str, Callable[[], Any]]:
    """name -> zero-argument callable; a backend that cannot be imported is left out (said so)."""
    out: dict[str, Callable[[], Any]] = {"floor": lambda: floor(layers)}
    for name in names:
        if name == "torch":
            try:
                import torch

                from sparsecore.torch.backend import TorchBackend
            except ImportError as err:
                print(f"# torch backend not available ({err}); skipped")
                continue
            torch_layers = [
                sc.Layer(
                    x.name,
                    torch.from_numpy(x.weight),
                    torch.from_numpy(x.mask),
                    torch.from_numpy(x.momentum),
                )
                for x in layers
            ]
            out["torch"] = functools.partial(full_update, torch_layers, TorchBackend())
        elif name == "numba_generic":  # the Numba operations without the fused capability
            from sparsecore.backend_numba import NumbaBackend

            out[name] = functools.partial(full_update, layers, NumbaBackend(fused=False))
        else:
            out[name] = functools.partial(full_update, layers, sc.get_backend(name))
    return out


def check_agreement(fns: dict[str, Callable[[], Any]]) -> None:
    """Every backend's new masks and weights equal the NumPy reference's, bit for bit."""
    if "numpy" not in fns:
        return
    reference = [np.asarray(a) for a in fns["numpy"]()]
    for name, fn in fns.items():
        if name in ("floor", "numpy"):
            continue
        got = [np.asarray(a.numpy() if hasattr(a, "numpy") else a) for a in fn()]
        same = all(
            np.array_equal(g.view(np.uint8), r.view(np.uint8)) for g, r in zip(got, reference)
        )
        print(f"# {name}: masks and weights equal to numpy's bit for bit: {same}")
        if not same:
            raise SystemExit(f"{name} disagrees with the NumPy reference")


def measure(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, list[float]]]:
    names = list(fns)
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for fn in fns.values():  # warm-up: compilation, allocator, thread pools
        fn()
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


COMPILE_SNIPPET = """
import time
t0 = time.perf_counter()
import numpy as np
import sparsecore as sc
rng = np.random.default_rng(0)
layers = []
for i, shape in enumerate([(64, 27), (256, 256), (300, 700)]):
    mask = rng.random(shape) < 0.1
    layers.append(sc.Layer(f"l{i}", (rng.standard_normal(shape) * mask).astype(np.float32),
                           mask, rng.standard_normal(shape).astype(np.float32)))
t1 = time.perf_counter()
result = sc.update(layers, prune_rate=0.5, backend="numba")
sc.apply_masks(layers, result.masks, backend="numba")
print(time.perf_counter() - t1)
"""


def compile_times(runs: int = 2) -> tuple[list[float], list[float]]:
    """First float32 update in a fresh process: with an empty cache, then with the cache filled."""
    cold: list[float] = []
    warm: list[float] = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            for bucket in (cold, warm):
                out = subprocess.run(
                    [sys.executable, "-c", COMPILE_SNIPPET], env=env, check=True,
                    capture_output=True, text=True,
                )  # fmt: skip
                bucket.append(float(out.stdout.strip().splitlines()[-1]))
    return cold, warm


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--backends", default="numpy,numba,numba_generic,torch")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile-time runs")
    args = parser.parse_args(argv)

    import numba

    layers = make_layers()
    n = sum(x.weight.size for x in layers)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}, commit {commit()}")
    print(f"# ResNet-50: {len(layers)} tensors, {n / 1e6:.2f}M weights, density {DENSITY}, "
          f"prune rate {PRUNE_RATE}; numba threads {numba.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    fns = candidates(args.backends.split(","), layers)
    if "torch" in fns:
        import torch

        print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    check_agreement(fns)
    times = measure(fns, args.repeats)
    base = times["floor"]
    print(
        f"{'':14} {'wall ms (median, min-max)':>28} {'cpu ms':>8} "
        f"{'wall ratio to floor (min-max)':>30} {'cpu ratio':>9}"
    )
    for name, t in times.items():
        ratios = [w / f for w, f in zip(t["wall"], base["wall"])]
        cpu_ratio = statistics.median(t["cpu"]) / statistics.median(base["cpu"])
        print(
            f"{name:14} {1e3 * statistics.median(t['wall']):10.1f} "
            f"({1e3 * min(t['wall']):7.1f}-{1e3 * max(t['wall']):7.1f}) "
            f"{1e3 * statistics.median(t['cpu']):8.1f} "
            f"{statistics.median(ratios):14.2f} ({min(ratios):6.2f}-{max(ratios):6.2f}) "
            f"{cpu_ratio:9.2f}"
        )
    if not args.no_compile and "numba" in fns:
        cold, warm = compile_times()
        print(f"# numba first float32 update in a fresh process: cold cache "
              f"{', '.join(f'{c:.1f}' for c in cold)} s; warm cache "
              f"{', '.join(f'{w:.2f}' for w in warm)} s")  # fmt: skip


if __name__ == "__main__":
    main()
