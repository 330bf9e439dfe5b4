"""Cost of one sparse-momentum mask update over ResNet-50 on a GPU: time, launches, host syncs.

The work is that of ``benchmarks/mask_update.py`` (PERFORMANCE.md section 1): one full engine
update (importance, prune, redistribute, regrow, apply) over ResNet-50's 54 weight tensors
(25.5M weights), density 0.1, prune rate 0.5, float32 weights and momentum, here held in device
memory. Candidates:

- ``floor_stream``: one streaming read of every weight and momentum tensor,
  ``torch._foreach_norm(W, 1)`` and ``torch._foreach_norm(P, 1)`` (a few launches for all
  tensors): the normaliser of the target (an update within 5x of it);
- ``floor_layers``: ``|W|.sum()`` and ``|P|.sum()`` per tensor (108 reductions), the floor of
  the earlier tables (docs/kernels-gpu.md; there with CuPy);
- ``packed``: :class:`~sparsecore.torch.backend.TorchBackend` with its packed update (all
  layers at once, :mod:`sparsecore.torch.packed_update`), what ``attach`` uses on CUDA tensors;
- ``engine``: the same through ``SparseEngine.update``, as ``attach`` calls it (the check of
  the total count and the ever-active masks included);
- ``layers``: ``TorchBackend(fused=False)``, the per-layer path (``attach`` on CUDA before);
- ``cupy``: :class:`sparsecore.cupy.CupyBackend` on CuPy arrays (when CuPy is installed).

Before timing, every update candidate's masks and weights are checked against the NumPy
reference bit for bit (``engine``: masks and report against the NumPy engine). Each timed call
ends with a device synchronisation, so wall time is the whole cost, host work included. Runs
are interleaved and repeated; the table gives medians, spreads and the per-round ratios to both
floors. Then one more call of each candidate is profiled: kernel launches and GPU busy time
(``torch.profiler``'s CUDA activity sees every kernel of the process, CuPy's too), memory copies,
and host synchronisations (counted by ``torch.cuda.set_sync_debug_mode('warn')``, which sees
torch's only: '-' for CuPy), and the peak device memory the call allocated.

With ``--device cpu`` the same script runs on CPU tensors (the packed path forced with
``TorchBackend(fused=True)``): a smoke test of the script, whose figures are CPU figures;
aten operations are counted instead of kernels and there are no synchronisations::

    python benchmarks/mask_update_gpu.py [--device cuda|cpu] [--repeats 9] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import sparsecore as sc
from sparsecore.torch.backend import TorchBackend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mask_update import (  # the CPU benchmark's workload and helpers
    DENSITY,
    PRUNE_RATE,
    commit,
    full_update,
    make_layers,
)

UPDATES = ("packed", "engine", "layers", "cupy")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def as_torch(layers: list[sc.Layer], device: str) -> list[sc.Layer]:
    return [
        sc.Layer(x.name, *(torch.from_numpy(a).to(device) for a in (x.weight, x.mask, x.momentum)))
        for x in layers
    ]


def engine_pair(
    device: str, shapes: list[tuple[int, ...]]
) -> tuple[Callable[[], Any], Callable[[], bool]]:
    """The engine candidate, and its check against the NumPy engine on the same masks."""
    config = sc.SparseConfig(density=DENSITY, init="uniform")
    names = [f"w{i}" for i in range(len(shapes))]
    rng = np.random.default_rng(1)
    reference = sc.SparseEngine(config, names, shapes)
    numpy_layers = []
    for name, shape, mask in zip(names, shapes, reference.initial_masks()):
        weight = rng.standard_normal(shape, dtype=np.float32) * mask
        numpy_layers.append(sc.Layer(name, weight, mask, rng.standard_normal(shape, np.float32)))
    torch_layers = as_torch(numpy_layers, device)
    engine = sc.SparseEngine(config, names, shapes)
    backend = TorchBackend(fused=True if device == "cpu" else None)

    def run() -> sc.UpdateResult:
        engine.updates, engine.ever_active = 0, None  # the same update every time
        engine.history.clear()
        return engine.update(torch_layers, step=1, backend=backend, prune_rate=PRUNE_RATE)

    def check() -> bool:
        want = reference.update(numpy_layers, step=1, backend="numpy", prune_rate=PRUNE_RATE)
        got = run()
        same = all(np.array_equal(a, b.cpu().numpy()) for a, b in zip(want.masks, got.masks))
        near = all(
            abs(a.importance - b.importance) <= 1e-12 * abs(a.importance)
            and (a.pruned, a.grown, a.net_pruned, a.net_grown)
            == (b.pruned, b.grown, b.net_pruned, b.net_grown)
            for a, b in zip(want.report.layers, got.report.layers)
        )
        return same and near and got.weights is not None

    return run, check


def candidates(layers: list[sc.Layer], device: str, names: list[str]) -> dict[str, Any]:
    """name -> zero-argument callable (and the checks of the update candidates)."""
    torch_layers = as_torch(layers, device)
    weights = [x.weight for x in torch_layers]
    momenta = [x.momentum for x in torch_layers]

    def floor_stream() -> None:
        torch._foreach_norm(weights, 1)
        torch._foreach_norm(momenta, 1)

    def floor_layers() -> None:
        for w, p in zip(weights, momenta):
            w.abs().sum()
            p.abs().sum()

    fns: dict[str, Callable[[], Any]] = {"floor_stream": floor_stream, "floor_layers": floor_layers}
    checks: dict[str, Callable[[], bool]] = {}
    packed = TorchBackend(fused=True if device == "cpu" else None)
    reference = [np.asarray(a) for a in full_update(layers, sc.get_backend("numpy"))]

    def agrees(fn: Callable[[], Any]) -> Callable[[], bool]:
        def check() -> bool:
            got = [to_host(a) for a in fn()]
            return all(
                np.array_equal(g.view(np.uint8), r.view(np.uint8)) for g, r in zip(got, reference)
            )

        return check

    for name in names:
        if name == "packed":
            fns[name] = functools.partial(full_update, torch_layers, packed)
        elif name == "layers":
            fns[name] = functools.partial(full_update, torch_layers, TorchBackend(fused=False))
        elif name == "engine":
            fns[name], checks[name] = engine_pair(device, [x.weight.shape for x in layers])
            continue
        elif name == "cupy":
            try:
                import cupy

                from sparsecore.cupy import CupyBackend

                if device != "cuda" or not cupy.cuda.is_available():
                    raise ImportError("no GPU")
            except ImportError as err:
                print(f"# cupy candidate left out ({err})")
                continue
            cupy_layers = [
                sc.Layer(x.name, *(cupy.asarray(a) for a in (x.weight, x.mask, x.momentum)))
                for x in layers
            ]
            fns[name] = functools.partial(full_update, cupy_layers, CupyBackend())
        checks[name] = agrees(fns[name])
    return {"fns": fns, "checks": checks}


def to_host(a: Any) -> np.ndarray:
    """A CuPy array or a tensor, copied to a NumPy array."""
    if isinstance(a, torch.Tensor):
        return a.cpu().numpy()
    return np.asarray(a.get() if hasattr(a, "get") else a)


def measure(fns: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up: kernel compilation, layouts, allocator pools
        fn()
        synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def profile_call(fn: Callable[[], Any], device: str, table: list[str]) -> dict[str, Any]:
    """Launches, GPU busy time, copies, host synchronisations and peak memory of one call;
    its per-operation profile is appended to ``table``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    for sort in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        if device == "cuda" or sort == "self_cpu_time_total":
            try:
                table.append(prof.key_averages().table(sort_by=sort, row_limit=25))
                break
            except Exception as err:  # an older sort key name: try the next
                table.append(f"(sort by {sort}: {err})\n")
    if device == "cuda":
        on_gpu = [e for e in events if e.device_type == DeviceType.CUDA]
        copies = [e for e in on_gpu if e.name.startswith(("Memcpy", "Memset"))]
        kernels = [e for e in on_gpu if not e.name.startswith(("Memcpy", "Memset"))]
        out["launches"] = len(kernels)
        out["copies"] = len(copies)
        out["gpu_ms"] = sum(e.time_range.elapsed_us() for e in on_gpu) / 1e3
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        out["launches"] = sum(e.name.startswith("aten::") for e in events)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--candidates", default=",".join(UPDATES))
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--profile-table", help="write each candidate's operation profile here")
    parser.add_argument(
        "--layers", type=int, default=None, help="only the first N tensors (a quicker smoke test)"
    )
    args = parser.parse_args(argv)
    device = args.device

    layers = make_layers()[: args.layers]
    n = sum(x.weight.size for x in layers)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke test: CPU figures)"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    revision = os.environ.get("SPARSECORE_COMMIT") or commit()
    print(f"# {stamp}, {where}, commit {revision}, torch {torch.__version__}")
    print(f"# ResNet-50: {len(layers)} of its tensors, {n / 1e6:.2f}M weights, density {DENSITY}, "
          f"prune rate {PRUNE_RATE}, float32, on {device}")  # fmt: skip
    if device == "cpu":
        print(f"# load average {os.getloadavg()[0]:.1f}, {torch.get_num_threads()} torch threads")
    built = candidates(layers, device, [c for c in args.candidates.split(",") if c])
    fns, checks = built["fns"], built["checks"]
    for name, check in checks.items():
        same = check()
        print(f"# {name}: equal to the NumPy reference bit for bit: {same}")
        if not same:
            raise SystemExit(f"{name} disagrees with the NumPy reference")
    times = measure(fns, args.repeats, device)
    unit = "launches" if device == "cuda" else "aten ops"
    where_time = "GPU" if device == "cuda" else "CPU"
    tables: dict[str, list[str]] = {name: [] for name in fns}
    profiles = {name: profile_call(fn, device, tables[name]) for name, fn in fns.items()}
    if args.profile_table:
        with open(args.profile_table, "w") as f:
            for name, table in tables.items():
                f.write(f"===== {name}: torch.profiler, one call, by own {where_time} time\n")
                f.write("".join(table) + "\n\n")

    print(
        f"{'':13} {'wall ms (median, min-max)':>27} {'/ stream':>9} {'/ layers':>9} "
        f"{unit:>9} {'syncs':>6} {'GPU ms':>7} {'peak MiB':>9}"
    )
    for name, t in times.items():
        p = profiles[name]
        stream = statistics.median(a / b for a, b in zip(t, times["floor_stream"]))
        per_layer = statistics.median(a / b for a, b in zip(t, times["floor_layers"]))
        syncs = p.get("syncs", "-") if name != "cupy" else "-"
        gpu_ms = f"{p['gpu_ms']:7.2f}" if "gpu_ms" in p else f"{'-':>7}"
        peak = f"{p['peak_mib']:9.0f}" if "peak_mib" in p else f"{'-':>9}"
        print(
            f"{name:13} {1e3 * statistics.median(t):9.2f} ({1e3 * min(t):7.2f}-{1e3 * max(t):7.2f})"
            f" {stream:9.1f} {per_layer:9.2f} {p['launches']:9d} {syncs!s:>6} {gpu_ms} {peak}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"date": stamp, "device": where, "commit": revision, "torch": torch.__version__,
                 "weights": n, "times_s": times, "profiles": profiles},
                f, indent=1,
            )  # fmt: skip


if __name__ == "__main__":
    main()
