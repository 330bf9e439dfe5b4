"""The training job behind ``sparsecore train``: one model, one dataset, one method, one seed.

The recipe follows the sparse momentum paper's MNIST/Fashion-MNIST setup: SGD with Nesterov
momentum 0.9, learning rate 0.1 divided by 10 at 50% and 75% of training, weight decay 5e-4,
batch 100, masks updated at the end of every epoch except the last (an update after the last
epoch would leave freshly grown weights at zero, untrained).

Everything the run needs to continue is in its checkpoint (model, optimizer, scheduler, sparse
state, RNG states, metrics so far, epoch), and each epoch's shuffle is drawn from a generator
seeded by (seed, epoch), so a run resumed from epoch e ends with the same weights, bit for bit,
as one that was never interrupted.

The language models (``--model lstm-lm | gpt-mini``) run the same loop on windows of text
(:mod:`sparsecore.torch.lm_job`): the loss is per character, the held-out split is the last 10%
of the text (reported as validation, with bits per character), and the run record has no FLOP
section (FLOPs are counted for the image models' linear and convolution layers only).

Under ``torchrun`` the same loop runs data-parallel (DDP over gloo, :mod:`sparsecore.torch.ddp_job`):
each rank trains on its share of every global batch, and rank 0 prints and writes.
"""

from __future__ import annotations

import contextlib
import functools
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
from typing import Any, TextIO, cast

import numpy as np
import torch
from torch import nn

from sparsecore.job.datasets import (
    ImageDataset,
    load_embedded_fashion_mnist,
    load_fashion_mnist,
)
from sparsecore.job.recipe import (
    DEFAULT_LR,
    FMNIST_MEAN,
    FMNIST_STD,
    METHOD_OPTIONS,
    METHODS,
    Recipe,
    TrainingInterrupted,
)
from sparsecore.job.rundir import RunFolder
from sparsecore.job.text import TextDataset

from . import ddp_job, lm_job
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    read_checkpoint,
    rng_state,
    set_rng_state,
)
from .models import build_model

__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "METHOD_OPTIONS",
    "CheckpointError",
    "ResumeError",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "load_checkpoint_config",
    "run_training",
    "weight_densities",
]

CHECKPOINT_NAME = "checkpoint.pt"
SUMMARY_NAME = "summary.json"
MASK_UPDATES_NAME = "mask_updates.json"
TELEMETRY_NAME = (
    "telemetry.json"  # sparsecore.records.run_record's name for it (checked by the tests)
)


class ResumeError(ValueError):
    """A checkpoint that cannot continue as asked: other options or other data than it had."""


@dataclass
class TrainConfig(Recipe):
    """The PyTorch job's options: the shared recipe (mask options included)."""

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
    """Measured fraction of nonzero entries of every linear/conv weight (and recurrent and
    attention projection weight), by parameter name.

    Counted on the weights themselves, so it checks what the adapter claims.
    """
    out: dict[str, float] = {}
    names = {id(p): n for n, p in model.named_parameters()}  # a tied weight: its first name
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            weights = [("weight", module.weight)]
        elif isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
            weights = [
                (n, p)
                for n, p in module.named_parameters(recurse=False)
                if p is not None and p.ndim >= 2
            ]
        else:
            continue
        for _, param in weights:
            if id(param) in names:  # trainable or not, but a parameter of the model
                w = param.detach()
                out.setdefault(names[id(param)], float((w != 0).sum().item() / w.numel()))
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
    """(mean cross-entropy loss, accuracy in %) of ``model`` on (x, y); for sequences (logits
    ``(n, t, classes)``), per position."""
    loss_sum, correct = _evaluation_sums(model, x, y, batch_size)
    n = x.shape[0]
    return loss_sum / n, 100.0 * correct / n


@torch.no_grad()
def _evaluation_sums(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """(summed loss, summed correct predictions) of ``model`` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    correct = 0.0
    for idx in _batches(x.shape[0], batch_size, None):
        logits = model(x[idx])
        loss_sum += lm_job.loss_sum(logits, y[idx]).item()
        correct += lm_job.correct_sum(logits, y[idx])
    model.train(was_training)
    return loss_sum, correct


def _evaluate_ranked(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, ranks: ddp_job.Ranks
) -> tuple[float, float]:
    """:func:`evaluate` over the ranks: each its share, the sums all-reduced (same on all)."""
    ranks.sync_buffers(model)
    part = ranks.held_out_share(x.shape[0])
    loss_sum, correct = ranks.sum(list(_evaluation_sums(model, x[part], y[part], batch_size)))
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


def _attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    schedule_steps: int,
    run_steps: int,
):
    from . import attach  # the adapter; imported here so dense runs never need it

    options = cfg.sparse_options(schedule_steps, run_steps=run_steps)
    assert options is not None  # dense runs attach nothing
    include = lm_job.job_include(cfg.model)
    if include:
        options["include"] = include
    return attach(model, optimizer, **options)


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
    path.write_text(json.dumps(data, indent=2) + "\n")


def load_checkpoint_config(path: str | os.PathLike[str]) -> tuple[TrainConfig, Path]:
    """The config saved in a checkpoint (a file, or a run folder), read without running code."""
    ckpt_path = _checkpoint_path(path)
    return _saved_config(ckpt_path, read_checkpoint(ckpt_path)), ckpt_path


def _saved_config(path: Path, ckpt: dict[str, Any]) -> TrainConfig:
    try:
        saved = TrainConfig.from_dict(ckpt["config"])
        saved.validate()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: field 'config' is not a valid run config ({err})") from None
    return saved


def _checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """The checkpoint of a run folder (the link to its current state's), or ``path`` itself."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}")
    return p


def run_folder_of(ckpt_path: Path) -> Path:
    """The run folder a checkpoint belongs to (a state folder's parent, for a resolved path)."""
    parent = ckpt_path.parent
    if parent.name.startswith("state-") and (parent.parent / "current").is_symlink():
        return parent.parent
    return parent


def _check_same_run(path: Path, saved: TrainConfig, cfg: TrainConfig) -> None:
    """A resume keeps every option of the run; only ``epochs`` may grow (extending it)."""
    lines = []
    for key, old in asdict(saved).items():
        new = getattr(cfg, key)
        if key == "epochs" and new < old:
            lines.append(
                f"  epochs: {old} (checkpoint) -> {new} (given): a run can be extended, not shortened"
            )
        elif key != "epochs" and new != old:
            lines.append(f"  {key}: {old!r} (checkpoint) -> {new!r} (given)")
    if lines:
        raise ResumeError(
            f"{path}: the options given differ from the checkpoint's (a resumed run keeps its "
            f"options; only --epochs may grow, to extend it):\n" + "\n".join(lines)
        )


def _data_source(dataset: ImageDataset) -> str:
    """How to find ``dataset`` again: ``embedded``, or the absolute folder it was read from."""
    if dataset.source.startswith("embedded:"):
        return "embedded"
    folder = Path(dataset.source)
    return str(folder.resolve()) if folder.is_dir() else dataset.source


def _load_data(
    data: str | None, ckpt: dict[str, Any] | None, path: Path | None, model: str = "lenet300"
) -> Any:
    """``--data`` if given; on a resume without it, the data the checkpoint records."""
    if lm_job.is_language_model(model):
        if data is None and ckpt is not None and ckpt.get("data") is None:
            raise ResumeError(f"{path}: the checkpoint does not record its text; pass --data")
        if data is None and ckpt is not None:
            try:
                return lm_job.load_lm_data(None, ckpt["data"])
            except FileNotFoundError as err:
                raise ResumeError(f"{path}: {err}") from None
        return lm_job.load_lm_data(data, None)
    if data is None and ckpt is not None:
        record = ckpt.get("data")
        if record is None:
            raise ResumeError(
                f"{path}: the checkpoint does not record its data (it was written by an earlier "
                f"sparsecore); pass --data (the folder, or 'embedded') it was trained on"
            )
        data = str(record.get("source"))
        if data != "embedded" and not Path(data).is_dir():
            raise ResumeError(
                f"{path}: the checkpoint's data folder {data} is not there any more; pass "
                f"--data with the folder that now holds those files"
            )
    if data == "embedded":
        return load_embedded_fashion_mnist()
    return load_fashion_mnist(data)


def _check_same_data(path: Path, ckpt: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """The data of a resumed run must be the checkpoint's (its fingerprint), whatever folder
    they are read from now."""
    record = ckpt.get("data")
    if record is None:
        return  # an older checkpoint: --data was required and is trusted
    saved = record.get("fingerprint")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: field 'data' holds no fingerprint of the data")
    lines = [
        f"  data {key}: {saved.get(key)!r} (checkpoint) -> {fingerprint.get(key)!r} (now)"
        for key in dict.fromkeys([*saved, *fingerprint])
        if saved.get(key) != fingerprint.get(key)
    ]
    if lines:
        raise ResumeError(
            f"{path}: the data differ from the checkpoint's (a resumed run must see the same "
            f"images; the checkpoint's came from {record.get('source')}):\n" + "\n".join(lines)
        )


def _restore(
    path: Path,
    ckpt: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sparse: Any,
    steps_per_epoch: int,
) -> None:
    """Load a checked checkpoint into fresh objects; a part that does not fit raises
    :class:`CheckpointError` naming it (the run has not started: nothing is lost)."""
    parts = [
        ("model", model.load_state_dict),
        ("optimizer", optimizer.load_state_dict),
        ("scheduler", scheduler.load_state_dict),
    ]
    if sparse is not None:
        if ckpt["sparse"] is None:
            raise CheckpointError(f"{path}: field 'sparse' is empty, but this run is sparse")
        parts.append(("sparse", sparse.load_state_dict))
    elif ckpt["sparse"] is not None:
        raise CheckpointError(f"{path}: field 'sparse' holds a sparse state, this run is dense")
    for key, load in parts:
        try:
            load(ckpt[key])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{path}: field {key!r} does not fit this run ({detail})"
            ) from None
    set_rng_state(ckpt["rng"], path)
    if len(ckpt["metrics"]) != ckpt["epoch"]:
        raise CheckpointError(
            f"{path}: field 'metrics' holds {len(ckpt['metrics'])} epochs, the checkpoint is "
            f"after epoch {ckpt['epoch']}"
        )
    if sparse is not None and sparse.steps != ckpt["epoch"] * steps_per_epoch:
        raise ResumeError(
            f"{path}: the checkpoint took {sparse.steps} steps in {ckpt['epoch']} epochs, but "
            f"these data and batch size give {steps_per_epoch} steps per epoch"
        )


def run_training(
    cfg: TrainConfig,
    *,
    data: str | None = None,
    dataset: ImageDataset | TextDataset | None = None,
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

    ``data``: a folder of Fashion-MNIST IDX files, ``"embedded"`` for the shipped subset, or None
    (the default search; on a resume, the data the checkpoint records); ``dataset`` an
    :class:`ImageDataset` instead. ``out_dir`` is written as a run folder that always holds one
    epoch's files (:mod:`sparsecore.job.rundir`).
    ``resume`` continues a run from its checkpoint: ``cfg`` must equal the checkpoint's config
    except for a larger ``epochs``, which extends the run, and the data must be the checkpoint's
    (same fingerprint); otherwise :class:`ResumeError` lists each difference. Ctrl-C raises
    :class:`TrainingInterrupted` saying what was saved.
    ``progress`` defaults to a live indicator only when ``stream`` is a terminal.
    ``stop_after`` ends the process after that epoch (checkpoint written) without changing the
    schedule, so the run can be resumed later, e.g. to fit a time-limited job.
    ``tensorboard`` names a folder for TensorBoard scalars of the run, written when it ends.
    ``announce=False`` leaves out the first line (model, method, ...) and the warnings about the
    options, for a caller that printed them already (``sparsecore train`` does, before it loads
    PyTorch).

    Under ``torchrun`` (``WORLD_SIZE`` > 1), or in a process group of several ranks that the
    caller initialised (gloo), the run is data-parallel (:mod:`sparsecore.torch.ddp_job`): every
    rank calls this with the same arguments, each trains on its share of every global batch of
    ``cfg.batch_size``, and only rank 0 prints and writes ``out_dir`` and ``tensorboard``.
    """
    cfg.validate()
    ranks = ddp_job.join()  # None on one process
    with contextlib.ExitStack() as quiet:
        if ranks is not None and not ranks.main:  # rank 0 shows the warnings for all
            quiet.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
        result = _run_training(
            cfg,
            ranks,
            data=data,
            dataset=dataset,
            out_dir=out_dir,
            resume=resume,
            threads=threads,
            stream=stream,
            progress=progress,
            stop_after=stop_after,
            on_epoch_end=on_epoch_end,
            tensorboard=tensorboard,
            announce=announce,
        )
    if ranks is not None:
        ranks.barrier()  # no rank returns before rank 0 has written the run folder
    return result


class _Discard:
    """The stream of the ranks other than 0: what they would print is rank 0's."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _run_training(
    cfg: TrainConfig,
    ranks: ddp_job.Ranks | None,
    *,
    data: str | None,
    dataset: ImageDataset | TextDataset | None,
    out_dir: str | os.PathLike[str] | None,
    resume: str | os.PathLike[str] | None,
    threads: int | None,
    stream: TextIO | None,
    progress: bool | None,
    stop_after: int | None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
    tensorboard: str | os.PathLike[str] | None,
    announce: bool,
) -> TrainResult:
    """:func:`run_training` on one process (``ranks`` None) or on this rank of several."""
    stream = stream if stream is not None else sys.stdout
    if ranks is not None and not ranks.main:
        stream = cast(TextIO, _Discard())
        announce = progress = False
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
        from sparsecore.records.tensorboard import require_tensorboard

        require_tensorboard()

    ckpt: dict[str, Any] | None = None
    ckpt_path: Path | None = None
    schedule_epochs = cfg.epochs
    if resume is not None:
        ckpt_path = _checkpoint_path(resume)
        ckpt = read_checkpoint(ckpt_path)
        saved = _saved_config(ckpt_path, ckpt)
        _check_same_run(ckpt_path, saved, cfg)
        schedule_epochs = int(ckpt.get("schedule_epochs", saved.epochs))
        if out_dir is None:
            out_dir = run_folder_of(ckpt_path)
    writes = ranks is None or ranks.main  # only rank 0 writes the run folder
    # checks it before any work
    folder = RunFolder(out_dir) if out_dir is not None and writes else None

    language_model = lm_job.is_language_model(cfg.model)
    if dataset is None:
        dataset = _load_data(data, ckpt, ckpt_path, cfg.model)
    fingerprint = dataset.fingerprint
    if ckpt is not None:
        assert ckpt_path is not None
        _check_same_data(ckpt_path, ckpt, fingerprint)
    if isinstance(dataset, TextDataset):
        if not language_model:
            raise ValueError(f"model {cfg.model} trains on images, not on a text")
        source = lm_job.data_source(dataset)
        x_train, y_train, x_test, y_test = lm_job.lm_tensors(
            dataset, cfg.limit_train, cfg.limit_test
        )
    else:
        if language_model:
            raise ValueError(f"model {cfg.model} is a language model: its data is a text")
        source = _data_source(dataset)
        cfg.check_images(dataset.image_shape, dataset.file_of("train_images"))
        if cfg.limit_train is not None or cfg.limit_test is not None:
            dataset = dataset.subset(cfg.limit_train, cfg.limit_test)
        x_train, y_train = _to_tensors(dataset.train_images, dataset.train_labels)
        x_test, y_test = _to_tensors(dataset.test_images, dataset.test_labels)

    out = folder.path if folder is not None else None
    if ranks is not None:
        ranks.barrier()  # every rank has read the checkpoint before rank 0 tidies the folder
    if folder is not None:
        folder.tidy()  # what an interrupted commit left

    _seed_everything(cfg.seed)
    model = build_model(cfg.model, num_classes=dataset.num_classes)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )
    # The learning rate and the prune rate follow the schedule of the run as first started
    # (schedule_epochs); a run extended beyond it goes on at their final values.
    milestones = sorted({max(1, round(f * schedule_epochs)) for f in cfg.lr_decay_at})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=milestones, gamma=cfg.lr_decay_factor
    )
    steps_per_epoch = math.ceil(x_train.shape[0] / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    sparse = (
        None
        if cfg.method == "dense"
        else _attach(model, optimizer, cfg, steps_per_epoch * schedule_epochs, total_steps)
    )

    epochs_done: list[dict[str, Any]] = []
    mask_updates: list[dict[str, Any]] = []
    elapsed_before = 0.0
    start_epoch = 1
    if ckpt is not None:
        assert ckpt_path is not None
        engine_state = (ckpt["sparse"] or {}).get("engine")
        if sparse is not None and isinstance(engine_state, dict) and cfg.epochs != saved.epochs:
            # extending: the saved masks, counters and history, with this run's update schedule
            engine_state["config"] = sparse.config.to_dict()
        _restore(ckpt_path, ckpt, model, optimizer, scheduler, sparse, steps_per_epoch)
        epochs_done = list(ckpt["metrics"])
        mask_updates = list(ckpt["mask_updates"])
        elapsed_before = float(ckpt["wall_time_s"])
        start_epoch = int(ckpt["epoch"]) + 1
        if sparse is not None and start_epoch - 1 == saved.epochs < cfg.epochs:
            # Extending a finished run: its last epoch had no epoch-end mask update (the
            # paper's rule for the last epoch); now that it is not the last, it gets one.
            seen = len(sparse.history)
            sparse.end_epoch()
            mask_updates.extend(
                {"epoch": start_epoch - 1, **_report_dict(r)} for r in sparse.history[seen:]
            )
    history_seen = len(sparse.history) if sparse is not None else 0
    # Several ranks: DDP trains the model; attach, evaluation and checkpoints use it unwrapped.
    net = ranks.wrap(model) if ranks is not None else model

    data_info = {**dataset.describe(), "fingerprint": fingerprint}
    held_out, unit = ("validation", "characters") if language_model else ("test", "images")
    stream.write(
        f"dataset: {data_info['name']} from {data_info['source']} "
        f"({data_info['train_size']} train / {data_info['test_size']} {held_out} {unit})\n"
    )
    if ranks is not None:
        stream.write(ranks.describe(cfg.batch_size, torch.get_num_threads()) + "\n")
    if start_epoch > 1:
        stream.write(f"resumed after epoch {start_epoch - 1}\n")
    if schedule_epochs != cfg.epochs:
        stream.write(
            f"extended from {schedule_epochs} to {cfg.epochs} epochs: after epoch "
            f"{schedule_epochs} the learning rate and the prune rate stay at their final values\n"
        )
    stream.flush()

    bar = _Progress(stream, progress)
    t_start = time.perf_counter()
    model.train()
    saved_epoch = start_epoch - 1
    epoch = start_epoch
    summary: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            gen = _epoch_generator(cfg.seed, epoch)
            loss_sum = 0.0
            correct = 0.0
            seen = 0
            for step, idx in enumerate(_batches(x_train.shape[0], cfg.batch_size, gen), start=1):
                if ranks is not None:  # this rank's share; the sums are the global batch's
                    optimizer.zero_grad(set_to_none=True)
                    loss, batch_loss, batch_correct = ranks.train_batch(net, x_train, y_train, idx)
                    if not math.isfinite(batch_loss):  # the same decision on every rank
                        raise FloatingPointError(
                            f"training loss became {batch_loss / idx.numel()} at epoch {epoch}, "
                            f"batch {step} (lr {lr:g}); lower --lr"
                        )
                    loss.backward()  # DDP averages the gradients over the ranks
                    if language_model:
                        nn.utils.clip_grad_norm_(model.parameters(), lm_job.CLIP_NORM)
                    optimizer.step()
                    loss_sum += batch_loss
                    correct += batch_correct
                    seen += idx.numel()
                    bar.update(epoch, cfg.epochs, step, steps_per_epoch, loss_sum / seen)
                    continue
                xb, yb = x_train[idx], y_train[idx]
                optimizer.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = lm_job.mean_loss(logits, yb)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss became {loss.item()} at epoch {epoch}, batch {step} "
                        f"(lr {lr:g}); lower --lr"
                    )
                loss.backward()
                if language_model:
                    nn.utils.clip_grad_norm_(model.parameters(), lm_job.CLIP_NORM)
                optimizer.step()  # the adapter re-applies masks and updates them on schedule here
                loss_sum += loss.item() * yb.shape[0]
                correct += lm_job.correct_sum(logits.detach(), yb)
                seen += yb.shape[0]
                bar.update(epoch, cfg.epochs, step, steps_per_epoch, loss_sum / seen)
            bar.clear()
            scheduler.step()

            if ranks is None:
                test_loss, test_acc = evaluate(model, x_test, y_test, cfg.eval_batch_size)
            else:
                test_loss, test_acc = _evaluate_ranked(
                    model, x_test, y_test, cfg.eval_batch_size, ranks
                )
            if not math.isfinite(test_loss):  # the weights diverged though the batches did not
                raise FloatingPointError(
                    f"test loss became {test_loss} after epoch {epoch} (lr {lr:g}); lower --lr"
                )
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
            if language_model:
                record["test_bpc"] = lm_job.bits_per_char(test_loss)
            epochs_done.append(record)
            layers_txt = " ".join(
                f"{k.removesuffix('.weight')}={v:.3f}" for k, v in layer_dens.items()
            )
            held = (
                f"valid loss {test_loss:.4f} bpc {record['test_bpc']:.4f} acc {test_acc:.2f}%"
                if language_model
                else f"test loss {test_loss:.4f} acc {test_acc:.2f}%"
            )
            stream.write(
                f"epoch {epoch:>{len(str(cfg.epochs))}}/{cfg.epochs}  lr {lr:.4g}  "
                f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}%  "
                f"{held}  density {overall:.4f} [{layers_txt}]  {record['epoch_time_s']:.1f}s\n"
            )
            stream.flush()

            summary = _summary(
                cfg,
                data_info,
                epochs_done,
                model,
                len(mask_updates),
                wall,
                done=epoch == cfg.epochs,
                schedule_epochs=schedule_epochs,
                ranks=ranks,
            )
            if folder is not None:
                checkpoint = {
                    "format": CHECKPOINT_FORMAT,
                    "config": cfg.to_dict(),
                    "schedule_epochs": schedule_epochs,
                    "data": {"source": source, "fingerprint": fingerprint},
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "sparse": sparse.state_dict() if sparse is not None else None,
                    "rng": rng_state(),
                    "metrics": epochs_done,
                    "mask_updates": mask_updates,
                    "wall_time_s": wall,
                }
                folder.commit(
                    {
                        CHECKPOINT_NAME: functools.partial(torch.save, checkpoint),
                        SUMMARY_NAME: functools.partial(_write_json, data=summary),
                        MASK_UPDATES_NAME: functools.partial(_write_json, data=mask_updates),
                        TELEMETRY_NAME: functools.partial(
                            _write_telemetry,
                            summary=summary,
                            mask_updates=mask_updates,
                            model=model,
                            example=x_train[: cfg.batch_size],
                            sparse=None if language_model else sparse,
                        ),
                    },
                    tag=epoch,
                )
                saved_epoch = epoch
            if on_epoch_end is not None:
                on_epoch_end(record)
            if stop_after is not None and epoch >= stop_after and epoch < cfg.epochs:
                stream.write(f"stopped after epoch {epoch} as asked; resume with --resume\n")
                break
    except KeyboardInterrupt:
        bar.clear()
        if folder is not None and folder.committed == epoch:
            saved_epoch = epoch  # stopped after the commit point of this epoch's state
        raise TrainingInterrupted(epoch, saved_epoch, out) from None

    if tensorboard is not None and epochs_done and writes:
        from sparsecore.records.run_record import record_from_run
        from sparsecore.records.tensorboard import write_tensorboard

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
        schedule_epochs=schedule_epochs,
        ranks=ranks,
    )
    if final:
        label = "final" if summary["completed"] else f"after epoch {final['epoch']}:"
        metric = (
            f"validation bits per character {final['test_bpc']:.4f} "
            f"(loss {final['test_loss']:.4f}, accuracy {final['test_acc']:.2f}%)"
            if language_model
            else f"test accuracy {final['test_acc']:.2f}% (loss {final['test_loss']:.4f})"
        )
        stream.write(
            f"{label} {metric}, "
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
    schedule_epochs: int,
    ranks: ddp_job.Ranks | None = None,
) -> dict[str, Any]:
    final = epochs[-1] if epochs else {}
    # a data-parallel run says so; a single-process summary has no such key
    distributed = (
        {"distributed": {"ranks": ranks.world, "backend": "gloo", "wrapper": "ddp"}}
        if ranks is not None
        else {}
    )
    params = dict(model.named_parameters())
    sparse_names = list(final.get("layer_densities", {}))
    return _json_ready(
        {
            "dataset": data_info,
            "model": cfg.model,
            "method": cfg.method,
            "config": cfg.to_dict(),
            "schedule_epochs": schedule_epochs,
            "completed": done and bool(epochs) and final.get("epoch") == cfg.epochs,
            "epochs_completed": final.get("epoch", 0),
            "final_test_acc": final.get("test_acc"),
            "final_test_loss": final.get("test_loss"),
            **({"final_test_bpc": final["test_bpc"]} if "test_bpc" in final else {}),
            "final_density": final.get("density"),
            "final_measured_density": final.get("measured_density"),
            "layer_densities": final.get("layer_densities", {}),
            "measured_layer_densities": weight_densities(model),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "num_sparse_parameters": sum(params[n].numel() for n in sparse_names if n in params),
            "num_mask_updates": n_updates,
            "wall_time_s": wall,
            "machine": _machine(),
            **distributed,
            "sparsecore_version": _version(),
            "epochs": epochs,
        }
    )


# -- run record for `sparsecore report` (sparsecore.records) -----------------------------------
def _write_telemetry(
    path: Path,
    summary: dict[str, Any],
    mask_updates: list[dict[str, Any]],
    model: nn.Module,
    example: torch.Tensor,
    sparse: Any,
) -> None:
    """Write telemetry.json at ``path``: mask updates, epochs and, for sparse runs, per-layer
    FLOPs."""
    from sparsecore.records.run_record import flops_section, record_from_run

    from .flops import count_flops

    flops = None
    if sparse is not None:
        masks = {name: sparse.mask(name) for name in sparse.names}
        flops = flops_section(count_flops(model, example, masks), batch=int(example.shape[0]))
    record_from_run(summary, mask_updates, flops=flops).save(path)


def _version() -> str:
    from sparsecore import __version__

    return __version__
