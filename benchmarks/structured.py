"""The structured option's trade-off: accuracy against the measured speed of the compact network.

For LeNet-300-100 at 5% (20 epochs, seeds 0-4) and the job's ``vgg`` (32-64-128) at 5% and 10%
(``--vgg-epochs`` on the first ``--vgg-limit-train`` training images, seeds 0-2), on
Fashion-MNIST with ``sparsecore train``'s recipe (batch 100, SGD with Nesterov momentum, weight
decay, masks updated at every epoch end but the last), it trains one run per (seed, variant);
the dense run serves every density:

- ``dense``: the dense baseline;
- ``paper``: the sparse momentum paper's recipe (uniform densities, momentum growth);
- ``erk-neuron``: ERK densities and ``momentum_neuron`` growth;
- ``ablate-F``: ``erk-neuron`` with ``ablate_below=F`` (the structured option), for each F of
  ``--ablate``.

Then, per sparse run, it exports the trained model with :func:`sparsecore.torch.compact` (the
compact model must predict the same classes as the masked one) and times one training step
(forward, cross-entropy, backward at batch 100) of a plain dense model of the same architecture
and of the compact model, interleaved, median over ``--repeats``: the measured step speedup of
training compacted over training dense (the optimizer step, a small share, is left out). Seeds are in the outer loop and each finished run is kept in
``--runs-dir`` (one JSON per run), so an interrupted study resumes where it stopped.

It prints, and writes to ``--runs-dir`` (``results.json``, ``table.md``, ``tradeoff.png``): per
model, density and variant the mean test accuracy, the paired difference to dense with its 95%
t-interval (same seed = same data order and initial weights), the units (features and channels)
compaction removes, and the measured step speedup (median over seeds). Accuracy does not depend
on the machine's load; the speedups are worth publishing only from a quiet machine (load below 1;
the script prints the load before and after, the commit and the machine).

    nice python benchmarks/structured.py --threads 1                 # the whole study
    python benchmarks/structured.py --quick                          # proves it runs (minutes)
    python benchmarks/structured.py --report-only                    # tabulate finished runs
    python benchmarks/structured.py --retime                         # time again (quiet), tabulate

Each sparse run keeps its trained weights beside its JSON (``.pt``), so the accuracy runs may go
on a busy machine with ``--repeats 0`` and ``--retime`` time every step later on a quiet one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_fmnist import describe
from compaction import _commit, _load, _predictions, _step, _tensors, interleaved

from sparsecore.datasets import load_fashion_mnist
from sparsecore.recipe import DEFAULT_LR
from sparsecore.torch import compact
from sparsecore.torch.models import build_model
from sparsecore.torch.train import TrainConfig, run_training

#: The sparse variants: the options each adds to the job's recipe (``ablate-F`` are added from
#: ``--ablate``).
BASE_VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "erk-neuron": {"init": "ERK", "growth": "momentum_neuron"},
}


def variants(fractions: list[float]) -> dict[str, dict[str, Any] | None]:
    """Every variant's options (None for dense), in table order."""
    out: dict[str, dict[str, Any] | None] = {"dense": None, **BASE_VARIANTS}
    for f in fractions:
        out[f"ablate-{f:g}"] = {**BASE_VARIANTS["erk-neuron"], "ablate_below": f}
    return out


def run_one(
    args: argparse.Namespace,
    dataset: Any,
    model_name: str,
    density: float,
    epochs: int,
    seed: int,
    name: str,
    options: dict[str, Any] | None,
) -> dict[str, Any]:
    """Train one run, export it compact and time the step; the result is kept as JSON (the
    dense run, the same at every density, once per model, epochs and seed)."""
    path = run_path(args, model_name, density, epochs, seed, name)
    if path.exists():
        return {**json.loads(path.read_text()), "density": density}
    limit = args.vgg_limit_train if model_name == "vgg" else args.limit_train
    cfg = TrainConfig(
        model=model_name,
        method="dense" if options is None else "sparse",
        density=density,
        epochs=epochs,
        lr=DEFAULT_LR[model_name],
        seed=seed,
        limit_train=limit,
        limit_test=args.limit_test,
        **(options or {}),
    )
    t0 = time.perf_counter()
    result = run_training(cfg, dataset=dataset, stream=io.StringIO(), progress=False)
    row: dict[str, Any] = {
        "model": model_name,
        "density": density,
        "variant": name,
        "seed": seed,
        "epochs": epochs,
        "options": options,
        "test_acc": float(result.summary["final_test_acc"]),
        "train_wall_s": time.perf_counter() - t0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if options is not None:
        # the trained weights (zero where masked), so that --retime can time the step again
        torch.save(_plain_state(model_name, result.model), path.with_suffix(".pt"))
        row.update(_compact_and_time(args, dataset, model_name, result.model, limit))
    path.write_text(json.dumps(row, indent=1) + "\n")
    return row


def run_path(
    args: argparse.Namespace, model_name: str, density: float, epochs: int, seed: int, name: str
) -> Path:
    """Where one run's result is kept: named by everything that changes it."""
    limit = args.vgg_limit_train if model_name == "vgg" else args.limit_train
    data = "" if limit is None and args.limit_test is None else f"-n{limit}-{args.limit_test}"
    where = "" if name == "dense" else f"-d{density:g}"
    return Path(args.runs_dir) / f"{model_name}{where}-{name}-e{epochs}{data}-seed{seed}.json"


def _plain_state(model_name: str, model: Any) -> dict[str, torch.Tensor]:
    """The trained model's parameters and buffers under the plain model's names (masked weights
    are zero in them), for a later :func:`retime`."""
    keys = build_model(model_name).state_dict().keys()
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in keys}


def _time_steps(
    args: argparse.Namespace, model_name: str, small: Any, x: torch.Tensor, y: torch.Tensor
) -> dict[str, float]:
    """One training step of a plain dense model against the compact one, interleaved."""
    dense = build_model(model_name).train()
    small.train()
    times = interleaved(
        {"dense": _step(dense, x, y), "compact": _step(small, x, y)}, args.repeats, args.inner
    )
    return {
        "dense_step_ms": float(np.median(times["dense"]) * 1e3),
        "compact_step_ms": float(np.median(times["compact"]) * 1e3),
        "step_speedup": float(np.median(times["dense"] / times["compact"])),
    }


def retime(args: argparse.Namespace, dataset: Any) -> int:
    """Time the step again for every finished sparse run that kept its weights: the accuracy
    runs can go on a busy machine, and this pass alone on a quiet one."""
    done = 0
    for path in sorted(Path(args.runs_dir).glob("*.json")):
        weights = path.with_suffix(".pt")
        if path.name == "results.json" or not weights.exists():
            continue
        row = json.loads(path.read_text())
        model = build_model(row["model"])
        model.load_state_dict(torch.load(weights))
        limit = args.vgg_limit_train if row["model"] == "vgg" else args.limit_train
        sub = dataset.subset(limit, args.limit_test)
        x, y = _tensors(sub.train_images[: args.batch], sub.train_labels[: args.batch])
        small, report = compact(model, x)
        if report.units_removed != row["units_removed"]:
            raise SystemExit(f"{path.name}: the kept weights do not give the run's compaction")
        row.update(_time_steps(args, row["model"], small, x, y))
        row["timed_load"] = _load()
        path.write_text(json.dumps(row, indent=1) + "\n")
        print(f"{path.stem}: step {row['step_speedup']:.2f}x", flush=True)
        done += 1
    return done


def _compact_and_time(
    args: argparse.Namespace, dataset: Any, model_name: str, model: Any, limit: int | None
) -> dict[str, Any]:
    """Export ``model`` compact, check its predictions, and time a training step of it against
    a plain dense model of the same architecture (no masks, no hooks: what dense training
    runs)."""
    sub = dataset.subset(limit, args.limit_test)
    x_train, y_train = _tensors(sub.train_images, sub.train_labels)
    x_test, _ = _tensors(sub.test_images, sub.test_labels)
    x, y = x_train[: args.batch], y_train[: args.batch]
    small, report = compact(model, x)
    same = float((_predictions(small, x_test) == _predictions(model, x_test)).float().mean())
    out: dict[str, Any] = {
        "units": report.units,
        "units_removed": report.units_removed,
        "fraction_removed": report.fraction_removed(),
        "same_predictions": same,
        "layers": [
            {"name": layer.name, "out": layer.out_channels, "kept_out": layer.kept_out}
            for layer in report.layers
        ],
        "step_speedup": float("nan"),
    }
    if args.repeats > 0:
        out.update(_time_steps(args, model_name, small, x, y))
    return out


def tabulate(rows: list[dict[str, Any]], names: list[str]) -> tuple[list[dict[str, Any]], str]:
    """Per (model, density, variant): accuracy, paired difference to dense, units removed and
    speedup; and the markdown table of them."""
    table = []
    groups = sorted(
        {(r["model"], r["density"]) for r in rows}, key=lambda g: (g[0] != "lenet300", g)
    )
    for model_name, density in groups:
        mine = [r for r in rows if (r["model"], r["density"]) == (model_name, density)]
        dense = {r["seed"]: r["test_acc"] for r in mine if r["variant"] == "dense"}
        for name in names:
            runs = sorted((r for r in mine if r["variant"] == name), key=lambda r: r["seed"])
            if not runs:
                continue
            entry: dict[str, Any] = {
                "model": model_name,
                "density": density,
                "variant": name,
                "seeds": [r["seed"] for r in runs],
                "epochs": runs[0]["epochs"],
                "accuracy": describe([r["test_acc"] for r in runs]),
            }
            paired = [r["test_acc"] - dense[r["seed"]] for r in runs if r["seed"] in dense]
            entry["vs_dense"] = describe(paired) if paired and name != "dense" else None
            if name != "dense":
                entry["fraction_removed"] = float(np.mean([r["fraction_removed"] for r in runs]))
                entry["units_removed"] = [r["units_removed"] for r in runs]
                entry["units"] = runs[0]["units"]
                entry["step_speedup"] = float(np.median([r["step_speedup"] for r in runs]))
                entry["same_predictions"] = min(r["same_predictions"] for r in runs)
            table.append(entry)
    lines = [
        "| model | density | variant | seeds | accuracy % | vs dense (95% CI) | units removed "
        "| step speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        acc = e["accuracy"]
        vs = e["vs_dense"]
        paired = "-"
        if vs is not None:
            lo, hi = vs["ci95"]
            paired = (
                f"{vs['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]" if vs["n"] > 1 else f"{vs['mean']:+.2f}"
            )
        removed = "-"
        speed = "-"
        if e["variant"] != "dense":
            removed = f"{100 * e['fraction_removed']:.1f}% of {e['units']}"
            speed = "-" if np.isnan(e["step_speedup"]) else f"{e['step_speedup']:.2f}x"
        lines.append(
            f"| {e['model']} | {100 * e['density']:g}% | {e['variant']} | {len(e['seeds'])} "
            f"| {acc['mean']:.2f} | {paired} | {removed} | {speed} |"
        )
    return table, "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], path: Path) -> None:
    """Accuracy difference to dense against the measured step speedup, one panel per model and
    density, one point per variant (the bars are the paired 95% intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(
        {(e["model"], e["density"]) for e in table}, key=lambda g: (g[0] != "lenet300", g)
    )
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (model_name, density) in zip(axes[0], groups):
        for e in table:
            if (e["model"], e["density"]) != (model_name, density) or e["vs_dense"] is None:
                continue
            vs = e["vs_dense"]
            x = e["step_speedup"]
            err = None
            if vs["n"] > 1:
                err = [[vs["mean"] - vs["ci95"][0]], [vs["ci95"][1] - vs["mean"]]]
            ax.errorbar([x], [vs["mean"]], yerr=err, fmt="o", capsize=3, label=e["variant"])
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.axhline(-0.5, color="grey", lw=0.8, ls=":")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{model_name}, {100 * density:g}% density")
        ax.set_xlabel("measured training-step speedup over dense (compact)")
        ax.set_ylabel("test accuracy - dense (points)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ablate", default="0.3,0.6,0.9", help="ablate_below settings")
    parser.add_argument("--lenet-seeds", default="0,1,2,3,4")
    parser.add_argument("--lenet-epochs", type=int, default=20)
    parser.add_argument("--vgg-seeds", default="0,1,2")
    parser.add_argument("--vgg-densities", default="0.05,0.1")
    parser.add_argument("--vgg-epochs", type=int, default=4)
    parser.add_argument(
        "--vgg-limit-train",
        type=int,
        default=12000,
        help="vgg trains on the first N training images (default 12000, to fit the time)",
    )
    parser.add_argument("--models", default="lenet300,vgg")
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--limit-test", type=int, default=None)
    parser.add_argument("--batch", type=int, default=100, help="batch of the timed step")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats (0: no timing)")
    parser.add_argument("--inner", type=int, default=5, help="steps per timed repeat")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: found)")
    parser.add_argument("--runs-dir", default="runs/structured")
    parser.add_argument("--report-only", action="store_true", help="tabulate finished runs only")
    parser.add_argument(
        "--retime",
        action="store_true",
        help="time the step again for the finished runs (on a quiet machine), then tabulate",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 and 2 epochs on 1000 images, one seed, 2 repeats: proves the script works",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.lenet_epochs, args.vgg_epochs = 2, 2
        args.lenet_seeds = args.vgg_seeds = "0"
        args.vgg_densities = "0.1"
        args.limit_train = args.vgg_limit_train = 1000
        args.limit_test = 500
        args.repeats, args.inner = min(args.repeats, 2), 1
    torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.ablate.split(",") if f]
    plan = variants(fractions)
    root = Path(args.runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    load_before, commit, started = _load(), _commit(), time.strftime("%Y-%m-%d %H:%M")
    print(
        f"# structured benchmark: commit {commit}, {started}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load_before}",
        flush=True,
    )
    jobs: list[tuple[str, float, int, int]] = []  # (model, density, epochs, seed)
    models = args.models.split(",")
    seeds = {
        "lenet300": [int(s) for s in args.lenet_seeds.split(",")],
        "vgg": [int(s) for s in args.vgg_seeds.split(",")],
    }
    for k in range(max(len(v) for v in seeds.values())):  # seeds outer: complete pairs first
        if "lenet300" in models and k < len(seeds["lenet300"]):
            jobs.append(("lenet300", 0.05, args.lenet_epochs, seeds["lenet300"][k]))
        if "vgg" in models and k < len(seeds["vgg"]):
            for d in args.vgg_densities.split(","):
                jobs.append(("vgg", float(d), args.vgg_epochs, seeds["vgg"][k]))
    dataset = None if args.report_only else load_fashion_mnist(args.data)
    if args.retime:
        print(f"# retimed {retime(args, dataset)} runs; load after {_load()}", flush=True)
        args.report_only = True
    rows = []
    t0 = time.perf_counter()
    for model_name, density, epochs, seed in jobs:
        for name, options in plan.items():
            if args.report_only:
                path = run_path(args, model_name, density, epochs, seed, name)
                if path.exists():
                    rows.append({**json.loads(path.read_text()), "density": density})
                continue
            row = run_one(args, dataset, model_name, density, epochs, seed, name, options)
            rows.append(row)
            speed = row.get("step_speedup", float("nan"))
            print(
                f"{model_name} d={density:g} seed {seed} {name:<12} acc {row['test_acc']:.2f}%"
                + (
                    ""
                    if options is None
                    else f"  removed {100 * row['fraction_removed']:.1f}%  step {speed:.2f}x"
                ),
                flush=True,
            )
    table, text = tabulate(rows, list(plan))
    load_after = _load()
    print("\n" + text + f"\n# load before {load_before}, after {load_after}")
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
        "wall_s": time.perf_counter() - t0,
        "args": vars(args),
    }
    results = {"meta": meta, "table": table, "runs": rows}
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (root / "table.md").write_text(text)
    if table:
        plot(table, root / "tradeoff.png")
    print(f"wrote {root / 'results.json'}, {root / 'table.md'}, {root / 'tradeoff.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
