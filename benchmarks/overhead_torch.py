"""Overhead of ``sparsecore.torch.attach`` on a CPU training epoch, and its peak memory.

For each model (LeNet-300-100 and LeNet-5 on Fashion-MNIST) three loops run interleaved, in a
fresh random order every round: the plain loop (dense SGD with momentum, no sparsecore), the same
loop after ``attach(model, optimizer)`` (the optimizer-momentum path) and after ``attach(model)``
(the library's own gradient EMA, found through the global optimizer hook). Mask updates are
included (every 100 steps, the default). The figure is the epoch time with attach divided by the
plain epoch time of the same round; we print the median ratio and its spread (min..max) over the
rounds. Each configuration starts from the same weights. Peak memory: each configuration runs a
short loop in a fresh subprocess and reports ``ru_maxrss``; the extra tensors the adapter keeps
(masks, 0/1 multipliers, own momentum) are counted exactly as well.

The plain and attached loops compute the same dense products (attach without ``kernels=`` only
masks the weights), so the ratio isolates the adapter's bookkeeping: re-masking after each step,
the EMA for the own-momentum path, and the mask updates themselves.

Usage: ``python benchmarks/overhead_torch.py [--rounds 5] [--threads 1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CONFIGS = ("plain", "attach_optimizer", "attach_own")
MODELS = {"lenet300": 60000, "lenet5": 10000}  # images per measured epoch


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    from sparsecore.datasets import load_fashion_mnist

    ds = load_fashion_mnist()
    x = torch.from_numpy(ds.train_images[:n].astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(ds.train_labels[:n])
    return (x - 0.2860) / 0.3530, y, f"{ds.name} ({ds.source}), {x.shape[0]} images"


def _model(name: str) -> nn.Module:
    from sparsecore.torch.models import build_model

    torch.manual_seed(0)
    return build_model(name)


def _epoch(name: str, config: str, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    import sparsecore.torch as st

    model = _model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sparse = None
    steps = x.shape[0] // batch
    if config == "attach_optimizer":
        sparse = st.attach(model, opt, update_every=100, total_steps=10 * steps)
    elif config == "attach_own":
        sparse = st.attach(model, update_every=100, total_steps=10 * steps)
    start = time.perf_counter()
    for i in range(steps):
        xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    elapsed = time.perf_counter() - start
    if sparse is not None:
        assert len(sparse.history) == steps // 100, "mask updates did not run"
        sparse.detach()
    return elapsed


def _extra_bytes(name: str, config: str) -> int:
    """Bytes of the tensors the adapter adds (masks, 0/1 multipliers, own momentum)."""
    if config == "plain":
        return 0
    import sparsecore.torch as st

    model = _model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sparse = st.attach(model, opt if config == "attach_optimizer" else None, total_steps=100)
    tensors = [*sparse.masks, *sparse._keep, *(o for o in sparse._own if o is not None)]
    sparse.detach()
    return sum(t.numel() * t.element_size() for t in tensors)


def _peak_rss_child(name: str, config: str, threads: int, steps: int) -> int:
    """Peak resident set (KiB) of a fresh process training ``steps`` steps under ``config``."""
    code = (
        "import resource, sys, torch\n"
        f"torch.set_num_threads({threads})\n"
        "sys.argv = ['x']\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('ov', {__file__!r})\n"
        "ov = importlib.util.module_from_spec(spec); spec.loader.exec_module(ov)\n"
        f"x, y, _ = ov._data({steps * 100})\n"
        f"ov._epoch({name!r}, {config!r}, x, y, 100)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--memory-steps", type=int, default=200)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "models": {},
    }
    rng = random.Random(0)
    for name in args.models:
        x, y, described = _data(MODELS[name])
        _epoch(name, "attach_optimizer", x[:2000], y[:2000], args.batch)  # warm-up
        times: dict[str, list[float]] = {c: [] for c in CONFIGS}
        for _ in range(args.rounds):
            order = list(CONFIGS)
            rng.shuffle(order)
            for config in order:
                times[config].append(_epoch(name, config, x, y, args.batch))
        ratios = {c: [t / p for t, p in zip(times[c], times["plain"])] for c in CONFIGS[1:]}
        memory = {
            c: {
                "peak_rss_kib": _peak_rss_child(name, c, args.threads, args.memory_steps),
                "adapter_tensor_bytes": _extra_bytes(name, c),
            }
            for c in CONFIGS
        }
        entry = {
            "data": described,
            "steps_per_epoch": x.shape[0] // args.batch,
            "plain_epoch_s": {
                "median": statistics.median(times["plain"]),
                "min": min(times["plain"]),
                "max": max(times["plain"]),
            },
            "overhead": {
                c: {
                    "median_ratio": statistics.median(r),
                    "min_ratio": min(r),
                    "max_ratio": max(r),
                }
                for c, r in ratios.items()
            },
            "memory": memory,
        }
        results["models"][name] = entry
        print(
            f"{name}: {described}, {entry['steps_per_epoch']} steps/epoch, "
            f"plain epoch {entry['plain_epoch_s']['median']:.2f} s (median of {args.rounds})"
        )
        for c, r in ratios.items():
            print(
                f"  {c:18s} epoch time ratio median {statistics.median(r):.3f} "
                f"(min {min(r):.3f}, max {max(r):.3f})"
            )
        for c, m in memory.items():
            print(
                f"  {c:18s} peak RSS {m['peak_rss_kib'] / 1024:.1f} MiB, adapter tensors "
                f"{m['adapter_tensor_bytes'] / 1024:.1f} KiB"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
