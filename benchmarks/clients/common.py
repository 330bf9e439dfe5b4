"""What the four client scripts share: data read offline, sparse options from the command line,
and the result file each run writes.

The clients are our own versions of public training scripts (pytorch/examples ``mnist``,
keras-io ``mnist_convnet`` and a tiny Hugging Face GPT-2), changed only where a user adding
sparsecore would change them: one ``attach``/``SparseCallback`` line, data read from this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Normalisation constants of the full Fashion-MNIST training set (pixel / 255).
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def add_common_args(parser: argparse.ArgumentParser, *, density: float) -> None:
    """Options every client takes: the run's seed and length, sparsity, width, output."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default: the script's own")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dense", action="store_true", help="no sparsecore at all")
    parser.add_argument("--density", type=float, default=density)
    parser.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an attach()/SparseCallback() option (VALUE read as JSON when it parses, else a "
        "string), e.g. --opt recipe=paper --opt init=ERK; repeatable",
    )
    parser.add_argument(
        "--width", type=float, default=1.0, help="multiply every hidden width (narrowed dense)"
    )
    parser.add_argument("--out", default=None, help="write the result JSON here")
    parser.add_argument(
        "--data",
        choices=("debian", "embedded"),
        default="debian",
        help="image clients: the full Fashion-MNIST of Debian's dataset-fashion-mnist (the "
        "study), or the 7,000-image subset shipped with sparsecore (quick checks, tests)",
    )


def sparse_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--opt`` pairs as keyword arguments (``density`` and ``seed`` added)."""
    options: dict[str, Any] = {"density": args.density, "seed": args.seed}
    for item in args.opt:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--opt needs KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def load_images(limit_train: int | None = None, source: str = "debian") -> tuple[np.ndarray, ...]:
    """Fashion-MNIST as float32 arrays scaled to [0, 1]: (x_train, y_train, x_test, y_test).

    ``debian``: Debian's ``dataset-fashion-mnist``, never silently the embedded subset (the
    clients are measured on the full data set); ``embedded``: the subset shipped with sparsecore.
    """
    from sparsecore.datasets import load_embedded_fashion_mnist, load_fashion_mnist

    if source == "embedded":
        data = load_embedded_fashion_mnist()
    else:
        data = load_fashion_mnist(allow_embedded=False)
    x_train = data.train_images[:limit_train].astype(np.float32) / 255.0
    y_train = data.train_labels[:limit_train].astype(np.int64)
    x_test = data.test_images.astype(np.float32) / 255.0
    y_test = data.test_labels.astype(np.int64)
    return x_train, y_train, x_test, y_test


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg()[0],
    }


def write_result(args: argparse.Namespace, result: dict[str, Any], started: float) -> None:
    """Add the run's settings and wall time, print a one-line summary, write the JSON."""
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        **result,
        "wall_time_s": time.perf_counter() - started,
        "machine": {**machine(), "load_after": os.getloadavg()[0]},
    }
    final = result.get("final", {})
    print("final " + " ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float)))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)


def count_dead(maxima: np.ndarray) -> int:
    """Units whose pre-activation never exceeded 0 over the probe batch (ReLU outputs 0)."""
    return int((maxima <= 0).sum())
