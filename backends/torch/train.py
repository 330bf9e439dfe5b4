"""The training job behind ``sparsecore train``: one model, one dataset, one method, one seed.

The recipe follows the sparse momentum paper's MNIST/Fashion-MNIST setup: SGD with Nesterov
momentum 0.9, learning rate 0.1 divided by 10 at 50% and 75% of training, weight decay 5e-4,
batch 100, masks updated at the end of every epoch except the last (an update after the last
epoch would leave freshly grown weights at zero, untrained).

Everything the run needs to continue is in its checkpoint (model, optimizer, scheduler, sparse
state, RNG states, metrics so far, epoch), and each epoch's shuffle is drawn from a generator
seeded by (seed, epoch), so a run resumed from epoch e ends with the same weights, bit for bit,
as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sparsecore.datasets import ImageDataset, load_fashion_mnist
from sparsecore.recipe import (
    DEFAULT_LR,
    FMNIST_MEAN,
    FMNIST_STD,
    METHOD_OPTIONS,
    METHODS,
    Recipe,
)

from .models import build_model

__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "METHOD_OPTIONS",
    "TrainConfig",
    "TrainResult",
    "load_checkpoint_config",
    "run_training",
    "weight_densities",
]

CHECKPOINT_NAME = "checkpoint.pt"
SUMMARY_NAME = "summary.json"
MASK_UPDATES_NAME = "mask_updates.json"


@dataclass
class TrainConfig(Recipe):
    """The PyTorch job's options: the shared recipe (mask options included) plus ``scale_init``."""

    scale_init: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the option and value for anything out of range."""
        from .models import MODELS

        self.check(MODELS)


@dataclass
class TrainResult:
    """What a finished run reports (also written to summary.json)."""

    summary: dict[str, Any]
    out_dir: Path | None
    model: nn.Module
    epochs: list[dict[str, Any]] = field(default_factory=list)


def weight_densities(model: nn.Module) -> dict[str, float]:
    """Measured fraction of nonzero entries of every linear/conv weight, by parameter name.

    Counted on the weights themselves, so it checks what the adapter claims.
    """
    out: dict[str, float] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = module.weight.detach()
            out[f"{mod_name}.weight"] = float((w != 0).sum().item() / w.numel())
    return out


def _overall_density(model: nn.Module, names: list[str] | None = None) -> float:
    params = dict(model.named_parameters())
    total = nonzero = 0
    for name, dens in weight_densities(model).items():
        if names is not None and name not in names:
            continue
        n = params[name].numel()
        total += n
        nonzero += round(dens * n)
    return nonzero / total if total else 1.0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (global state that user code may draw from)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = ((x - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A fresh stream per (seed, epoch): the shuffle of epoch e does not depend on what ran before.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy in %) of ``model`` on (x, y)."""
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    correct = 0
    for idx in _batches(x.shape[0], batch_size, None):
        logits = model(x[idx])
        loss_sum += F.cross_entropy(logits, y[idx], reduction="sum").item()
        correct += int((logits.argmax(1) == y[idx]).sum().item())
    model.train(was_training)
    n = x.shape[0]
    return loss_sum / n, 100.0 * correct / n


class _Progress:
    """A one-line live indicator, shown only on a terminal (logs stay one line per epoch)."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self._last = 0.0

    def update(self, epoch: int, epochs: int, done: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.2 and done < total):
            return
        self._last = now
        width = 24
        filled = int(width * done / total)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(
            f"\repoch {epoch}/{epochs} [{bar}] {done}/{total} batches  loss {loss:.4f}"
        )
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()


def _attach(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from . import attach  # the adapter; imported here so dense runs never need it

    options = cfg.sparse_options(total_steps)
    assert options is not None  # dense runs attach nothing
    return attach(model, optimizer, **options)


@torch.no_grad()
def _scale_sparse_init(model: nn.Module, densities: dict[str, float]) -> None:
    """Multiply each sparse layer's initial weights by 1/sqrt(its density).

    A default-initialised layer keeping a fraction d of its weights passes on about sqrt(d) of
    the dense layer's output scale, so a 5% net starts with tiny activations and gradients. This
    restores the dense initialisation's output variance per layer, a coarse form of the
    sparsity-aware initialisation of Evci et al. (arXiv 2010.03533), which scales per unit by
    its fan-in. Not part of the sparse momentum recipe: off by default.
    """
    params = dict(model.named_parameters())
    for name, density in densities.items():
        if density > 0:
            params[name].mul_(1.0 / math.sqrt(density))


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _json_ready(value: Any) -> Any:
    """Convert NumPy/torch scalars and arrays inside reports into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _report_dict(report: Any) -> dict[str, Any]:
    raw = report.to_dict() if hasattr(report, "to_dict") else dict(vars(report))
    return _json_ready(raw)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def load_checkpoint_config(path: str | os.PathLike[str]) -> tuple[TrainConfig, Path]:
    """The config saved in a checkpoint (a file, or a run directory holding checkpoint.pt)."""
    ckpt_path = _checkpoint_path(path)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return TrainConfig.from_dict(ckpt["config"]), ckpt_path


def _checkpoint_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}")
    return p


def run_training(
    cfg: TrainConfig,
    *,
    data: str | None = None,
    dataset: ImageDataset | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    stream: TextIO | None = None,
    progress: bool | None = None,
    stop_after: int | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    tensorboard: str | os.PathLike[str] | None = None,
    announce: bool = True,
) -> TrainResult:
    """Train ``cfg.model`` on Fashion-MNIST with ``cfg.method``; write checkpoints and summaries.

    ``resume`` continues a run from its checkpoint (the checkpoint's config must equal ``cfg``).
    ``progress`` defaults to a live indicator only when ``stream`` is a terminal.
    ``stop_after`` ends the process after that epoch (checkpoint written) without changing the
    schedule, so the run can be resumed later, e.g. to fit a time-limited job.
    ``tensorboard`` names a folder for TensorBoard scalars of the run, written when it ends.
    ``announce=False`` leaves out the first line (model, method, ...) and the warnings about the
    options, for a caller that printed them already (``sparsecore train`` does, before it loads
    PyTorch).
    """
    cfg.validate()
    stream = stream if stream is not None else sys.stdout
    if announce:
        if resume is None:
            for caveat in cfg.caveats():
                warnings.warn(caveat, UserWarning, stacklevel=2)
        stream.write(cfg.headline() + "\n")
        stream.flush()
    if progress is None:
        progress = bool(getattr(stream, "isatty", lambda: False)())
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"invalid stop_after: {stop_after!r}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"invalid threads: {threads!r}")
        torch.set_num_threads(threads)
    if tensorboard is not None:
        from sparsecore.telemetry import require_tensorboard

        require_tensorboard()

    ckpt: dict[str, Any] | None = None
    if resume is not None:
        ckpt_path = _checkpoint_path(resume)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = TrainConfig.from_dict(ckpt["config"])
        if saved != cfg:
            diff = {
                k: (v, getattr(cfg, k)) for k, v in asdict(saved).items() if getattr(cfg, k) != v
            }
            raise ValueError(f"{ckpt_path}: config differs from the checkpoint's: {diff}")
        if out_dir is None:
            out_dir = ckpt_path.parent

    if dataset is None:
        dataset = load_fashion_mnist(data)
    if cfg.limit_train is not None or cfg.limit_test is not None:
        dataset = dataset.subset(cfg.limit_train, cfg.limit_test)
    x_train, y_train = _to_tensors(dataset.train_images, dataset.train_labels)
    x_test, y_test = _to_tensors(dataset.test_images, dataset.test_labels)

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    _seed_everything(cfg.seed)
    model = build_model(cfg.model, num_classes=dataset.num_classes)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )
    milestones = sorted({max(1, round(f * cfg.epochs)) for f in cfg.lr_decay_at})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=milestones, gamma=cfg.lr_decay_factor
    )
    steps_per_epoch = math.ceil(x_train.shape[0] / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    sparse = None if cfg.method == "dense" else _attach(model, optimizer, cfg, total_steps)
    if sparse is not None and cfg.scale_init:
        _scale_sparse_init(model, sparse.layer_densities())

    epochs_done: list[dict[str, Any]] = []
    mask_updates: list[dict[str, Any]] = []
    elapsed_before = 0.0
    start_epoch = 1
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if sparse is not None:
            sparse.load_state_dict(ckpt["sparse"])
        _set_rng_state(ckpt["rng"])
        epochs_done = list(ckpt["metrics"])
        mask_updates = list(ckpt["mask_updates"])
        elapsed_before = float(ckpt["wall_time_s"])
        start_epoch = int(ckpt["epoch"]) + 1
    history_seen = len(sparse.history) if sparse is not None else 0

    data_info = dataset.describe()
    stream.write(
        f"dataset: {data_info['name']} from {data_info['source']} "
        f"({data_info['train_size']} train / {data_info['test_size']} test images)\n"
    )
    if start_epoch > 1:
        stream.write(f"resumed after epoch {start_epoch - 1}\n")
    stream.flush()

    bar = _Progress(stream, progress)
    t_start = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        gen = _epoch_generator(cfg.seed, epoch)
        loss_sum = 0.0
        correct = 0
        seen = 0
        for step, idx in enumerate(_batches(x_train.shape[0], cfg.batch_size, gen), start=1):
            xb, yb = x_train[idx], y_train[idx]
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch}, batch {step} "
                    f"(lr {lr:g}); lower --lr"
                )
            loss.backward()
            optimizer.step()  # the adapter re-applies masks and updates them on schedule here
            loss_sum += loss.item() * yb.shape[0]
            correct += int((logits.detach().argmax(1) == yb).sum().item())
            seen += yb.shape[0]
            bar.update(epoch, cfg.epochs, step, steps_per_epoch, loss_sum / seen)
        bar.clear()
        scheduler.step()

        test_loss, test_acc = evaluate(model, x_test, y_test, cfg.eval_batch_size)
        measured = weight_densities(model)
        if sparse is not None:
            layer_dens = {k: float(v) for k, v in sparse.layer_densities().items()}
            overall = float(sparse.density())
            measured_overall = _overall_density(model, list(layer_dens))
        else:
            layer_dens = measured
            overall = measured_overall = _overall_density(model)
        # Mask update after the epoch's evaluation, and none after the last epoch.
        if sparse is not None and epoch < cfg.epochs:
            sparse.end_epoch()
        if sparse is not None:
            new = sparse.history[history_seen:]
            history_seen = len(sparse.history)
            mask_updates.extend({"epoch": epoch, **_report_dict(r)} for r in new)
        wall = elapsed_before + time.perf_counter() - t_start
        record = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": loss_sum / seen,
            "train_acc": 100.0 * correct / seen,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "density": overall,
            "measured_density": measured_overall,
            "layer_densities": layer_dens,
            "epoch_time_s": time.perf_counter() - t_epoch,
            "wall_time_s": wall,
        }
        epochs_done.append(record)
        layers_txt = " ".join(f"{k.removesuffix('.weight')}={v:.3f}" for k, v in layer_dens.items())
        stream.write(
            f"epoch {epoch:>{len(str(cfg.epochs))}}/{cfg.epochs}  lr {lr:.4g}  "
            f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}%  "
            f"test loss {test_loss:.4f} acc {test_acc:.2f}%  density {overall:.4f} "
            f"[{layers_txt}]  {record['epoch_time_s']:.1f}s\n"
        )
        stream.flush()

        summary = _summary(
            cfg, data_info, epochs_done, model, len(mask_updates), wall, done=epoch == cfg.epochs
        )
        if out is not None:
            torch.save(
                {
                    "config": cfg.to_dict(),
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "sparse": sparse.state_dict() if sparse is not None else None,
                    "rng": _rng_state(),
                    "metrics": epochs_done,
                    "mask_updates": mask_updates,
                    "wall_time_s": wall,
                },
                out / (CHECKPOINT_NAME + ".tmp"),
            )
            (out / (CHECKPOINT_NAME + ".tmp")).replace(out / CHECKPOINT_NAME)
            _write_json(out / SUMMARY_NAME, summary)
            _write_json(out / MASK_UPDATES_NAME, mask_updates)
            _write_telemetry(out, summary, mask_updates, model, x_train[: cfg.batch_size], sparse)
        if on_epoch_end is not None:
            on_epoch_end(record)
        if stop_after is not None and epoch >= stop_after and epoch < cfg.epochs:
            stream.write(f"stopped after epoch {epoch} as asked; resume with --resume\n")
            break

    if tensorboard is not None and epochs_done:
        from sparsecore.telemetry import record_from_run, write_tensorboard

        write_tensorboard(record_from_run(_json_ready(summary), mask_updates), tensorboard)
    if start_epoch > cfg.epochs:
        stream.write("nothing to do: the checkpoint is already at the last epoch\n")
    final = epochs_done[-1] if epochs_done else {}
    summary = _summary(
        cfg,
        data_info,
        epochs_done,
        model,
        len(mask_updates),
        final.get("wall_time_s", 0.0),
        done=True,
    )
    if final:
        label = "final" if summary["completed"] else f"after epoch {final['epoch']}:"
        stream.write(
            f"{label} test accuracy {final['test_acc']:.2f}% (loss {final['test_loss']:.4f}), "
            f"density {final['density']:.4f}, wall time {final['wall_time_s']:.1f}s"
            + (f"; results in {out}" if out is not None else "")
            + "\n"
        )
        stream.flush()
    return TrainResult(summary=summary, out_dir=out, model=model, epochs=epochs_done)


def _summary(
    cfg: TrainConfig,
    data_info: dict[str, Any],
    epochs: list[dict[str, Any]],
    model: nn.Module,
    n_updates: int,
    wall: float,
    *,
    done: bool,
) -> dict[str, Any]:
    final = epochs[-1] if epochs else {}
    params = dict(model.named_parameters())
    sparse_names = list(final.get("layer_densities", {}))
    return _json_ready(
        {
            "dataset": data_info,
            "model": cfg.model,
            "method": cfg.method,
            "config": cfg.to_dict(),
            "completed": done and bool(epochs) and final.get("epoch") == cfg.epochs,
            "epochs_completed": final.get("epoch", 0),
            "final_test_acc": final.get("test_acc"),
            "final_test_loss": final.get("test_loss"),
            "final_density": final.get("density"),
            "final_measured_density": final.get("measured_density"),
            "layer_densities": final.get("layer_densities", {}),
            "measured_layer_densities": weight_densities(model),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "num_sparse_parameters": sum(params[n].numel() for n in sparse_names if n in params),
            "num_mask_updates": n_updates,
            "wall_time_s": wall,
            "machine": _machine(),
            "sparsecore_version": _version(),
            "epochs": epochs,
        }
    )


# -- run record for `sparsecore report` (sparsecore.telemetry) --------------------------------------
def _write_telemetry(
    out: Path,
    summary: dict[str, Any],
    mask_updates: list[dict[str, Any]],
    model: nn.Module,
    example: torch.Tensor,
    sparse: Any,
) -> None:
    """Write telemetry.json: mask updates, epochs and, for sparse runs, per-layer FLOPs."""
    from sparsecore.telemetry import TELEMETRY_NAME, flops_section, record_from_run

    from .flops import count_flops

    flops = None
    if sparse is not None:
        masks = {name: sparse.mask(name) for name in sparse.names}
        flops = flops_section(count_flops(model, example, masks), batch=int(example.shape[0]))
    record_from_run(summary, mask_updates, flops=flops).save(out / TELEMETRY_NAME)


def _version() -> str:
    from sparsecore import __version__

    return __version__
