"""Time per epoch of Keras ``fit`` with and without ``SparseCallback``, interleaved and repeated.

Models: LeNet-300-100 on the Fashion-MNIST training set and LeNet-5 (a small CNN) on a subset of
it, batch 100, SGD with Nesterov momentum. Three variants share the data and the schedule:

- ``dense``: plain Keras;
- ``masked``: the sparse masks as constraints inside the train step, no callback (the floor of
  what sparsity costs when the kernels stay dense);
- ``sparse``: ``SparseCallback()`` with its defaults (density 0.05, a mask update every 100
  steps), so the epoch includes the mask updates;
- ``sparse_epoch``: one mask update per epoch, at its end (the paper's and the training job's
  schedule); Keras' asynchronous batch dispatch stays on.

Each repeat times one epoch of every variant in turn (order rotated between repeats), after one
untimed warm-up epoch each. Prints medians and the ratio to dense (median and min..max of the
per-repeat ratios), for wall time and for the CPU time of this process (less sensitive to other
work on a shared machine). CPU only; the spread says how much to trust it.

    python benchmarks/overhead_keras.py --repeats 7
    KERAS_BACKEND=torch python benchmarks/overhead_keras.py --models mlp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from sparsecore.datasets import load_fashion_mnist
from sparsecore.keras import SparseCallback
from sparsecore.keras.train import build_model

VARIANTS = ("dense", "masked", "sparse", "sparse_epoch")


def _compiled(name: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = build_model(name, 10, weight_decay=5e-4)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _setup(name: str, total_steps: int) -> dict[str, tuple[keras.Model, list[Any]]]:
    out: dict[str, tuple[keras.Model, list[Any]]] = {"dense": (_compiled(name), [])}
    masked = _compiled(name)
    SparseCallback(total_steps=total_steps).attach(masked)
    out["masked"] = (masked, [])
    out["sparse"] = (_compiled(name), [SparseCallback(total_steps=total_steps)])
    epoch_end = SparseCallback(update_every=None, update_at_epoch_end=True, total_steps=total_steps)
    out["sparse_epoch"] = (_compiled(name), [epoch_end])
    return out


def _epoch(
    model: keras.Model, callbacks: list[Any], x: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one epoch."""
    t, c = time.perf_counter(), time.process_time()
    model.fit(x, y, batch_size=100, epochs=1, shuffle=True, callbacks=callbacks, verbose=0)
    return time.perf_counter() - t, time.process_time() - c


def bench(name: str, x: np.ndarray, y: np.ndarray, repeats: int) -> dict[str, Any]:
    steps = -(-x.shape[0] // 100)
    runs = _setup(name, total_steps=steps * (repeats + 2) * 4)
    for variant in VARIANTS:  # warm-up: tracing, first mask installation
        _epoch(*runs[variant], x, y)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for variant in order:
            wall, used = _epoch(*runs[variant], x, y)
            times[variant].append(wall)
            cpu[variant].append(used)
    sparse_cb = runs["sparse"][1][0]
    result: dict[str, Any] = {
        "model": name,
        "train_images": int(x.shape[0]),
        "steps_per_epoch": steps,
        "mask_updates": len(sparse_cb.history),
        "median_s": {v: statistics.median(t) for v, t in times.items()},
        "median_cpu_s": {v: statistics.median(t) for v, t in cpu.items()},
        "times_s": times,
        "cpu_s": cpu,
    }
    for label, series in (("", times), ("cpu_", cpu)):
        for variant in ("masked", "sparse", "sparse_epoch"):
            ratios = [a / b for a, b in zip(series[variant], series["dense"])]
            result[f"{label}{variant}_over_dense"] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            }
    return result


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cnn-images", type=int, default=10000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    data = load_fashion_mnist()
    x = ((data.train_images.astype(np.float32) / 255.0 - 0.2860) / 0.3530)[..., None]
    y = data.train_labels.astype(np.int32)
    results = []
    for model in args.models:
        if model == "mlp":
            res = bench("lenet300", x, y, args.repeats)
        else:
            res = bench("lenet5", x[: args.cnn_images], y[: args.cnn_images], args.repeats)
        results.append(res)
        med = res["median_s"]
        print(
            f"{res['model']:9s} ({res['train_images']} images, {res['steps_per_epoch']} steps, "
            f"{res['mask_updates']} mask updates in the sparse runs): epoch dense "
            f"{med['dense']:.2f}s, masked {med['masked']:.2f}s, sparse {med['sparse']:.2f}s; "
            f"sparse/dense {res['sparse_over_dense']['median']:.3f} "
            f"[{res['sparse_over_dense']['min']:.3f}..{res['sparse_over_dense']['max']:.3f}], "
            f"masked/dense {res['masked_over_dense']['median']:.3f} "
            f"[{res['masked_over_dense']['min']:.3f}..{res['masked_over_dense']['max']:.3f}]; "
            f"CPU time: sparse/dense {res['cpu_sparse_over_dense']['median']:.3f} "
            f"[{res['cpu_sparse_over_dense']['min']:.3f}..{res['cpu_sparse_over_dense']['max']:.3f}]"
            f", masked/dense {res['cpu_masked_over_dense']['median']:.3f}, sparse_epoch/dense "
            f"{res['cpu_sparse_epoch_over_dense']['median']:.3f} (wall "
            f"{res['sparse_epoch_over_dense']['median']:.3f})",
            flush=True,
        )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": _commit(),
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "machine": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(),
        "repeats": args.repeats,
    }
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
