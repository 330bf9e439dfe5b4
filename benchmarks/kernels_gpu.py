"""Sparse CUDA kernels against cuDNN / cuBLAS dense, one training step of a layer (GPU only).

Layers: the 3x3 stride-1 conv layers of WRN-16-10 and VGG16 on CIFAR shapes, batch 128, and a
fully connected 3072 -> 1024 layer, at 80/90/95/98% sparsity. "Forward+backward" is one training
step of the layer: forward, input gradient and weight gradient, on the mask for the sparse
kernels ("sparse dW") and, for the window before a mask update, dense ("dense dW", the weight
gradient through cuDNN / cuBLAS). Dense baselines run with ``cudnn.benchmark = True`` in FP32
(TF32 off) and with TF32 on. Sparse and dense runs are interleaved; each figure is the median
of ``--reps`` CUDA-event timings after warm-up, with the interquartile range.

Usage: python benchmarks/kernels_gpu.py [--reps 25] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

SPARSITIES = (0.80, 0.90, 0.95, 0.98)
EPOCH_STEPS = 391  # CIFAR-10 at batch 128
WINDOW_STEPS = 10  # dense weight gradient before each mask update, ~1/(1-0.9)
TILED = False  # time the tiled convolution kernel too (--tiled)
SLEEP_CYCLES = 4_000_000  # ~2 ms of GPU clock queued before each timed case


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str  # "conv" or "linear"
    c_in: int
    c_out: int
    hw: int = 1
    batch: int = 128

    def dense_flops(self) -> float:
        """Multiply-adds x 2 of forward + input gradient + weight gradient (dense)."""
        if self.kind == "conv":
            return 3 * 2.0 * self.batch * self.c_out * self.hw * self.hw * self.c_in * 9
        return 3 * 2.0 * self.batch * self.c_out * self.c_in


LAYERS = (
    Layer("WRN-16-10 conv 160@32", "conv", 160, 160, 32),
    Layer("WRN-16-10 conv 320@16", "conv", 320, 320, 16),
    Layer("WRN-16-10 conv 640@8", "conv", 640, 640, 8),
    Layer("VGG16 conv 64@32", "conv", 64, 64, 32),
    Layer("VGG16 conv 128@16", "conv", 128, 128, 16),
    Layer("VGG16 conv 256@8", "conv", 256, 256, 8),
    Layer("VGG16 conv 512@4", "conv", 512, 512, 4),
    Layer("VGG16 conv 512@2", "conv", 512, 512, 2),
    Layer("fc 3072->1024", "linear", 3072, 1024),
)


def _set_tf32(on: bool) -> None:
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on


class Case:
    """One timed closure (a training step of the layer) and its samples in milliseconds."""

    def __init__(self, label: str, step: Callable[[], None], tf32: bool = False) -> None:
        self.label = label
        self.step = step
        self.tf32 = tf32
        self.samples: list[float] = []
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def run(self, record: bool) -> None:
        _set_tf32(self.tf32)
        if record:
            # Queue GPU work ahead of the case so that its events time the GPU alone, not the
            # host enqueueing it (host cost is measured separately).
            torch.cuda._sleep(SLEEP_CYCLES)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            self.step()
            end.record()
            self.events.append((start, end))
        else:
            self.step()
        _set_tf32(False)

    def collect(self) -> None:
        torch.cuda.synchronize()
        self.samples += [s.elapsed_time(e) for s, e in self.events]
        self.events.clear()

    def median(self) -> float:
        return statistics.median(self.samples)

    def iqr(self) -> tuple[float, float]:
        q = statistics.quantiles(self.samples, n=4)
        return q[0], q[2]


def _layer_cases(layer: Layer, sparsities: tuple[float, ...]) -> list[Case]:
    from sparsecore.torch.cuda_kernels import sparse_conv2d, sparse_linear
    from sparsecore.torch.sparse_functions import ConvLayerState, LinearLayerState

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    if layer.kind == "conv":
        x = torch.randn((layer.batch, layer.c_in, layer.hw, layer.hw), device=dev, generator=gen)
        w_shape: tuple[int, ...] = (layer.c_out, layer.c_in, 3, 3)
        y_shape: tuple[int, ...] = (layer.batch, layer.c_out, layer.hw, layer.hw)
    else:
        x = torch.randn((layer.batch, layer.c_in), device=dev, generator=gen)
        w_shape = (layer.c_out, layer.c_in)
        y_shape = (layer.batch, layer.c_out)
    x.requires_grad_(True)
    gy = torch.randn(y_shape, device=dev, generator=gen)
    w_dense = torch.randn(w_shape, device=dev, generator=gen).requires_grad_(True)
    bias = torch.zeros(layer.c_out, device=dev, requires_grad=True)

    def dense_step() -> None:
        x.grad = w_dense.grad = bias.grad = None
        if layer.kind == "conv":
            y = F.conv2d(x, w_dense, bias, padding=1)
        else:
            y = F.linear(x, w_dense, bias)
        y.backward(gy)

    cases = [
        Case("dense FP32", dense_step, tf32=False),
        Case("dense TF32", dense_step, tf32=True),
    ]
    from sparsecore.torch import cuda_kernels

    algos = ("gather", "tiled") if layer.kind == "conv" and TILED else ("gather",)
    for sparsity in sparsities:
        mask = torch.rand(w_shape, device=dev, generator=gen) >= sparsity
        w = (torch.randn(w_shape, device=dev, generator=gen) * mask).requires_grad_(True)
        for variant in (*algos, "dense dW"):
            dense_dw = variant == "dense dW"
            algo = ("auto" if TILED else "gather") if dense_dw else variant
            state: ConvLayerState | LinearLayerState
            if layer.kind == "conv":
                state = ConvLayerState(
                    name=layer.name, mask=mask, dense_weight_grad=dense_dw, padding=(1, 1)
                )
            else:
                state = LinearLayerState(name=layer.name, mask=mask, dense_weight_grad=dense_dw)

            def sparse_step(w=w, state=state, algo=algo) -> None:
                cuda_kernels.set_conv_algorithm(algo)
                x.grad = w.grad = bias.grad = None
                if layer.kind == "conv":
                    y = sparse_conv2d(x, w, bias, state)
                else:
                    y = sparse_linear(x, w, bias, state)
                y.backward(gy)

            cases.append(Case(f"sparse {sparsity:.0%} {variant}", sparse_step))
    return cases


def _forward_only(layer: Layer, sparsity: float, reps: int) -> tuple[float, dict[str, float]]:
    """Median forward time (ms): dense FP32 and sparse at ``sparsity``, interleaved."""
    from sparsecore.torch.cuda_kernels import sparse_conv2d, sparse_linear
    from sparsecore.torch.sparse_functions import ConvLayerState, LinearLayerState

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    if layer.kind == "conv":
        x = torch.randn((layer.batch, layer.c_in, layer.hw, layer.hw), device=dev, generator=gen)
        w_shape: tuple[int, ...] = (layer.c_out, layer.c_in, 3, 3)
    else:
        x = torch.randn((layer.batch, layer.c_in), device=dev, generator=gen)
        w_shape = (layer.c_out, layer.c_in)
    mask = torch.rand(w_shape, device=dev, generator=gen) >= sparsity
    w = torch.randn(w_shape, device=dev, generator=gen) * mask
    if layer.kind == "conv":
        cstate = ConvLayerState(name=layer.name, mask=mask, padding=(1, 1))

        def dense() -> None:
            F.conv2d(x, w, None, padding=1)

        def sparse() -> None:
            sparse_conv2d(x, w, None, cstate)
    else:
        lstate = LinearLayerState(name=layer.name, mask=mask)

        def dense() -> None:
            F.linear(x, w)

        def sparse() -> None:
            sparse_linear(x, w, None, lstate)

    from sparsecore.torch import cuda_kernels

    def with_algo(algo: str) -> Callable[[], None]:
        def run() -> None:
            cuda_kernels.set_conv_algorithm(algo)
            sparse()

        return run

    cases = [Case("dense", dense), Case("gather", with_algo("gather"))]
    if layer.kind == "conv" and TILED:
        cases.append(Case("tiled", with_algo("tiled")))
    with torch.no_grad():
        _run_interleaved(cases, reps)
    return cases[0].median(), {c.label: c.median() for c in cases[1:]}


def _run_interleaved(cases: list[Case], reps: int, warmup: int = 3) -> None:
    for _ in range(warmup):
        for case in cases:
            case.run(record=False)
    torch.cuda.synchronize()
    for _ in range(reps):
        for case in cases:
            case.run(record=True)
        for case in cases:
            case.collect()


def _host_overhead() -> dict[str, object]:
    """Wall-clock host cost: DLPack hand-over vs raw pointer, and a tiny layer's whole step."""
    import cupy

    import sparsecore.kernels as K
    from sparsecore.torch.cuda_kernels import sparse_linear
    from sparsecore.torch.sparse_functions import LinearLayerState

    t = torch.empty(1024, device="cuda")

    def per_call(fn: Callable[[], object], n: int = 200) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    dlpack = per_call(lambda: cupy.from_dlpack(t))
    ptr = per_call(lambda: K.pointer(t.data_ptr()))
    mask = torch.rand((256, 256), device="cuda") >= 0.95
    w = (torch.randn((256, 256), device="cuda") * mask).requires_grad_(True)
    x = torch.randn((32, 256), device="cuda", requires_grad=True)
    state = LinearLayerState(name="tiny", mask=mask, dense_weight_grad=False)

    def sparse_step() -> None:
        sparse_linear(x, w, None, state).sum().backward()
        torch.cuda.synchronize()

    def dense_step() -> None:
        F.linear(x, w).sum().backward()
        torch.cuda.synchronize()

    for _ in range(5):
        sparse_step()
        dense_step()
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(50):
        sparse_step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    print("\nHost profile of 50 tiny sparse steps (by own time):")
    print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))
    return {
        "from_dlpack_us": dlpack,
        "pointer_us": ptr,
        "tiny_sparse_step_us": per_call(sparse_step, 100),
        "tiny_dense_step_us": per_call(dense_step, 100),
        "launch_path": K.launch_path(),
    }


def _peak_memory(step: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--json", default=None, help="also write all figures to this file")
    parser.add_argument("--quick", action="store_true", help="two layers, 95%% only")
    parser.add_argument("--tiled", action="store_true", help="also time the tiled conv kernel")
    args = parser.parse_args(argv)
    global TILED
    TILED = args.tiled
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = True
    _set_tf32(False)
    layers = LAYERS[:1] + LAYERS[-1:] if args.quick else LAYERS
    sparsities = (0.95,) if args.quick else SPARSITIES
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  reps {args.reps}")
    print(
        "GPU time per training step of the layer (CUDA events, host enqueue hidden); "
        "ratio = dense FP32 time / sparse time (>1: sparse faster); epoch avg assumes "
        f"{WINDOW_STEPS} dense-dW steps per {EPOCH_STEPS}-step epoch\n"
    )
    header = (
        "| layer | sparsity | dense FP32 ms | dense TF32 ms | sparse gather ms (IQR) | "
        "sparse tiled ms (IQR) | best vs FP32 | best vs TF32 | dense-dW ms | dense-dW vs FP32 | "
        "epoch avg vs FP32 | useful TFLOP/s |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    results = []
    t0 = time.time()
    for layer in layers:
        cases = _layer_cases(layer, sparsities)
        _run_interleaved(cases, args.reps)
        by = {c.label: c for c in cases}
        fp32, tf32 = by["dense FP32"].median(), by["dense TF32"].median()
        for s in sparsities:
            variants = {
                v: by[f"sparse {s:.0%} {v}"]
                for v in ("gather", "tiled")
                if f"sparse {s:.0%} {v}" in by
            }
            best = min(c.median() for c in variants.values())
            dd = by[f"sparse {s:.0%} dense dW"]
            epoch = ((EPOCH_STEPS - WINDOW_STEPS) * best + WINDOW_STEPS * dd.median()) / EPOCH_STEPS
            useful = layer.dense_flops() * (1 - s) / (best * 1e-3) / 1e12

            def cell(v: str, variants=variants) -> str:
                if v not in variants:
                    return "-"
                lo, hi = variants[v].iqr()
                return f"{variants[v].median():.3f} ({lo:.3f}-{hi:.3f})"

            row = {
                "layer": layer.name,
                "sparsity": s,
                "dense_fp32_ms": fp32,
                "dense_tf32_ms": tf32,
                "sparse_ms": {v: c.median() for v, c in variants.items()},
                "sparse_iqr_ms": {v: list(c.iqr()) for v, c in variants.items()},
                "dense_dw_ms": dd.median(),
                "ratio_fp32": fp32 / best,
                "ratio_tf32": tf32 / best,
                "ratio_dense_dw_fp32": fp32 / dd.median(),
                "ratio_epoch_fp32": fp32 / epoch,
                "sparse_tflops": useful,
                "dense_fp32_tflops": layer.dense_flops() / (fp32 * 1e-3) / 1e12,
            }
            results.append(row)
            print(
                f"| {layer.name} | {s:.0%} | {fp32:.3f} | {tf32:.3f} | {cell('gather')} | "
                f"{cell('tiled')} | {row['ratio_fp32']:.2f}x | {row['ratio_tf32']:.2f}x | "
                f"{dd.median():.3f} | {row['ratio_dense_dw_fp32']:.2f}x | "
                f"{row['ratio_epoch_fp32']:.2f}x | {useful:.1f} |",
                flush=True,
            )
        del cases
        torch.cuda.empty_cache()

    print("\nForward only at 95% (dense FP32 vs sparse), ms:")
    forward = []
    for layer in layers:
        dense_ms, sparse_ms = _forward_only(layer, 0.95, args.reps)
        forward.append({"layer": layer.name, "dense_ms": dense_ms, "sparse_ms": sparse_ms})
        parts = "  ".join(f"{k} {v:.3f} ({dense_ms / v:.2f}x)" for k, v in sparse_ms.items())
        print(f"  {layer.name}: dense {dense_ms:.3f}  {parts}", flush=True)

    overhead = _host_overhead()
    print(
        "\nHost cost per call (us, median of 200): cupy.from_dlpack "
        f"{overhead['from_dlpack_us']:.1f}, raw pointer {overhead['pointer_us']:.1f}; "
        f"fc 256->256 batch 32 (95%) step wall time: sparse {overhead['tiny_sparse_step_us']:.0f}, "
        f"dense {overhead['tiny_dense_step_us']:.0f}; launch path {overhead['launch_path']}"
    )

    layer = layers[0]
    cases = _layer_cases(layer, (0.95,))
    by = {c.label: c for c in cases}
    mem = {
        "layer": layer.name,
        "dense_step_peak_mib": _peak_memory(by["dense FP32"].step),
        "sparse_step_peak_mib": _peak_memory(by["sparse 95% gather"].step),
        "sparse_dense_dw_step_peak_mib": _peak_memory(by["sparse 95% dense dW"].step),
    }
    print(
        f"\nPeak extra memory of one step, {layer.name}: dense "
        f"{mem['dense_step_peak_mib']:.0f} MiB, sparse {mem['sparse_step_peak_mib']:.0f} MiB, "
        f"sparse with dense dW {mem['sparse_dense_dw_step_peak_mib']:.0f} MiB"
    )
    print(f"\ntotal benchmark time {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "gpu": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "reps": args.reps,
                    "steps": results,
                    "forward": forward,
                    "memory": mem,
                    "host_overhead": overhead,
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
