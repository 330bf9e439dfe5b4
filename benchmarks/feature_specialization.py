"""Feature specialization: class selectivity of sparse (5%) and dense LeNet-5 on Fashion-MNIST.

The sparse momentum paper reports that sparse networks learn features that serve more classes
than dense ones do: their units are less class-selective. This script checks that on the conv net
of ``sparsecore train`` (LeNet-5, Caffe variant), trained dense and sparse from the same initial
weights with the training job's recipe (SGD with Nesterov momentum 0.9, learning rate divided
by 10 at 50% and 75% of training, weight decay 5e-4, batch 100, masks updated at each epoch end
but the last), except the initial learning rate: 0.01 rather than the job's 0.1, at which the dense
LeNet-5 does not leave chance accuracy on Fashion-MNIST. It then records the post-ReLU activations of conv1, conv2 and fc3 over the test set
and computes the class selectivity index of every unit (sparsecore.selectivity).

Writes to ``--out``: ``selectivity.png`` (histograms per layer, sparse against dense),
``feature_specialization.json`` (accuracy per epoch, selectivity statistics, setup), and the two
runs as run records (``sparse_run.json``, ``dense_run.json``) for ``sparsecore report``, and the
trained weights (``sparse_model.pt``, ``dense_model.pt``).

    python benchmarks/feature_specialization.py --epochs 20 --out results/selectivity
    python benchmarks/feature_specialization.py --epochs 1 --limit-train 2000   # a quick look
    # on a small machine, train the two models in parallel, then compare:
    python benchmarks/feature_specialization.py --methods sparse --threads 1 &
    python benchmarks/feature_specialization.py --methods dense --threads 1; wait
    python benchmarks/feature_specialization.py --reuse
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from sparsecore.datasets import load_fashion_mnist
from sparsecore.plots import plot_selectivity
from sparsecore.selectivity import SelectivityResult, class_selectivity
from sparsecore.telemetry import RunRecord, flops_section
from sparsecore.torch import attach
from sparsecore.torch.activations import collect_activations
from sparsecore.torch.flops import count_flops
from sparsecore.torch.models import build_model
from sparsecore.torch.train import METHOD_OPTIONS, TrainConfig, _to_tensors, evaluate

LAYERS = ["conv1", "conv2", "fc3"]


def train(
    method: str,
    data: dict[str, torch.Tensor],
    *,
    epochs: int,
    density: float,
    seed: int,
    lr: float,
    device: torch.device,
) -> tuple[torch.nn.Module, list[dict[str, Any]], RunRecord]:
    """Train LeNet-5 dense or sparse with the training job's recipe; returns model, epochs, record."""
    recipe = TrainConfig(
        model="lenet5", method=method, epochs=epochs, density=density, seed=seed, lr=lr
    )
    torch.manual_seed(seed)  # same initial weights for both methods
    model = build_model("lenet5").to(device)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )
    milestones = sorted({max(1, round(f * epochs)) for f in recipe.lr_decay_at})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=milestones, gamma=recipe.lr_decay_factor
    )
    x, y = data["x_train"], data["y_train"]
    steps_per_epoch = math.ceil(x.shape[0] / recipe.batch_size)
    sparse = None
    if method == "sparse":
        sparse = attach(
            model,
            optimizer,
            **METHOD_OPTIONS["sparse"],
            density=density,
            prune_rate=recipe.prune_rate,
            prune_schedule=recipe.prune_schedule,
            init=recipe.init,
            seed=seed,
            total_steps=steps_per_epoch * epochs,
            update_every=None,
            update_at_epoch_end=True,
        )
    log: list[dict[str, Any]] = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        order = order.to(device)
        loss_sum = 0.0
        for start in range(0, x.shape[0], recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()  # the adapter re-applies the masks here
            loss_sum += float(loss.detach()) * idx.shape[0]
        scheduler.step()
        test_loss, test_acc = evaluate(model, data["x_test"], data["y_test"], 1000)
        if sparse is not None and epoch < epochs:
            sparse.end_epoch()
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / x.shape[0],
            "test_loss": test_loss,
            "test_acc": test_acc,
            "density": sparse.density() if sparse is not None else 1.0,
            "epoch_time_s": time.perf_counter() - t0,
        }
        log.append(row)
        print(
            f"{method:>6} epoch {epoch:>2}/{epochs}  train loss {row['train_loss']:.4f}  "
            f"test acc {test_acc:.2f}%  density {row['density']:.4f}  {row['epoch_time_s']:.1f}s",
            flush=True,
        )
    meta = {
        "model": "lenet5",
        "method": method,
        "config": {**recipe.to_dict(), "density": density if sparse is not None else 1.0},
    }
    history = sparse.history if sparse is not None else []
    return model, log, RunRecord.from_reports(history, epochs=log, meta=meta)


def selectivity(
    model: torch.nn.Module, data: dict[str, torch.Tensor]
) -> dict[str, SelectivityResult]:
    acts = collect_activations(model, data["x_test"], LAYERS, transform=torch.relu, batch_size=1000)
    labels = data["y_test"].cpu().numpy()
    return {n: class_selectivity(a, labels, 10, name=f"layer {n!r}") for n, a in acts.items()}


def _masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sparsity pattern of every weight (its nonzeros: inactive weights are exactly 0)."""
    return {n: p.detach() != 0 for n, p in model.named_parameters() if n.endswith("weight")}


def _commit() -> str:
    if os.environ.get("SPARSECORE_COMMIT"):  # for copies of the tree without .git
        return os.environ["SPARSECORE_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr",
        type=float,
        default=0.01,
        help="initial learning rate of both models (default 0.01: at the training job's 0.1 the "
        "dense LeNet-5 stays at chance on Fashion-MNIST)",
    )
    parser.add_argument("--data", help="Fashion-MNIST IDX folder (default: the installed copy)")
    parser.add_argument("--limit-train", type=int, help="use the first N training images only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", default="runs/feature_specialization")
    parser.add_argument(
        "--methods",
        default="sparse,dense",
        help="which models to train now (to train them in two processes, run once with "
        "--methods sparse and once with --methods dense, then with --reuse to compare)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="load models saved in --out instead of training"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dataset = load_fashion_mnist(args.data)
    if args.limit_train:
        dataset = dataset.subset(args.limit_train, None)
    x_train, y_train = _to_tensors(dataset.train_images, dataset.train_labels)
    x_test, y_test = _to_tensors(dataset.test_images, dataset.test_labels)
    data = {
        "x_train": x_train.to(device),
        "y_train": y_train.to(device),
        "x_test": x_test.to(device),
        "y_test": y_test.to(device),
    }
    t0 = time.perf_counter()
    results: dict[str, dict[str, SelectivityResult]] = {}
    runs: dict[str, Any] = {}
    for method in ("sparse", "dense"):
        model_path = out / f"{method}_model.pt"
        if args.reuse and model_path.is_file():
            model = build_model("lenet5").to(device)
            model.load_state_dict(torch.load(model_path, map_location=device, weights_only=True))
            record = RunRecord.load(out / f"{method}_run.json")
            log = record.epochs
            print(f"{method}: reusing the model trained earlier in {model_path}")
        elif method in args.methods.split(","):
            model, log, record = train(
                method,
                data,
                epochs=args.epochs,
                density=args.density,
                seed=args.seed,
                lr=args.lr,
                device=device,
            )
            torch.save(model.state_dict(), model_path)
            record.save(out / f"{method}_run.json")
        else:
            continue
        if method == "sparse" and record.flops is None:
            # per-layer FLOPs of one training step (batch 100) under the final masks
            flops = count_flops(model, data["x_test"][:100], _masks(model))
            record.flops = flops_section(flops, batch=100)
            record.save(out / f"{method}_run.json")
        results[method] = selectivity(model, data)
        runs[method] = {
            "lr": record.meta.get("config", {}).get("lr"),
            "final_test_acc": log[-1]["test_acc"],
            "best_test_acc": max(r["test_acc"] for r in log),
            "epochs": log,
            "selectivity": {n: r.summary() for n, r in results[method].items()},
            "layer_densities": {
                name: float((p != 0).float().mean())
                for name, p in model.named_parameters()
                if name.endswith("weight")
            },
        }
    if set(runs) != {"sparse", "dense"}:
        print(f"trained {sorted(runs)}; run again with --reuse once both models exist in {out}")
        return 0
    pct = f"{100 * args.density:g}%"
    plot_selectivity(
        {f"sparse {pct}": results["sparse"], "dense": results["dense"]},
        out / "selectivity.png",
        title=f"Class selectivity of LeNet-5 units on the Fashion-MNIST test set "
        f"({args.epochs} epochs, sparse {pct} vs dense)",
    )
    report = {
        "setup": {
            "model": "lenet5",
            "density": args.density,
            "epochs": args.epochs,
            "seed": args.seed,
            "train_images": int(x_train.shape[0]),
            "test_images": int(x_test.shape[0]),
            "dataset": dataset.describe(),
            "device": str(device)
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "torch": torch.__version__,
            "machine": platform.platform(),
            "commit": _commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_time_s": time.perf_counter() - t0,
        },
        "runs": runs,
    }
    (out / "feature_specialization.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'layer':<7} {'method':<7} {'units':>5} {'dead':>4} {'mean SI':>8} {'median':>7}")
    for layer in LAYERS:
        for method in ("sparse", "dense"):
            s = runs[method]["selectivity"][layer]
            mean = "-" if s["mean"] is None else f"{s['mean']:.3f}"
            median = "-" if s["median"] is None else f"{s['median']:.3f}"
            print(f"{layer:<7} {method:<7} {s['units']:>5} {s['dead']:>4} {mean:>8} {median:>7}")
    for method in ("sparse", "dense"):
        print(f"{method}: final test accuracy {runs[method]['final_test_acc']:.2f}%")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
