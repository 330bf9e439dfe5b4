"""Sparse language models: dense vs sparse momentum vs static vs SET (vs ERK + momentum_neuron),
paired seeds, on the character-level models of ``sparsecore train`` (docs/results.md).

The protocol is fixed in :data:`PROTOCOL` before any run: both models (``lstm-lm``,
``gpt-mini``) with the job's defaults (10 epochs, batch 32 windows of 64 characters, SGD with
Nesterov momentum, gradient norm clipped to 1), on the embedded Jargon File excerpt (the same
text on every machine), at densities 0.1 and 0.2, seeds 0, 1, 2. The metric is the final
validation bits per character (lower is better). Arms:

- ``dense``: no sparsity (one per seed, shared by both densities);
- ``sparse``: sparse momentum (the paper's recipe, the job's default);
- ``static``: the initial random mask, never updated;
- ``set``: SET (magnitude pruning by sign, random regrowth);
- ``erk-neuron``: sparse momentum with ERK initial densities and per-unit growth
  (``momentum_neuron``), the options that closed part of the gap on images.

Runs go one per process, ``--parallel`` at a time (default 2), each with one thread and
``nice``; a finished run's summary is reused, so an interrupted study resumes. Then the script
prints and writes (``results.json``, ``tables.md``, ``lm.png``) each arm's mean and the paired
differences (same seed: same initial weights and data order) with 95% t-intervals.

    nice python benchmarks/lm_results.py --out docs/results/lm            # the study (54 runs)
    python benchmarks/lm_results.py --out /tmp/lm-smoke --smoke             # a quick check
    python benchmarks/lm_results.py --out docs/results/lm --report-only     # tables only
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accuracy_fmnist import describe  # noqa: E402

#: Fixed before the study's runs.
PROTOCOL: dict[str, Any] = {
    "models": ["lstm-lm", "gpt-mini"],
    "densities": [0.1, 0.2],
    "seeds": [0, 1, 2],
    "data": "embedded",
    "metric": "final_test_bpc",
}
ARMS: dict[str, list[str]] = {
    "dense": ["--method", "dense"],
    "sparse": ["--method", "sparse"],
    "static": ["--method", "static"],
    "set": ["--method", "set"],
    "erk-neuron": ["--method", "sparse", "--init", "ERK", "--growth", "momentum_neuron"],
}
#: Paired differences reported (a - b, in bits per character: negative means a is better).
PAIRS = [
    ("sparse", "static"),
    ("sparse", "set"),
    ("sparse", "dense"),
    ("erk-neuron", "sparse"),
    ("erk-neuron", "dense"),
]
SMOKE = ["--epochs", "2", "--limit-train", "64", "--limit-test", "32"]


def run_path(root: Path, model: str, arm: str, density: float, seed: int) -> Path:
    name = f"{arm}-seed{seed}" if arm == "dense" else f"{arm}-d{density:g}-seed{seed}"
    return root / model / name


def run_one(cmd: list[str], out: Path) -> None:
    if (out / "summary.json").exists() and json.loads((out / "summary.json").read_text()).get(
        "completed"
    ):
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (out.parent / f"{out.name}.log").open("w") as f:  # not with_suffix: "d0.1"
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
    print(f"{status} {time.perf_counter() - started:6.0f}s  {out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the runs and the tables")
    parser.add_argument("--models", nargs="+", default=PROTOCOL["models"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--densities", nargs="+", type=float, default=PROTOCOL["densities"])
    parser.add_argument("--seeds", nargs="+", type=int, default=PROTOCOL["seeds"])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny runs, to check the pipeline")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    jobs: dict[Path, list[str]] = {}
    for seed in args.seeds:  # seeds outer: an interrupted study keeps complete pairs
        for model in args.models:
            for density in args.densities:
                for arm in args.arms:
                    out = run_path(root, model, arm, density, seed)
                    jobs[out] = [
                        "nice", "-n", "10", sys.executable, "-m", "sparsecore.cli", "train",
                        "--model", model, "--data", PROTOCOL["data"], "--seed", str(seed),
                        "--density", str(density), "--threads", "1", "--no-progress",
                        "--overwrite", *ARMS[arm], *(SMOKE if args.smoke else []),
                        "--out", str(out),
                    ]  # fmt: skip
    if not args.report_only:
        todo = sum(not (out / "summary.json").exists() for out in jobs)
        print(f"{len(jobs)} runs, {todo} to do", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda item: run_one(item[1], item[0]), jobs.items()))
    results = tabulate(root, args)
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (root / "tables.md").write_text(markdown(results))
    plot(results, root / "lm.png")
    print(markdown(results))
    print(f"wrote {root / 'results.json'}, {root / 'tables.md'} and {root / 'lm.png'}")


def _metric(out: Path) -> float | None:
    path = out / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary.get(PROTOCOL["metric"]) if summary.get("completed") else None


def tabulate(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Per model and density: each arm's figures and the paired differences between arms."""
    out: dict[str, Any] = {"protocol": PROTOCOL, "smoke": args.smoke, "cells": {}}
    for model in args.models:
        for density in args.densities:
            values = {
                arm: {s: _metric(run_path(root, model, arm, density, s)) for s in args.seeds}
                for arm in args.arms
            }
            arms = {
                arm: describe([v for v in by_seed.values() if v is not None])
                for arm, by_seed in values.items()
                if any(v is not None for v in by_seed.values())
            }
            paired = {}
            for a, b in PAIRS:
                if a in values and b in values:
                    diffs = [
                        values[a][s] - values[b][s]  # type: ignore[operator]
                        for s in args.seeds
                        if values[a][s] is not None and values[b][s] is not None
                    ]
                    if diffs:
                        paired[f"{a} - {b}"] = describe(diffs)
            out["cells"][f"{model} d={density:g}"] = {"arms": arms, "paired": paired}
    return out


def _ci(stats: dict[str, Any]) -> str:
    low, high = stats["ci95"]
    return "n/a" if math.isnan(low) else f"[{low:+.3f}, {high:+.3f}]"


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/results.md: validation bits per character per arm, then the paired
    differences (negative: the first arm is better)."""
    lines: list[str] = []
    for cell, data in results["cells"].items():
        lines += [f"#### {cell}", "", "| arm | bpc mean | 95% CI | per seed |", "|---|---|---|---|"]
        for arm, s in data["arms"].items():
            seeds = ", ".join(f"{v:.3f}" for v in s["values"])
            lines.append(f"| {arm} | {s['mean']:.3f} | {_ci(s)} | {seeds} |")
        lines += ["", "| paired difference (bpc) | mean | 95% CI | per seed |", "|---|---|---|---|"]
        for name, p in data["paired"].items():
            seeds = ", ".join(f"{v:+.3f}" for v in p["values"])
            lines.append(f"| {name} | {p['mean']:+.3f} | {_ci(p)} | {seeds} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel per model and density: each arm's seeds as dots, the mean as a bar with its
    95% interval (lower is better)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is optional
        print("matplotlib not installed: no plot")
        return
    cells = {k: v for k, v in results["cells"].items() if v["arms"]}
    if not cells:
        return
    fig, axes = plt.subplots(1, len(cells), figsize=(3.4 * len(cells), 3.4), squeeze=False)
    for ax, (cell, data) in zip(axes[0], cells.items()):
        arms = list(data["arms"])
        for i, arm in enumerate(arms):
            s = data["arms"][arm]
            half = 0.0 if math.isnan(s["ci95"][0]) else s["mean"] - s["ci95"][0]
            ax.bar(i, s["mean"], color="0.7" if arm == "dense" else "C0")
            ax.errorbar(i, s["mean"], yerr=half, color="k", capsize=3)
            ax.plot([i] * len(s["values"]), s["values"], "k.", ms=4)
        values = [v for arm in arms for v in data["arms"][arm]["values"]]
        spread = max(values) - min(values) or 1.0
        ax.set_ylim(min(values) - 0.3 * spread, max(values) + 0.3 * spread)
        ax.set_xticks(range(len(arms)), arms, rotation=30, fontsize=8)
        ax.set_title(cell, fontsize=9)
        ax.set_ylabel("validation bits per character", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
