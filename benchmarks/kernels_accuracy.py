"""Does training on the sparse CPU kernels cost accuracy? Paired seeds on Fashion-MNIST.

LeNet-300-100 (784-300-100-10) at 5% density with sparse momentum, the paper's Fashion-MNIST
recipe (SGD, Nesterov momentum 0.9, lr 0.1 divided by 10 at 50% and 75% of training, weight
decay 5e-4, batch 100, mask update at every epoch end but the last). Two runs per seed, same
data order and initial weights:

- ``reference``: ``attach(..., kernels=None)``: dense computation on masked weights, dense
  weight gradients at every step;
- ``kernels``: ``attach(..., kernels="cpu")``: the sparse CPU kernels, weight gradients on the
  mask only, except in the window of ~1/(1-beta) steps before each mask update where they are
  dense (sparse momentum reads momentum at inactive positions to choose what to regrow).

Prints per-seed final test accuracy, the paired differences (kernels - reference) with their
mean, standard deviation and a 95% t-interval, and the epoch times. The claim checked: the mean
difference is within 0.3 points.

    nice python benchmarks/kernels_accuracy.py --seeds 0 1 2 3 4 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (PyTorch's and Numba's pools take turns).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sparsecore.datasets import load_fashion_mnist
from sparsecore.torch import attach

# Two-sided 95% Student t quantiles for 1..9 degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def lenet300() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def run(seed: int, kernels: str | None, epochs: int, data, limit: int | None) -> dict:
    torch.manual_seed(seed)
    x_train = torch.from_numpy(data.train_images.astype(np.float32) / 255.0)
    y_train = torch.from_numpy(data.train_labels.astype(np.int64))
    x_test = torch.from_numpy(data.test_images.astype(np.float32) / 255.0)
    y_test = torch.from_numpy(data.test_labels.astype(np.int64))
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    mean, std = float(x_train.mean()), float(x_train.std())
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    model = lenet300()
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    batch = 100
    steps_per_epoch = math.ceil(x_train.shape[0] / batch)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[total // 2, (3 * total) // 4], gamma=0.1
    )
    sparse = attach(
        model,
        opt,
        density=0.05,
        seed=seed,
        update_every=None,
        update_at_epoch_end=True,
        total_steps=total,
        stop_at=total - steps_per_epoch,
        kernels=kernels,
    )
    order_gen = torch.Generator().manual_seed(seed)
    epoch_times = []
    for _ in range(epochs):
        perm = torch.randperm(x_train.shape[0], generator=order_gen)
        model.train()
        t0 = time.perf_counter()
        for s in range(steps_per_epoch):
            idx = perm[s * batch : (s + 1) * batch]
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            sched.step()
        sparse.end_epoch()
        epoch_times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(x_test[i : i + 1000]).argmax(1) == y_test[i : i + 1000]).sum())
            for i in range(0, x_test.shape[0], 1000)
        )
    result = {
        "seed": seed,
        "kernels": kernels,
        "accuracy": 100.0 * correct / x_test.shape[0],
        "density": sparse.density(),
        "epoch_seconds": epoch_times,
    }
    if sparse.kernel_router is not None:
        tel = sparse.kernel_router.telemetry()
        result["telemetry"] = {
            k: tel[k] for k in ("sparse_layers", "dense_grad_steps", "sparse_grad_steps")
        }
    sparse.detach()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_fashion_mnist()
    print(f"# Fashion-MNIST from {data.source}; {args.epochs} epochs; seeds {args.seeds}")
    results = []
    for seed in args.seeds:
        pair = {}
        for kernels in (None, "cpu"):
            r = run(seed, kernels, args.epochs, data, args.limit_train)
            results.append(r)
            pair[kernels] = r
            print(
                f"seed {seed} kernels={kernels!s:5} accuracy {r['accuracy']:.2f}% density "
                f"{r['density']:.4f} median epoch {statistics.median(r['epoch_seconds']):.2f} s "
                f"{r.get('telemetry', '')}",
                flush=True,
            )
        print(f"seed {seed} difference {pair['cpu']['accuracy'] - pair[None]['accuracy']:+.2f}")
    diffs = [
        k["accuracy"] - r["accuracy"] for r, k in zip(results[0::2], results[1::2], strict=True)
    ]
    mean = statistics.fmean(diffs)
    if len(diffs) > 1:
        sd = statistics.stdev(diffs)
        half = _T95.get(len(diffs) - 1, 1.96) * sd / math.sqrt(len(diffs))
        print(
            f"kernels - reference: mean {mean:+.2f} points, sd {sd:.2f}, "
            f"95% t-interval [{mean - half:+.2f}, {mean + half:+.2f}] over {len(diffs)} seeds; "
            f"within 0.3: {abs(mean) <= 0.3}"
        )
    else:
        print(f"kernels - reference: {mean:+.2f} points (one seed)")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
