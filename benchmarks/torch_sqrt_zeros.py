"""PyTorch's CPU float32 ``sqrt`` on values that contain exact zeros, against values that do not.

Why this is here: with Adam, sparse training on a CPU pays for it. In a sparse network, hidden
units that keep no outgoing weights get whole rows of exact-zero weight gradients, so Adam's
``exp_avg_sq`` holds exact zeros (about a quarter of LeNet-300-100's first layer at 5% density),
and Adam's step takes ``exp_avg_sq.sqrt()`` of every parameter at every step. The dense network's
second moments have no zeros. The script times ``sqrt`` on one layer's worth of values (the
235 200 weights of LeNet-300-100's first layer) in four layouts, interleaved, and prints the
median time of each and its ratio to the zero-free case::

    python benchmarks/torch_sqrt_zeros.py [--threads 1] [--repeats 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def layouts(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    base = torch.rand(n, generator=gen) * 1e-6 + 1e-9  # second moments: small, positive
    scattered = base.clone()
    scattered[torch.rand(n, generator=gen) < 0.25] = 0.0
    rows = base.clone()
    rows[: n // 4] = 0.0  # dead units: whole rows of a row-major weight
    sub = base.clone()
    sub[torch.rand(n, generator=gen) < 0.25] = 1e-40  # subnormal, for comparison
    return {
        "no zeros": base,
        "a quarter zeros, in one block (dead rows)": rows,
        "a quarter zeros, scattered": scattered,
        "a quarter subnormal, scattered": sub,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2000, help="sqrt calls per timing")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = layouts(235_200, torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for x in cases.values():
        x.sqrt()
    for _ in range(args.rounds):
        for name, x in cases.items():
            start = time.perf_counter()
            for _ in range(args.repeats):
                x.sqrt()
            times[name].append((time.perf_counter() - start) / args.repeats)
    print(f"torch {torch.__version__}, {args.threads} thread(s), 235200 float32 values")
    base = statistics.median(times["no zeros"])
    for name, t in times.items():
        median = statistics.median(t)
        print(f"  {name:44s} {1e6 * median:8.1f} us  {median / base:5.2f}x")


if __name__ == "__main__":
    main()
