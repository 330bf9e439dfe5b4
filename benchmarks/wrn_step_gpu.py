"""One training step of WRN-16-10 at 5% density on a GPU, with and without the sparse CUDA kernels.

Work (PERFORMANCE.md section 3): WRN-16-10 (widths 160/320/640, CIFAR-shaped 3x32x32 input, batch
128), SGD with Nesterov momentum, one step = zero_grad, forward, cross-entropy, backward,
optimizer step (plus sparsecore's mask re-application where attached). Configurations, timed
interleaved in rounds, each a median of CUDA-event step times after warm-up:

- ``dense fp32`` / ``dense tf32``: no sparsecore, cuDNN with TF32 off / on;
- ``masked``: ``attach(model, optimizer, density=0.05)``: dense math on masked weights;
- ``kernels``: ``attach(..., kernels="cuda")`` outside the dense-gradient window (weight gradient
  on the mask only: the usual step);
- ``kernels, window``: the same inside the window before a mask update (dense weight gradient).

No mask update happens during timing (masks static), so the figures are the per-step cost. Usage::

    python benchmarks/wrn_step_gpu.py [--reps 20] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
from torch import nn

import sparsecore.torch as st
from sparsecore.torch.models import SmallWRN

DENSITY = 0.05


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallWRN(num_classes=10, depth=16, widen_factor=10)
    model.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)  # CIFAR stem
    return model.cuda()


def make(config: str) -> Callable[[], None]:
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    if config == "masked":
        st.attach(model, optimizer, density=DENSITY, update_every=None)
    elif config == "kernels":
        st.attach(model, optimizer, density=DENSITY, update_every=None, kernels="cuda")
    elif config == "kernels, window":
        # Epoch-end updates with the epoch length not yet known: every step is inside the window.
        st.attach(
            model,
            optimizer,
            density=DENSITY,
            update_every=None,
            update_at_epoch_end=True,
            total_steps=10**6,
            kernels="cuda",
        )
    x = torch.randn(128, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        torch.backends.cudnn.allow_tf32 = config == "dense tf32"
        torch.backends.cuda.matmul.allow_tf32 = config == "dense tf32"
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step


def time_step(step: Callable[[], None], reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    configs = ["dense fp32", "dense tf32", "masked", "kernels", "kernels, window"]
    steps = {c: make(c) for c in configs}
    samples: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs[r % len(configs) :] + configs[: r % len(configs)]:
            samples[c] += time_step(steps[c], args.reps, args.warmup)
    print(f"{torch.cuda.get_device_name()}  WRN-16-10, batch 128, density {DENSITY}")
    base = statistics.median(samples["dense fp32"])
    print(f"{'config':<18}{'median ms':>10}{'min..max ms':>18}{'fp32 / this':>13}")
    rows = []
    for c in configs:
        med = statistics.median(samples[c])
        lo, hi = min(samples[c]), max(samples[c])
        rows.append({"config": c, "median_ms": med, "min_ms": lo, "max_ms": hi})
        print(f"{c:<18}{med:>10.2f}{lo:>9.2f}..{hi:<8.2f}{base / med:>12.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
