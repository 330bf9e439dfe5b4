"""Time per epoch of Keras ``fit`` with and without ``SparseCallback``, interleaved and repeated.

Models: LeNet-300-100 on the Fashion-MNIST training set and LeNet-5 (a small CNN) on a subset of
it, batch 100, SGD with Nesterov momentum. Four variants share the data and the schedule:

- ``dense``: plain Keras;
- ``masked``: the sparse masks as constraints inside the train step, no callback (the floor of
  what sparsity costs when the kernels stay dense);
- ``sparse``: ``SparseCallback()`` with its defaults (density 0.05, a mask update every 100
  steps), so the epoch includes the mask updates;
- ``sparse_epoch``: one mask update per epoch, at its end (the paper's and the training job's
  schedule); Keras' asynchronous batch dispatch stays on.

Each repeat times one epoch of every variant in turn (order rotated between repeats), after one
untimed warm-up epoch each. An epoch is timed inside ``fit``, from the first callback's
``on_epoch_begin`` to the last callback's ``on_epoch_end`` (so the mask updates and the
callback's epoch-end work are in, ``fit``'s per-call setup of the data pipeline is not: a real run
pays that once, not per epoch). Prints medians and the ratio to dense (median and min..max of the
per-repeat ratios, and the ratio of the fastest epochs), for wall time and for the CPU time of
this process (less sensitive to other work on a shared machine). CPU only; the spread says how
much to trust it.

    python benchmarks/overhead_keras.py --repeats 9
    KERAS_BACKEND=torch OMP_NUM_THREADS=1 python benchmarks/overhead_keras.py --repeats 7
    KERAS_BACKEND=jax JAX_PLATFORMS=cpu python benchmarks/overhead_keras.py --repeats 9

(``OMP_NUM_THREADS=1`` for PyTorch on a loaded machine: its OpenMP threads spin at barriers while
descheduled, which made a dense epoch ten times slower there and the ratios meaningless.)
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


class _EpochStart(keras.callbacks.Callback):
    """First in the callback list: notes the clocks when the epoch begins."""

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()


class _EpochEnd(keras.callbacks.Callback):
    """Last in the callback list: the wall and CPU seconds since ``start`` noted the epoch begin.

    Neither has a batch hook, so Keras' batch dispatch is the same as without them."""

    def __init__(self, start: _EpochStart) -> None:
        super().__init__()
        self.start = start
        self.times: tuple[float, float] = (0.0, 0.0)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.times = (
            time.perf_counter() - self.start.wall,
            time.process_time() - self.start.cpu,
        )


def _epoch(
    model: keras.Model, callbacks: list[Any], x: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one epoch inside ``fit``."""
    start = _EpochStart()
    end = _EpochEnd(start)
    model.fit(
        x, y, batch_size=100, epochs=1, shuffle=True, callbacks=[start, *callbacks, end], verbose=0
    )
    return end.times


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
                "fastest": min(series[variant]) / min(series["dense"]),
            }
    return result


def update_ms(name: str, x: np.ndarray, y: np.ndarray, repeats: int = 15) -> dict[str, Any]:
    """Milliseconds per mask update (``update_masks``, reads and assignments included) with the
    update on NumPy and on ``keras.ops``: median and min of ``repeats`` after two warm-ups."""
    out: dict[str, Any] = {}
    for backend in ("numpy", "keras"):
        model = _compiled(name)
        cb = SparseCallback(update_backend=backend, update_every=None, total_steps=10**6)
        model.fit(x[:1000], y[:1000], batch_size=100, epochs=1, callbacks=[cb], verbose=0)
        times = []
        for i in range(repeats + 2):
            t = time.perf_counter()
            cb.update_masks()
            if i >= 2:
                times.append(1e3 * (time.perf_counter() - t))
        out[backend] = {"median_ms": statistics.median(times), "min_ms": min(times)}
    return out


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

    load_start = os.getloadavg()
    data = load_fashion_mnist()
    x = ((data.train_images.astype(np.float32) / 255.0 - 0.2860) / 0.3530)[..., None]
    y = data.train_labels.astype(np.int32)
    results = []
    for model in args.models:
        if model == "mlp":
            res = bench("lenet300", x, y, args.repeats)
        else:
            res = bench("lenet5", x[: args.cnn_images], y[: args.cnn_images], args.repeats)
        res["update_ms"] = update_ms(res["model"], x, y)
        results.append(res)
        med, cpu = res["median_s"], res["median_cpu_s"]
        print(
            f"{res['model']} ({res['train_images']} images, {res['steps_per_epoch']} steps, "
            f"{res['mask_updates']} mask updates in the sparse runs); median epoch dense "
            f"{med['dense']:.3f}s wall, {cpu['dense']:.3f}s CPU; one mask update "
            f"{res['update_ms']['numpy']['median_ms']:.1f} ms on NumPy, "
            f"{res['update_ms']['keras']['median_ms']:.1f} ms on keras.ops",
            flush=True,
        )
        for variant in ("masked", "sparse", "sparse_epoch"):
            wall, used = res[f"{variant}_over_dense"], res[f"cpu_{variant}_over_dense"]
            print(
                f"  {variant + '/dense':19s} wall {wall['median']:.3f} "
                f"[{wall['min']:.3f}..{wall['max']:.3f}] fastest {wall['fastest']:.3f} | CPU "
                f"{used['median']:.3f} [{used['min']:.3f}..{used['max']:.3f}] fastest "
                f"{used['fastest']:.3f}",
                flush=True,
            )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": _commit(),
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "machine": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs",
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "repeats": args.repeats,
    }
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
