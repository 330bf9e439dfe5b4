"""Channel compaction measured: a sparse model exported compact against the dense computation.

For each model (LeNet-300-100, LeNet-5, the job's ``vgg``), growth mode (``momentum``,
``momentum_neuron``) and density (5%, 10%), in one run on this machine:

1. train briefly with ``sparsecore train``'s recipe on Fashion-MNIST (``--epochs``; masks are
   updated at every epoch end but the last, so use 2 or more);
2. export with :func:`sparsecore.torch.compact` and check that the compact model predicts the same
   classes as the masked model on the test set;
3. print the fraction of units (features and channels) removed, the FLOPs of one training step
   (forward + backward, batch ``--batch``) computed densely, on the active weights only
   ("sparse", what sparse kernels compute) and by the compact model (:mod:`sparsecore.flops`,
   cross-layer removals included), and the measured time of that step (forward, cross-entropy,
   backward) for the dense model with masked weights and for the exported compact model: median
   over ``--repeats`` interleaved repeats, the ratio dense / compact with its 25th-75th
   percentile, and how much of the FLOP estimate the measurement reaches;
4. measure, interleaved in the same way, a whole training step (forward, cross-entropy,
   backward, the job's SGD step) at the trained masks, in four ways: ``dense`` (the model
   without sparsecore), ``masked`` (``attach(kernels=None)``: dense computation on masked
   weights, the re-masking included), ``compact`` and ``compact+cpu``
   (``attach(kernels="compact" | "compact+cpu")``: each layer on its active rows and read input
   channels, with dense kernels or the sparse CPU kernels on that block). These steps are the
   ones outside the dense-gradient window (masks fixed, ``growth="none"``); the
   ``1 / (1 - momentum)`` steps before each mask update also compute the dense weight gradient.

Timings are only worth publishing from a quiet machine (load average below 1); the script prints
the load before and after, the commit and the machine. Usage:

    python benchmarks/compaction.py                      # the full measurement
    python benchmarks/compaction.py --quick              # a small run that proves it works
    python benchmarks/compaction.py --threads 1 --json out.json
    python benchmarks/compaction.py --models lenet300 --epochs 20 --repeats 0   # structure only
    python benchmarks/compaction.py --models lenet300 --epochs 20 --profile     # what limits it
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import sparsecore.torch as st
from sparsecore.datasets import load_fashion_mnist
from sparsecore.recipe import DEFAULT_LR, FMNIST_MEAN, FMNIST_STD
from sparsecore.torch import compact
from sparsecore.torch.flops import count_flops
from sparsecore.torch.train import TrainConfig, run_training


def _tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return ((x - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def interleaved(variants: dict[str, Callable[[], None]], repeats: int, inner: int) -> dict:
    """Seconds per call of each variant, one figure per repeat, variants interleaved."""
    for fn in variants.values():  # warm-up: allocator, caches, lazy initialisation
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {k: np.asarray(v) for k, v in times.items()}


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step without the optimizer: forward, loss, backward."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()

    return run


#: The whole-training-step variants of item 4, in the order they are printed.
TRAIN_VARIANTS = ("dense", "masked", "compact", "compact+cpu")


def _train_step(
    model: nn.Module, cfg: TrainConfig, kernels: str | bool | None, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    """One whole training step of a copy of ``model`` at its current masks (its zero weights):
    ``kernels=False`` trains the copy without sparsecore, else under ``attach(kernels=...)``
    with the masks held fixed."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )
    if kernels is not False:
        sparse = st.attach(
            model,
            optimizer,
            density=cfg.density,
            growth="none",
            prune_schedule="constant",
            kernels=kernels,
            cover_units=False,
            revive_dead_units=False,
        )
        # The trained masks are the copy's nonzero weights (exactly zero outside the masks).
        # There is no public call that replaces the masks of a live handle: set them, and the
        # integer copies the re-masking multiplies by, in place, then rebuild the kernels.
        with torch.no_grad():
            for t, mask, keep in zip(sparse.targets, sparse.masks, sparse._keep):
                mask.copy_(t.param.detach() != 0)
                keep.copy_(mask)
        if sparse.kernel_router is not None:
            sparse.kernel_router.refresh()

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return run


def _profile(step: Callable[[], None], steps: int) -> str:
    """Where a training step spends its time: torch's profiler over ``steps`` steps, the
    operators with the most time of their own."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


@torch.no_grad()
def _predictions(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, x.shape[0], batch)])


def measure(args: argparse.Namespace, dataset: Any, model_name: str, growth: str, density: float):
    cfg = TrainConfig(
        model=model_name,
        density=density,
        epochs=args.epochs,
        growth=growth,
        lr=DEFAULT_LR[model_name],
        init=args.init,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        seed=args.seed,
    )
    log = io.StringIO()
    result = run_training(cfg, dataset=dataset, stream=log, progress=False)
    model = result.model
    accuracy = result.summary.get("final_test_acc", result.epochs[-1]["test_acc"])
    sub = dataset.subset(args.limit_train, args.limit_test)
    x_test, _ = _tensors(sub.test_images, sub.test_labels)
    x_train, y_train = _tensors(sub.train_images, sub.train_labels)
    x, y = x_train[: args.batch], y_train[: args.batch]

    small, report = compact(model, x)
    same = float((_predictions(small, x_test) == _predictions(model, x_test)).float().mean())
    flops = count_flops(model, x)
    estimate = flops.speedup("compact")
    timing: dict[str, Any] = {
        "dense_ms": float("nan"),
        "compact_ms": float("nan"),
        "speedup": float("nan"),
        "speedup_iqr": [float("nan")] * 2,
        "of_estimate": float("nan"),
    }
    if args.repeats > 0:
        model.train()
        small.train()
        variants = {"dense": _step(model, x, y), "compact": _step(small, x, y)}
        times = interleaved(variants, args.repeats, args.inner)
        q1, med, q3 = np.percentile(times["dense"] / times["compact"], [25, 50, 75])
        timing = {
            "dense_ms": float(np.median(times["dense"]) * 1e3),
            "compact_ms": float(np.median(times["compact"]) * 1e3),
            "speedup": float(med),
            "speedup_iqr": [float(q1), float(q3)],
            "of_estimate": float(med / estimate) if estimate else float("nan"),
        }
    train_ms: dict[str, float] = {k: float("nan") for k in TRAIN_VARIANTS}
    if args.repeats > 0:
        steps = {
            name: _train_step(model, cfg, False if name == "dense" else kernels, x, y)
            for name, kernels in zip(TRAIN_VARIANTS, (False, None, "compact", "compact+cpu"))
        }
        step_times = interleaved(steps, args.repeats, args.inner)
        train_ms = {k: float(np.median(v) * 1e3) for k, v in step_times.items()}
        if args.profile:
            for name in ("dense", "compact"):
                print(f"\n## profile: {model_name} {growth} {density:g} {name} training step")
                print(_profile(steps[name], args.inner * 4), flush=True)
    return {
        "model": model_name,
        "growth": growth,
        "density": density,
        "test_acc": accuracy,
        "units": report.units,
        "units_removed": report.units_removed,
        "fraction_removed": report.fraction_removed(),
        "same_predictions": same,
        "max_abs_difference": report.max_abs_difference,
        "flops_dense": flops.total("dense"),
        "flops_sparse": flops.total("sparse"),
        "flops_compact": flops.total("compact"),
        "flop_speedup_compact": estimate,
        **timing,
        "train_step_ms": train_ms,
        "layers": [
            {
                "name": layer.name,
                "out": layer.out_channels,
                "kept_out": layer.kept_out,
                "in": layer.in_channels,
                "kept_in": layer.kept_in,
                "dense_flops": f.dense,
                "compact_flops": f.compact,
            }
            for layer, f in zip(report.layers, flops.layers)
        ],
    }


def _step_cell(train_ms: dict[str, float], key: str) -> str:
    ms, dense = train_ms[key], train_ms["dense"]
    if not np.isfinite(ms):
        return f"{'-':>18}"
    return f"{ms:>11.2f} {dense / ms:>5.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lenet300,lenet5,vgg")
    parser.add_argument("--growth", default="momentum,momentum_neuron")
    parser.add_argument("--densities", default="0.05,0.1")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--limit-test", type=int, default=None)
    parser.add_argument("--batch", type=int, default=100, help="batch of the timed step")
    parser.add_argument("--init", default="uniform", help="initial densities: uniform or ERK")
    parser.add_argument(
        "--repeats", type=int, default=9, help="timed repeats (0: no timing, structure only)"
    )
    parser.add_argument("--inner", type=int, default=5, help="steps per timed repeat")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: found)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print where the dense and compact training steps spend their time",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 epochs on 2000 images, 3 repeats: proves the script works, measures nothing",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.limit_train, args.limit_test = 2, 2000, 1000
        args.repeats, args.inner = min(args.repeats, 3), 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dataset = load_fashion_mnist(args.data)
    load_before, commit, started = _load(), _commit(), time.strftime("%Y-%m-%d %H:%M")
    print(
        f"# compaction benchmark: commit {commit}, {started}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load_before}"
    )
    print(
        f"# init {args.init}, {args.epochs} epochs on {args.limit_train or 'all'} training "
        f"images; timed step: "
        f"forward + backward at batch {args.batch}, median of {args.repeats} x {args.inner}"
    )
    head = (
        f"{'model':<9}{'growth':<16}{'dens':>5}{'acc%':>7}{'removed':>9}{'GFLOP dense':>12}"
        f"{'sparse':>8}{'compact':>9}{'est.':>7}{'dense ms':>10}{'compact ms':>11}"
        f"{'measured':>20}{'of est.':>8}{'same':>7}"
        + "".join(f"{'step ' + k:>18}" for k in TRAIN_VARIANTS)
    )
    print(head)
    rows = []
    for model_name in args.models.split(","):
        for growth in args.growth.split(","):
            for density in (float(d) for d in args.densities.split(",")):
                r = measure(args, dataset, model_name, growth, density)
                rows.append(r)
                if args.repeats > 0:
                    timed = (
                        f"{r['dense_ms']:>10.2f}{r['compact_ms']:>11.2f}{r['speedup']:>7.2f}x "
                        f"[{r['speedup_iqr'][0]:.2f}-{r['speedup_iqr'][1]:.2f}]"
                        f"{100 * r['of_estimate']:>7.0f}%"
                    )
                else:
                    timed = f"{'-':>10}{'-':>11}{'-':>20}{'-':>8}"
                print(
                    f"{r['model']:<9}{r['growth']:<16}{r['density']:>5.2f}{r['test_acc']:>7.2f}"
                    f"{100 * r['fraction_removed']:>8.1f}%{r['flops_dense'] / 1e9:>12.3f}"
                    f"{r['flops_sparse'] / 1e9:>8.3f}{r['flops_compact'] / 1e9:>9.3f}"
                    f"{r['flop_speedup_compact']:>6.2f}x{timed}"
                    f"{100 * r['same_predictions']:>6.1f}%"
                    + "".join(_step_cell(r["train_step_ms"], k) for k in TRAIN_VARIANTS),
                    flush=True,
                )
    print(
        "# step <variant>: ms of a whole training step (forward, loss, backward, SGD step) at "
        "the trained masks, and dense ms / that"
    )
    load_after = _load()
    print(f"# load before {load_before}, after {load_after}")
    if args.json:
        meta = {
            "commit": commit,
            "date": started,
            "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_before": load_before,
            "load_after": load_after,
            "args": vars(args),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
