"""The sharded mask update on CPU processes: its cost against one process, and its traffic.

Work: one update of ResNet-50's 54 weight tensors (``benchmarks/mask_update.py``'s workload:
float32, density 0.1, prune rate 0.5, normal weights and momentum), optionally scaled down
(``--scale 8`` divides every output dimension by 8).

1. In this process (one torch thread): the packed update's scan, whose importance sums are exact
   integer sums (``packed_update.scan``), against the float64 row sums it replaced (written out
   here as ``float64_scan``), and the whole packed update (``TorchBackend(fused=True)``); all as
   ratios to one streaming read of W and P (``|W|.sum()`` and ``|P|.sum()`` per tensor),
   interleaved and repeated (medians and spreads).
2. ``--ranks`` gloo processes started by this script, each holding ``fully_shard``'s rows of
   every layer, one torch thread each: the sharded update (``sparsecore.update`` with
   ``ShardedBackend``) timed on rank 0 (median of the repeats, each ending with a barrier),
   against the single-process packed update of the whole tensors timed in rank 0 too, in the
   same run; the collectives and their bytes, counted on the calls.

Timings are only meaningful on a quiet machine (load average below 1); the traffic figures do not
depend on load. Usage::

    python benchmarks/sharded_update.py [--scale 1] [--ranks 2] [--repeats 5] [--digit-bits 8]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import sparsecore as sc
from sparsecore.torch import TorchBackend
from sparsecore.torch import packed_update as pu
from sparsecore.torch.sharded_update import Shard, ShardedBackend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mask_update import DENSITY, PRUNE_RATE, RESNET50_SHAPES, commit  # the shared workload


def make_layers(scale: int) -> list[sc.Layer]:
    rng = np.random.default_rng(0)
    layers = []
    for i, shape in enumerate(RESNET50_SHAPES):
        shape = (max(1, shape[0] // scale), *shape[1:])
        mask = torch.from_numpy(rng.random(shape, dtype=np.float32) < DENSITY)
        weight = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) * mask
        momentum = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        layers.append(sc.Layer(f"w{i}", weight, mask, momentum))
    return layers


def float64_scan(layers: list[sc.Layer]) -> Any:
    """The scan as it was before the exact sums: float64 row sums of |p| and |p| * mask."""
    layout = pu.layout_for([x.mask.numel() for x in layers], torch.device("cpu"))
    mask = pu.pack([x.mask for x in layers], layout)
    p = pu.pack([x.momentum for x in layers], layout).abs()
    columns = [
        pu.per_layer(mask.sum(dim=1), layout),
        pu.per_layer(p.sum(dim=1, dtype=torch.float64), layout),
        pu.per_layer((p * mask).sum(dim=1, dtype=torch.float64), layout),
    ]
    return pu.read(columns)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def local_part(args: argparse.Namespace) -> None:
    layers = make_layers(args.scale)
    packed = TorchBackend(fused=True)
    candidates: dict[str, Callable[[], Any]] = {
        "floor": lambda: [(x.weight.abs().sum(), x.momentum.abs().sum()) for x in layers],
        "float64_scan": lambda: float64_scan(layers),
        "exact_scan": lambda: pu.scan(layers, "momentum"),
        "packed_update": lambda: sc.update(layers, prune_rate=PRUNE_RATE, backend=packed),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm up (layouts, allocator)
    for r in range(args.repeats):
        names = list(candidates)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(candidates[name]))
    print(f"{'one process':16} {'ms (median, min-max)':>26} {'ratio to floor (min-max)':>28}")
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, times["floor"])]
        print(
            f"{name:16} {1e3 * statistics.median(t):10.1f} ({1e3 * min(t):.1f}-{1e3 * max(t):.1f})"
            f" {statistics.median(ratios):14.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        )


def rank_main(rank: int, world: int, init: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )  # fmt: skip
    layers = make_layers(args.scale)
    mine = []
    for x in layers:
        rows = x.weight.shape[0]
        per = -(-rows // world)
        first, last = min(rank * per, rows), min((rank + 1) * per, rows)
        row = x.weight[0].numel()
        w = Shard(x.weight[first:last].clone(), tuple(x.weight.shape), first * row)
        mine.append(sc.Layer(x.name, w, w.like(x.mask[first:last].clone()),
                             w.like(x.momentum[first:last].clone())))  # fmt: skip
    backend = ShardedBackend(digit_bits=args.digit_bits)
    seen = {"all_reduce": 0, "all_gather": 0, "bytes": 0}
    calls = {"all_reduce": dist.all_reduce, "all_gather": dist.all_gather}

    def counted(name: str) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            t = a[0] if name == "all_reduce" else a[1]
            seen[name] += 1
            seen["bytes"] += t.numel() * t.element_size()
            return calls[name](*a, **k)

        return call

    def sharded() -> None:
        sc.update(mine, prune_rate=PRUNE_RATE, backend=backend)
        dist.barrier()

    sharded()  # warm up, then count one update
    dist.all_reduce, dist.all_gather = counted("all_reduce"), counted("all_gather")  # type: ignore[assignment]
    sharded()
    dist.all_reduce, dist.all_gather = calls["all_reduce"], calls["all_gather"]  # type: ignore[assignment]
    packed = TorchBackend(fused=True)
    one, many = [], []
    for _ in range(args.repeats):
        many.append(timed(sharded))
        dist.barrier()
        if rank == 0:  # the others wait at the barrier: rank 0 has the machine's cores to share
            one.append(timed(lambda: sc.update(layers, prune_rate=PRUNE_RATE, backend=packed)))
        dist.barrier()
    if rank == 0:
        ratios = [a / b for a, b in zip(many, one)]
        print(f"sharded update on {world} ranks: {1e3 * statistics.median(many):.1f} ms "
              f"(min {1e3 * min(many):.1f}); one process, whole tensors: "
              f"{1e3 * statistics.median(one):.1f} ms; ratio {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
        print(f"collectives per update: {seen['all_reduce']} all-reduces, {seen['all_gather']} "
              f"all-gathers, {seen['bytes']} bytes sent by each rank before the ring "
              f"({seen['bytes'] / len(layers):.0f} per layer)")  # fmt: skip
    dist.barrier()
    gc.collect()  # free cyclic models while the process group lives (gloo exit aborts)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--digit-bits", type=int, default=8)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank is not None:
        rank_main(args.rank, args.ranks, args.init, args)
        sys.stdout.flush()
        os._exit(0)  # gloo's threads may abort the interpreter's teardown
    torch.set_num_threads(1)
    n = sum(x.weight.numel() for x in make_layers(args.scale))
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit()}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"# ResNet-50 / {args.scale}: {len(RESNET50_SHAPES)} tensors, {n / 1e6:.2f}M weights, "
          f"density {DENSITY}, prune rate {PRUNE_RATE}, {args.repeats} repeats")  # fmt: skip
    local_part(args)
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        base = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])]
        procs = [
            subprocess.Popen([*base, "--rank", str(r), "--init", init]) for r in range(args.ranks)
        ]
        for p in procs:
            p.wait()
    print(f"# load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
