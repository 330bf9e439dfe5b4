"""The training job behind ``sparsecore train --framework keras``: the paper's Fashion-MNIST recipe
in Keras 3, with sparsity from :class:`~sparsecore.keras.SparseCallback`.

Same recipe as the PyTorch job (``sparsecore.torch.train``): SGD with Nesterov momentum 0.9,
learning rate 0.1 divided by 10 at 50% and 75% of training, weight decay 5e-4 (as an L2 penalty
on every weight and bias, which is what PyTorch's coupled ``weight_decay`` does), batch 100,
masks updated at the end of every epoch except the last. The test set is evaluated after each
epoch, before that epoch's mask update. Writes ``summary.json`` (same keys as the PyTorch job, so
``benchmarks/accuracy_fmnist.py --report-only`` can tabulate it) and the final ``model.keras``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import keras
import numpy as np

from sparsecore.job.datasets import ImageDataset, load_fashion_mnist
from sparsecore.job.recipe import (
    FMNIST_MEAN,
    FMNIST_STD,
    KERAS_MODELS,
    Recipe,
    TrainingInterrupted,
)
from sparsecore.job.rundir import RunFolder

__all__ = ["KERAS_MODELS", "KerasTrainConfig", "build_model", "run_training"]

SUMMARY_NAME = "summary.json"
MODEL_NAME = "model.keras"


@dataclass
class KerasTrainConfig(Recipe):
    """The Keras job's options: the shared recipe (same names and defaults as the PyTorch job's)
    plus ``weight_init``."""

    weight_init: str = "torch"

    def validate(self) -> None:
        """Raise ValueError naming the option and value for anything out of range."""
        self.check(KERAS_MODELS, framework="Keras")
        if self.weight_init not in ("torch", "keras"):
            raise ValueError(f"invalid weight_init: {self.weight_init!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> KerasTrainConfig:
        return cls.from_dict(options)


def build_model(
    name: str, num_classes: int = 10, weight_decay: float = 0.0, weight_init: str = "torch"
) -> keras.Model:
    """LeNet-300-100 or LeNet-5 (Caffe variant) for 28x28x1 inputs, with an L2 penalty of
    ``weight_decay / 2`` per weight (the gradient of which is PyTorch's coupled weight decay).

    ``weight_init='torch'`` draws kernels and biases from U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    PyTorch's default for Linear and Conv layers, so the Keras job starts like the PyTorch one;
    ``'keras'`` keeps Keras' defaults (Glorot-uniform kernels, zero biases).
    """
    if weight_init not in ("torch", "keras"):
        raise ValueError(f"weight_init must be 'torch' or 'keras', got {weight_init!r}")
    reg = keras.regularizers.L2(weight_decay / 2) if weight_decay > 0 else None

    def kw(fan_in: int) -> dict[str, Any]:
        out: dict[str, Any] = {"kernel_regularizer": reg, "bias_regularizer": reg}
        if weight_init == "torch":
            bound = 1.0 / math.sqrt(fan_in)
            out["kernel_initializer"] = keras.initializers.VarianceScaling(
                1.0 / 3.0, mode="fan_in", distribution="uniform"
            )
            out["bias_initializer"] = keras.initializers.RandomUniform(-bound, bound)
        return out

    L = keras.layers
    if name == "lenet300":
        layers = [
            L.Flatten(),
            L.Dense(300, activation="relu", name="fc1", **kw(784)),
            L.Dense(100, activation="relu", name="fc2", **kw(300)),
            L.Dense(num_classes, name="fc3", **kw(100)),
        ]
    elif name == "lenet5":
        layers = [
            L.Conv2D(20, 5, activation="relu", name="conv1", **kw(25)),
            L.MaxPooling2D(2),
            L.Conv2D(50, 5, activation="relu", name="conv2", **kw(20 * 25)),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(500, activation="relu", name="fc3", **kw(800)),
            L.Dense(num_classes, name="fc4", **kw(500)),
        ]
    else:
        raise ValueError(f"model {name!r} has no Keras version; choose one of {KERAS_MODELS}")
    return keras.Sequential([keras.Input((28, 28, 1)), *layers], name=name)


def _arrays(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = (images.astype(np.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD
    return x[..., None], labels.astype(np.int32)


class _EpochRecorder(keras.callbacks.Callback):
    """Prints one line per epoch and keeps the records (runs after SparseCallback)."""

    def __init__(self, cfg: KerasTrainConfig, stream: TextIO) -> None:
        super().__init__()
        self.cfg, self.stream = cfg, stream
        self.records: list[dict[str, Any]] = []
        self._t = 0.0
        self._t0 = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = dict(logs or {})
        milestones = {max(1, round(f * self.cfg.epochs)) for f in self.cfg.lr_decay_at}
        passed = sum(1 for m in milestones if m <= epoch)
        lr = self.cfg.lr * self.cfg.lr_decay_factor**passed
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": float(logs.get("loss", float("nan"))),
            "train_acc": 100.0 * float(logs.get("accuracy", float("nan"))),
            "test_loss": float(logs.get("val_loss", float("nan"))),
            "test_acc": 100.0 * float(logs.get("val_accuracy", float("nan"))),
            "density": float(logs.get("sparse_density", 1.0)),
            "measured_density": float(logs.get("sparse_measured_density", 1.0)),
            "layer_densities": {
                k.removeprefix("sparse_density/"): float(v)
                for k, v in logs.items()
                if k.startswith("sparse_density/")
            },
            "epoch_time_s": time.perf_counter() - self._t,
            "wall_time_s": time.perf_counter() - self._t0,
        }
        self.records.append(record)
        self.stream.write(
            f"epoch {record['epoch']:>{len(str(self.cfg.epochs))}}/{self.cfg.epochs}  "
            f"lr {record['lr']:.4g}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.2f}%  test loss {record['test_loss']:.4f} "
            f"acc {record['test_acc']:.2f}%  density {record['density']:.4f}  "
            f"{record['epoch_time_s']:.1f}s\n"
        )
        self.stream.flush()


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "cpu_count": os.cpu_count(),
    }


def run_training(
    cfg: KerasTrainConfig,
    *,
    data: str | None = None,
    dataset: ImageDataset | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    stream: TextIO | None = None,
    announce: bool = True,
) -> dict[str, Any]:
    """Train ``cfg.model`` with ``cfg.method`` in Keras; return (and write) the run summary.

    ``announce=False`` leaves out the first line and the warnings about the options, for a
    caller that printed them already (``sparsecore train`` does, before it loads Keras).
    """
    from .callback import SparseCallback

    cfg.validate()
    stream = stream if stream is not None else sys.stdout
    if announce:
        for caveat in cfg.caveats():
            warnings.warn(caveat, UserWarning, stacklevel=2)
        stream.write(cfg.headline("keras") + "\n")
        stream.flush()
    if threads is not None and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    folder = RunFolder(out_dir) if out_dir is not None else None  # checks it before any work
    if dataset is None:
        dataset = load_fashion_mnist(data)
    cfg.check_images(dataset.image_shape, dataset.file_of("train_images"))
    if cfg.limit_train is not None or cfg.limit_test is not None:
        dataset = dataset.subset(cfg.limit_train, cfg.limit_test)
    x_train, y_train = _arrays(dataset.train_images, dataset.train_labels)
    x_test, y_test = _arrays(dataset.test_images, dataset.test_labels)

    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg.model, dataset.num_classes, cfg.weight_decay, cfg.weight_init)
    steps_per_epoch = math.ceil(x_train.shape[0] / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    milestones = sorted({max(1, round(f * cfg.epochs)) for f in cfg.lr_decay_at})
    # The schedule sees the 0-based step count: step m * steps_per_epoch starts epoch m + 1.
    boundaries = [m * steps_per_epoch - 1 for m in milestones]
    values = [cfg.lr * cfg.lr_decay_factor**i for i in range(len(boundaries) + 1)]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    optimizer = keras.optimizers.SGD(
        learning_rate=schedule,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks: list[keras.callbacks.Callback] = []
    sparse_options = cfg.sparse_options(total_steps)  # None for "dense"
    if sparse_options is not None:
        callbacks.append(SparseCallback(**sparse_options))
    recorder = _EpochRecorder(cfg, stream)
    callbacks.append(recorder)

    info = dataset.describe()
    stream.write(
        f"Keras {keras.__version__} on its {keras.backend.backend()} backend; dataset: "
        f"{info['name']} from {info['source']} ({info['train_size']} train / "
        f"{info['test_size']} test images)\n"
    )
    stream.flush()
    t0 = time.perf_counter()
    try:
        model.fit(
            x_train,
            y_train,
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            validation_data=(x_test, y_test),
            validation_batch_size=cfg.eval_batch_size,
            shuffle=True,
            callbacks=callbacks,
            verbose=0,
        )
    except KeyboardInterrupt:
        raise TrainingInterrupted(len(recorder.records) + 1, 0, out_dir, resumable=False) from None
    wall = time.perf_counter() - t0
    final = recorder.records[-1]
    sparse = callbacks[0] if sparse_options is not None else None
    summary = {
        "framework": "keras",
        "dataset": info,
        "model": cfg.model,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "completed": True,
        "epochs_completed": final["epoch"],
        "final_test_acc": final["test_acc"],
        "final_test_loss": final["test_loss"],
        "final_density": final["density"],
        "final_measured_density": final["measured_density"],
        "layer_densities": final["layer_densities"],
        "num_parameters": int(model.count_params()),
        "num_mask_updates": len(sparse.history) if isinstance(sparse, SparseCallback) else 0,
        "wall_time_s": wall,
        "machine": _machine(),
        "epochs": recorder.records,
    }
    stream.write(
        f"final test accuracy {final['test_acc']:.2f}% (loss {final['test_loss']:.4f}), density "
        f"{final['density']:.4f}, wall time {wall:.1f}s\n"
    )
    if folder is not None:
        # model, summary and run record appear together (sparsecore.job.rundir)
        files: dict[str, Callable[[Path], Any]] = {
            MODEL_NAME: model.save,
            SUMMARY_NAME: lambda path: path.write_text(json.dumps(summary, indent=2) + "\n"),
        }
        if isinstance(sparse, SparseCallback):
            # run record for `sparsecore report` (sparsecore.records.run_record)
            from sparsecore.records.run_record import TELEMETRY_NAME, record_from_run

            reports = [r.to_dict() for r in sparse.history]
            files[TELEMETRY_NAME] = record_from_run(summary, reports).save
        folder.commit(files)
        stream.write(f"results in {folder.path}\n")
    stream.flush()
    return summary
