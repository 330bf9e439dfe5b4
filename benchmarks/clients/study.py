"""The defaults study: four real client scripts, five arms, paired seeds (docs/results.md).

Each client (``torch_mnist``, ``keras_tf``, ``keras_torch``, ``gpt2``) runs in five arms:

- ``dense``: the script as published, no sparsecore;
- ``paper``: ``attach``/``SparseCallback`` with ``recipe="paper"``, the defaults before this
  study (for GPT-2 also the layer selection of then: only the tied token embedding was sparse);
- ``default``: the library's defaults, nothing but density and the run length given;
- ``best``: the best recipe known before this study (:data:`BEST`: ERK initial densities and
  ``momentum_neuron`` growth, docs/results.md "Closing the gap"), without the dead-unit rules;
- ``narrow``: the dense script with every hidden width scaled down so that its weights number
  about the sparse runs' active weights (:func:`narrow_width`).

The protocol (epochs, steps, seeds, density) is fixed in :data:`PROTOCOL` before any run of the
study. Runs go one per process, ``--parallel`` at a time (default 2), each with one thread and
``nice``; a finished run's JSON is reused, so an interrupted study resumes. Then the script
prints, per client, each arm's mean and the paired differences (same seed: same initial weights
and data order) with 95% t-intervals, writes them to ``results.json`` and draws ``clients.png``.

    nice python benchmarks/clients/study.py --out docs/results/clients            # the study
    python benchmarks/clients/study.py --out /tmp/smoke --smoke                     # a quick check
    python benchmarks/clients/study.py --out docs/results/clients --report-only     # tables only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from accuracy_fmnist import describe  # noqa: E402

#: Fixed before the study's runs (docs/results.md gives the reasons): seeds, density, length.
PROTOCOL: dict[str, Any] = {
    "seeds": [0, 1, 2],
    "clients": {
        "torch_mnist": {"script": "torch_mnist.py", "density": 0.1, "length": ["--epochs", "1"]},
        "keras_tf": {
            "script": "keras_mnist_convnet.py",
            "density": 0.1,
            "length": ["--epochs", "6", "--backend", "tensorflow"],
        },
        "keras_torch": {
            "script": "keras_mnist_convnet.py",
            "density": 0.1,
            "length": ["--epochs", "6", "--backend", "torch"],
        },
        "gpt2": {"script": "gpt2_tiny.py", "density": 0.2, "length": ["--steps", "400"]},
    },
}
SMOKE: dict[str, list[str]] = {
    "torch_mnist": ["--epochs", "1", "--limit-train", "640"],
    "keras_tf": ["--epochs", "1", "--limit-train", "640", "--backend", "tensorflow"],
    "keras_torch": ["--epochs", "1", "--limit-train", "640", "--backend", "torch"],
    "gpt2": ["--steps", "8"],
}
#: The best recipe before this study: the paper's, with ERK initial densities and per-unit growth.
BEST: list[str] = ["--opt", "recipe=paper", "--opt", "init=ERK", "--opt", "growth=momentum_neuron"]
#: GPT-2 under the old defaults: only the token embedding (tied to the output layer) was sparse.
GPT2_OLD_SELECTION = [
    "--opt",
    'include=["transformer.wte.weight"]',
    "--opt",
    'exclude=["transformer.h.*"]',
]
ARMS = ("dense", "paper", "default", "best", "narrow")
#: Which final figure each client is judged by, and whether higher is better.
METRIC = {"gpt2": ("val_loss", False)}
DEFAULT_METRIC = ("test_acc", True)


def weights_at(client: str, width: float) -> int:
    """Weights of the layers sparsecore makes sparse, for a client's network at ``width``."""
    r = lambda n: max(1, round(n * width))  # noqa: E731
    if client == "torch_mnist":
        c1, c2, h = r(32), r(64), r(128)
        return 9 * c1 + 9 * c1 * c2 + 144 * c2 * h + 10 * h
    if client.startswith("keras"):
        c1, c2 = r(32), r(64)
        return 9 * c1 + 9 * c1 * c2 + 25 * c2 * 10
    d = max(4, 4 * round(128 * width / 4))  # GPT-2: 2 blocks of 12 d^2 weights
    return 2 * 12 * d * d


def narrow_width(client: str, density: float) -> float:
    """The width factor (on a 0.001 grid) whose weight count is closest to ``density`` times
    the full network's."""
    target = density * weights_at(client, 1.0)
    grid = [i / 1000 for i in range(1, 1001)]
    return min(grid, key=lambda w: (abs(weights_at(client, w) - target), w))


def arm_args(client: str, arm: str, density: float) -> list[str]:
    if arm == "dense":
        return ["--dense"]
    if arm == "narrow":
        return ["--dense", "--width", str(narrow_width(client, density))]
    extra = {"paper": ["--opt", "recipe=paper"], "default": [], "best": BEST}[arm]
    if client == "gpt2" and arm == "paper":
        extra = extra + GPT2_OLD_SELECTION
    return ["--density", str(density), *extra]


def run_one(cmd: list[str], out: Path, log: Path) -> None:
    if out.exists():
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
    print(f"{status} {time.perf_counter() - started:6.0f}s  {out.name}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the runs' JSON and the tables")
    parser.add_argument("--clients", nargs="+", default=list(PROTOCOL["clients"]))
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=PROTOCOL["seeds"])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny runs, to check the pipeline")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    jobs = []
    for seed in args.seeds:  # seeds outer: an interrupted study keeps complete pairs
        for client in args.clients:
            spec = PROTOCOL["clients"][client]
            length = SMOKE[client] if args.smoke else spec["length"]
            for arm in args.arms:
                out = root / client / f"{arm}-seed{seed}.json"
                cmd = [
                    "nice", "-n", "10", sys.executable, str(HERE / spec["script"]),
                    *length, "--seed", str(seed), "--threads", "1",
                    *arm_args(client, arm, spec["density"]), "--out", str(out),
                ]  # fmt: skip
                jobs.append((cmd, out, out.with_suffix(".log")))
    if not args.report_only:
        print(f"{len(jobs)} runs, {sum(not j[1].exists() for j in jobs)} to do", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda j: run_one(*j), jobs))
    results = tabulate(root, args)
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (root / "tables.md").write_text(markdown(results))
    plot(results, root / "clients.png")
    print(f"wrote {root / 'results.json'}, {root / 'tables.md'} and {root / 'clients.png'}")


def tabulate(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Per client: each arm's figures and the paired differences between arms."""
    out: dict[str, Any] = {"protocol": PROTOCOL, "best": BEST, "clients": {}}
    for client in args.clients:
        key, higher = METRIC.get(client, DEFAULT_METRIC)
        runs: dict[str, dict[int, dict[str, Any]]] = {}
        for arm in args.arms:
            for seed in args.seeds:
                path = root / client / f"{arm}-seed{seed}.json"
                if path.exists():
                    runs.setdefault(arm, {})[seed] = json.loads(path.read_text())
        if not runs:
            continue
        density = PROTOCOL["clients"][client]["density"]
        arms = {}
        print(f"\n{client}: {key} ({'higher' if higher else 'lower'} is better)")
        for arm, by_seed in runs.items():
            values = [by_seed[s]["final"][key] for s in sorted(by_seed)]
            stats = describe(values)
            first = next(iter(by_seed.values()))
            stats.update(
                seeds=sorted(by_seed),
                weights=first.get("weights"),
                dead_units=[by_seed[s].get("dead_units") for s in sorted(by_seed)],
                wall_time_s=[round(by_seed[s]["wall_time_s"]) for s in sorted(by_seed)],
            )
            if arm == "narrow":
                stats["width"] = narrow_width(client, density)
            arms[arm] = stats
            print(f"  {arm:8s} n={stats['n']} mean {stats['mean']:.4f} values "
                  f"{[round(v, 4) for v in values]}")  # fmt: skip
        paired = {}
        for a, b in (
            ("default", "paper"), ("default", "narrow"), ("default", "dense"),
            ("best", "narrow"), ("paper", "narrow"), ("narrow", "dense"), ("best", "default"),
        ):  # fmt: skip
            if a in runs and b in runs:
                seeds = sorted(set(runs[a]) & set(runs[b]))
                if len(seeds) >= 2:
                    diffs = [runs[a][s]["final"][key] - runs[b][s]["final"][key] for s in seeds]
                    paired[f"{a} - {b}"] = describe(diffs)
                    p = paired[f"{a} - {b}"]
                    print(f"  {a} - {b}: {p['mean']:+.4f} [{p['ci95'][0]:+.4f}, "
                          f"{p['ci95'][1]:+.4f}]")  # fmt: skip
        out["clients"][client] = {"metric": key, "higher_is_better": higher, "arms": arms,
                                  "paired": paired}  # fmt: skip
        if {"dense", "narrow", "default"} <= set(arms):
            half = (arms["dense"]["mean"] + arms["narrow"]["mean"]) / 2
            out["clients"][client]["halfway"] = half
            print(f"  halfway from narrow to dense: {half:.4f}")
    return out


def _interval(ci: list[float], fmt: str) -> str:
    """A 95% interval for the tables; one seed has none."""
    lo, hi = ci
    return "-" if math.isnan(lo) else f"[{fmt.format(lo)}, {fmt.format(hi)}]"


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/results.md: per client, each arm's mean, 95% interval and seeds, its
    dead conv filters, then the paired differences."""
    lines = []
    for client, data in results["clients"].items():
        fmt = "{:.2f}" if data["higher_is_better"] else "{:.4f}"

        lines += [f"**{client}** ({data['metric']}, "
                  f"{'higher' if data['higher_is_better'] else 'lower'} is better)", "",
                  "| arm | mean | 95% CI | per seed | dead conv filters (per seed) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for arm in ARMS:
            if arm not in data["arms"]:
                continue
            a = data["arms"][arm]
            dead = [
                "-" if d is None else "/".join(str(v) for k, v in d.items() if k.startswith("conv"))
                for d in a["dead_units"]
            ]
            lines.append(
                f"| {arm} | {fmt.format(a['mean'])} | {_interval(a['ci95'], fmt)} | "
                f"{' '.join(fmt.format(v) for v in a['values'])} | "
                f"{' '.join(dead)} |"
            )
        lines += ["", "| paired difference | mean | 95% CI | per seed |", "|---|---|---|---|"]
        for name, p in data["paired"].items():
            lines.append(
                f"| {name} | {fmt.format(p['mean'])} | {_interval(p['ci95'], fmt)} | "
                f"{' '.join(fmt.format(v) for v in p['values'])} |"
            )
        if "halfway" in data:
            lines.append(f"\nhalfway from narrow to dense: {fmt.format(data['halfway'])}")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel per client: each arm's seeds as dots, the mean as a bar with its 95% interval."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is optional
        print("matplotlib not installed: no plot")
        return
    clients = results["clients"]
    if not clients:
        return
    fig, axes = plt.subplots(1, len(clients), figsize=(3.6 * len(clients), 3.4), squeeze=False)
    for ax, (client, data) in zip(axes[0], clients.items()):
        arms = [a for a in ARMS if a in data["arms"]]
        for i, arm in enumerate(arms):
            s = data["arms"][arm]
            half = 0.0 if math.isnan(s["ci95"][0]) else s["mean"] - s["ci95"][0]
            ax.bar(i, s["mean"], color="C0" if arm not in ("dense", "narrow") else "0.7")
            ax.errorbar(i, s["mean"], yerr=half, color="k", capsize=3)
            ax.plot([i] * len(s["values"]), s["values"], "k.", ms=4)
        values = [v for arm in arms for v in data["arms"][arm]["values"]]
        spread = max(values) - min(values) or 1.0
        ax.set_ylim(min(values) - 0.3 * spread, max(values) + 0.3 * spread)
        if "halfway" in data:
            ax.axhline(data["halfway"], ls="--", color="C3", lw=1, label="halfway")
            ax.legend(loc="best", fontsize=7)
        ax.set_xticks(range(len(arms)), arms, rotation=30, fontsize=8)
        ax.set_title(client, fontsize=9)
        ax.set_ylabel(("test accuracy (%)" if data["higher_is_better"] else "validation loss"),
                      fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
