"""Sparse CPU kernels (Numba) against PyTorch dense, measured in one run on this machine.

Prints ratios (dense time / sparse time, > 1 means the sparse kernels are faster), with the
median over interleaved repeats and the spread (25th-75th percentile of the per-repeat ratio).

Sections:
- fc layers 784->300 and 3072->1024, batch 128, at several sparsities: forward; one training
  step of the layer (forward, input gradient, weight gradient on the mask: "fwd+bwd"); the step
  with the dense weight gradient ("dense-grad step", used in the window before a mask update);
  and the epoch average with a window of ``--window`` dense-grad steps per ``--period`` steps.
- 3x3 conv layers of a VGG-style net on 32x32 inputs (64@32x32, 128@16x16, 256@8x8, 512@4x4).
- a training epoch of LeNet-300-100 (784-300-100-10, 5% density) on Fashion-MNIST, SGD with
  momentum, with and without the kernels (masks re-applied after every step in both).
- first-call compile time of the kernels (cold on-disk cache) and with a warm cache.

Threads: PyTorch and Numba both use ``torch.get_num_threads()`` threads (default: the cores);
they run one after the other from the same Python thread.

Usage: python benchmarks/kernels_cpu.py [--quick] [--only fc,conv,lenet,compile]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

# Idle OpenMP threads of PyTorch's and Numba's pools sleep instead of spinning, so that one
# pool's waiting threads do not take the cores from the other's working ones (must be set
# before either library starts its pool).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sparsecore.torch.kernel_router import KernelRouter
from sparsecore.torch.sparse_functions import (
    ConvLayerState,
    LinearLayerState,
    SparseConv2dFunction,
    SparseLinearFunction,
    kernel_threads,
)

#: Clock used by :func:`interleaved`: wall time, or process CPU time (all threads), which is
#: far less disturbed by other processes on a shared machine.
CLOCK: Callable[[], float] = time.perf_counter


def interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, inner: int = 1
) -> dict[str, np.ndarray]:
    """Per-repeat time of each variant (seconds per call), variants interleaved each repeat."""
    for fn in variants.values():  # warm-up (compilation, allocator, caches)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = CLOCK()
            for _ in range(inner):
                fn()
            times[name].append((CLOCK() - t0) / inner)
    return {k: np.asarray(v) for k, v in times.items()}


def ratio(dense: np.ndarray, sparse: np.ndarray) -> str:
    r = dense / sparse
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    return f"{med:5.2f}x [{q1:.2f}-{q3:.2f}]"


def _step_variants(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    dy: torch.Tensor,
    forwards: dict[str, Callable[[], torch.Tensor]],
) -> dict[str, Callable[[], None]]:
    """One training step of the layer per forward: forward, then backward of ``dy``."""

    def make(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x.grad = w.grad = b.grad = None
            fn().backward(dy)

        return run

    return {name: make(fn) for name, fn in forwards.items()}


def _report(
    label: str, sp: float, t_fwd: dict[str, np.ndarray], t: dict[str, np.ndarray], args
) -> None:
    k, win = args.period, args.window
    epoch_sparse = ((k - win) * t["sparse"] + win * t["window"]) / k
    print(
        f"{label:>16} {sp:8.0%} {ratio(t_fwd['dense'], t_fwd['sparse']):>18} "
        f"{ratio(t['dense'], t['sparse']):>18} {ratio(t['dense'], t['window']):>18} "
        f"{ratio(t['dense'], epoch_sparse):>18}"
    )
    if sp == 0.95:
        print(
            f"{'':>16} {'':>8} medians: dense fwd+bwd {np.median(t['dense']) * 1e3:.2f} ms, "
            f"sparse {np.median(t['sparse']) * 1e3:.2f} ms, dense-grad step "
            f"{np.median(t['window']) * 1e3:.2f} ms; forward {np.median(t_fwd['dense']) * 1e3:.2f}"
            f" / {np.median(t_fwd['sparse']) * 1e3:.2f} ms"
        )


def _header(title: str) -> None:
    print(f"\n## {title}: dense time / sparse time, median [IQR] over interleaved repeats")
    print(
        f"{'layer':>16} {'sparsity':>8} {'forward':>18} {'fwd+bwd':>18} "
        f"{'dense-grad step':>18} {'epoch avg':>18}"
    )


def _fc_case(n_in: int, n_out: int, sp: float, args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    batch = 128
    mask = torch.rand(n_out, n_in, generator=gen) >= sp
    w = (torch.randn(n_out, n_in, generator=gen) * 0.05 * mask).requires_grad_()
    b = torch.zeros(n_out, requires_grad=True)
    x = torch.randn(batch, n_in, generator=gen).requires_grad_()
    dy = torch.randn(batch, n_out, generator=gen)
    states = {on: LinearLayerState(name="fc", mask=mask, dense_weight_grad=on) for on in (0, 1)}
    forwards = {
        "sparse": lambda: SparseLinearFunction.apply(x, w, b, states[0]),
        "window": lambda: SparseLinearFunction.apply(x, w, b, states[1]),
        "dense": lambda: F.linear(x, w, b),
    }
    inner = 20 if n_in < 1000 else 4
    with torch.no_grad():
        t_fwd = interleaved(
            {"sparse": forwards["sparse"], "dense": forwards["dense"]}, args.repeats, inner
        )
    t = interleaved(_step_variants(x, w, b, dy, forwards), args.repeats, inner)
    _report(f"{n_in}->{n_out}", sp, t_fwd, t, args)


def bench_fc(args: argparse.Namespace) -> None:
    _header("fc layers, batch 128")
    sparsities = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98] if not args.quick else [0.9, 0.95]
    if args.sparsities:
        sparsities = [float(v) for v in args.sparsities.split(",")]
    for n_in, n_out in [(784, 300), (3072, 1024)]:
        for sp in sparsities:
            _fc_case(n_in, n_out, sp, args)


def _conv_case(channels: int, hw: int, sp: float, args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    batch = args.conv_batch
    mask = torch.rand(channels, channels, 3, 3, generator=gen) >= sp
    w = (torch.randn(channels, channels, 3, 3, generator=gen) * 0.05 * mask).requires_grad_()
    b = torch.zeros(channels, requires_grad=True)
    x = torch.randn(batch, channels, hw, hw, generator=gen).requires_grad_()
    dy = torch.randn(batch, channels, hw, hw, generator=gen)
    states = {
        on: ConvLayerState(name="conv", mask=mask, dense_weight_grad=on, padding=(1, 1))
        for on in (0, 1)
    }
    forwards = {
        "sparse": lambda: SparseConv2dFunction.apply(x, w, b, states[0]),
        "window": lambda: SparseConv2dFunction.apply(x, w, b, states[1]),
        "dense": lambda: F.conv2d(x, w, b, padding=1),
    }
    with torch.no_grad():
        t_fwd = interleaved(
            {"sparse": forwards["sparse"], "dense": forwards["dense"]}, args.repeats
        )
    t = interleaved(_step_variants(x, w, b, dy, forwards), args.repeats)
    _report(f"{channels}->{channels}@{hw}x{hw}", sp, t_fwd, t, args)


def bench_conv(args: argparse.Namespace) -> None:
    _header(f"conv 3x3 (VGG-style, 32x32 input), batch {args.conv_batch}")
    layers = [(64, 32), (128, 16), (256, 8), (512, 4)]
    sparsities = [0.8, 0.9, 0.95, 0.98] if not args.quick else [0.95]
    if args.sparsities:
        sparsities = [float(v) for v in args.sparsities.split(",")]
    for channels, hw in layers:
        for sp in sparsities:
            _conv_case(channels, hw, sp, args)


def _lenet() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def bench_lenet(args: argparse.Namespace) -> None:
    from sparsecore.datasets import load_fashion_mnist

    data = load_fashion_mnist()
    images = torch.from_numpy(data.train_images.astype(np.float32) / 255.0)
    labels = torch.from_numpy(data.train_labels.astype(np.int64))
    n = images.shape[0] if not args.quick else 10_000
    batch = 128
    print(
        f"\n## LeNet-300-100 epoch on Fashion-MNIST ({data.source}, {n} images, batch {batch}), "
        "5% density, SGD momentum 0.9"
    )

    def make(use_kernels: bool, window: int):
        torch.manual_seed(0)
        model = _lenet()
        gen = torch.Generator().manual_seed(1)
        layers = [m for m in model if isinstance(m, nn.Linear)]
        masks = [torch.rand(m.weight.shape, generator=gen) < 0.05 for m in layers]
        with torch.no_grad():
            for m, k in zip(layers, masks, strict=True):
                m.weight.mul_(k)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        router = None
        if use_kernels:
            targets = [(str(i), m, k) for i, (m, k) in enumerate(zip(layers, masks, strict=True))]
            router = KernelRouter(targets, "cpu", dense_grad=False)

        def epoch() -> None:
            steps = (n + batch - 1) // batch
            for s in range(steps):
                if router is not None:
                    router.set_dense_weight_grad(s >= steps - window)
                xb = images[s * batch : (s + 1) * batch]
                yb = labels[s * batch : (s + 1) * batch]
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
                with torch.no_grad():
                    for m, k in zip(layers, masks, strict=True):
                        m.weight.mul_(k)

        return epoch, router

    dense_epoch, _ = make(False, 0)
    sparse_epoch, router = make(True, args.window)
    sparse_nowin, _ = make(True, 0)
    t = interleaved(
        {"dense": dense_epoch, "sparse": sparse_epoch, "sparse_nowin": sparse_nowin},
        max(3, args.repeats // 4),
    )
    print(
        f"dense epoch {np.median(t['dense']):.2f} s, sparse epoch ({args.window} dense-grad "
        f"steps) {np.median(t['sparse']):.2f} s: {ratio(t['dense'], t['sparse'])}; "
        f"without window {np.median(t['sparse_nowin']):.2f} s: "
        f"{ratio(t['dense'], t['sparse_nowin'])}"
    )
    assert router is not None
    tel = router.telemetry()
    print(f"routed layers: {tel['sparse_layers']} of {len(tel['layers'])}")


_COMPILE_SNIPPET = """
import time, torch
t0 = time.perf_counter()
from sparsecore.torch.sparse_functions import (ConvLayerState, LinearLayerState,
    SparseConv2dFunction, SparseLinearFunction)
t1 = time.perf_counter()
mask = torch.rand(30, 20) < 0.1
x = torch.randn(4, 20, requires_grad=True); w = torch.randn(30, 20, requires_grad=True)
SparseLinearFunction.apply(x, w, None, LinearLayerState("fc", mask, False)).sum().backward()
cmask = torch.rand(4, 3, 3, 3) < 0.3
cx = torch.randn(2, 3, 8, 8, requires_grad=True); cw = torch.randn(4, 3, 3, 3, requires_grad=True)
SparseConv2dFunction.apply(cx, cw, None, ConvLayerState("c", cmask, False, padding=(1, 1))
    ).sum().backward()
t2 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f}")
"""


def bench_compile(args: argparse.Namespace) -> None:
    print("\n## first call (float32 linear + conv, forward and backward), fresh process")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold cache", "warm cache"):
            out = subprocess.run(
                [sys.executable, "-c", _COMPILE_SNIPPET],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            print(f"{label}: import {out[0]} s, first calls {out[1]} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--only", default="fc,conv,lenet,compile")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--conv-batch", type=int, default=64)
    parser.add_argument("--window", type=int, default=10, help="dense-grad steps per period")
    parser.add_argument("--period", type=int, default=469, help="steps between mask updates")
    parser.add_argument("--threads", type=int, default=None, help="torch (and numba) threads")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="wall time or process CPU time"
    )
    parser.add_argument("--sparsities", default=None, help="comma-separated, e.g. 0.9,0.95")
    args = parser.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    threads = kernel_threads()
    print(
        f"# sparsecore CPU kernels vs PyTorch {torch.__version__} dense; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch/numba threads {torch.get_num_threads()}/{threads}, "
        f"clock {args.clock}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    sections = {"fc": bench_fc, "conv": bench_conv, "lenet": bench_lenet, "compile": bench_compile}
    for name in args.only.split(","):
        sections[name](args)


if __name__ == "__main__":
    main()
