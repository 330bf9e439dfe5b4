"""The training recipe of ``sparsecore train``, shared by its PyTorch and Keras versions.

One definition of the options, their defaults (the sparse momentum paper's Fashion-MNIST recipe:
SGD with Nesterov momentum 0.9, learning rate divided by 10 at 50% and 75% of training, weight
decay 5e-4, batch 100, masks updated at every epoch end but the last) and their validation, so the
two jobs cannot drift apart. Framework-free.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from ..records.layer_table import plural

#: SparseConfig options per method; "dense" attaches nothing. "static" keeps its initial random
#: mask: with no update schedule (neither every-k-steps nor epoch ends) masks never change.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "sparse": {"prune": "magnitude", "growth": "momentum", "redistribution": "momentum"},
    "static": {"update_every": None, "update_at_epoch_end": False},
    "set": {"prune": "SET", "growth": "random", "redistribution": "none"},
}
METHODS = ("sparse", "dense", "static", "set")

#: Default initial learning rate per model (``sparsecore train`` uses it when --lr is not given):
#: the paper's 0.1, except LeNet-5, a plain ReLU stack without normalisation that stays at chance
#: at 0.1 on Fashion-MNIST (dense, 2 epochs: 10.00%, loss 2.30) and trains well at 0.01.
DEFAULT_LR: dict[str, float] = {
    "lenet300": 0.1,
    "lenet5": 0.01,
    "vgg": 0.1,
    "wrn": 0.1,
    "lstm-lm": 1.0,
    "gpt-mini": 0.1,
}

#: Other defaults per model (``sparsecore train`` uses them for options not given): the
#: character-level language models take batches of 32 windows of 64 characters (more optimizer
#: steps per epoch than 100 would give on a small text) and 10 epochs, about 5 minutes on two
#: cores over the embedded text.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "lstm-lm": {"batch_size": 32, "epochs": 10},
    "gpt-mini": {"batch_size": 32, "epochs": 10},
}


def model_defaults(model: str) -> dict[str, Any]:
    """The options ``sparsecore train`` sets for ``model`` when not given: its learning rate
    (:data:`DEFAULT_LR`) and its :data:`MODEL_DEFAULTS`."""
    return {"lr": DEFAULT_LR.get(model, 0.1), **MODEL_DEFAULTS.get(model, {})}


#: The models of each job (the Keras job builds the two LeNets only).
TORCH_MODELS = ("lenet300", "lenet5", "vgg", "wrn", "lstm-lm", "gpt-mini")
KERAS_MODELS = ("lenet300", "lenet5")

#: Normalisation constants of the full Fashion-MNIST training set (pixel / 255).
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530

#: The image size every model of the training jobs is built for (height, width).
IMAGE_SHAPE = (28, 28)

R = TypeVar("R", bound="Recipe")

# The type each numeric or boolean option must have; _OPTIONAL ones may also be None.
_TYPES = {
    **dict.fromkeys(
        ("epochs", "batch_size", "seed", "update_every", "limit_train", "limit_test",
         "eval_batch_size"),
        "int",
    ),
    **dict.fromkeys(
        ("density", "lr", "momentum", "weight_decay", "lr_decay_factor", "prune_rate",
         "max_density", "min_density", "stop_at", "ablate_below"),
        "real",
    ),
    **dict.fromkeys(("nesterov", "dense_first", "dense_last", "scale_init"), "flag"),
}  # fmt: skip
_OPTIONAL = ("update_every", "limit_train", "limit_test", "stop_at")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a training job: which epoch it stopped in, the last epoch saved, where.

    A ``KeyboardInterrupt``, so code that catches those catches it; ``sparsecore train`` prints
    :meth:`message` and exits with status 130.
    """

    def __init__(self, epoch: int, saved_epoch: int, out: Any, resumable: bool = True) -> None:
        super().__init__(epoch, saved_epoch, out)
        self.epoch, self.saved_epoch, self.out, self.resumable = epoch, saved_epoch, out, resumable

    def message(self) -> str:
        where = f"interrupted in epoch {self.epoch}"
        if not self.resumable:
            return f"{where}; this job writes its results when it ends, so nothing was saved"
        if self.out is None or self.saved_epoch == 0:
            return f"{where}; no checkpoint was written yet, so start the run again"
        if self.saved_epoch >= self.epoch:
            return (
                f"interrupted after epoch {self.epoch}, whose checkpoint is written; continue "
                f"with `sparsecore train --resume {self.out}`"
            )
        return (
            f"{where}; the last checkpoint is after epoch {self.saved_epoch}; continue with "
            f"`sparsecore train --resume {self.out}`"
        )


@dataclass
class Recipe:
    """Every choice that shapes the result of a run (saved with the run)."""

    model: str = "lenet300"
    method: str = "sparse"
    density: float = 0.05
    epochs: int = 20
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_decay_at: tuple[float, ...] = (0.5, 0.75)
    lr_decay_factor: float = 0.1
    seed: int = 0
    prune_rate: float = 0.5
    prune_schedule: str = "cosine"
    update_every: int | None = None
    init: str = "uniform"
    dense_first: bool = False
    dense_last: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    eval_batch_size: int = 1000
    # SparseConfig's mask options (same meaning as attach()'s / SparseCallback's keywords):
    # per-layer density ceiling and floor; redistribution and growth, when set, replace the
    # method's own choice (momentum for sparse, none/random for set); stop_at (a fraction of
    # training) freezes the masks from then on (None: no update in the last epoch only).
    max_density: float = 1.0
    min_density: float = 0.0
    redistribution: str | None = None
    growth: str | None = None
    stop_at: float | None = None
    # Dead units (SparseConfig's cover_units and revive_dead_units): off, as in the paper. The
    # job runs the paper's recipe whatever the library's defaults are (options given win).
    cover_units: bool = False
    revive_dead_units: bool = False
    # SparseConfig's scale_init (each unit's initial weights at the dense output scale): off, as
    # in the paper.
    scale_init: bool = False
    # Structure (SparseConfig's ablate_below): 0 is off, as in the paper.
    ablate_below: float = 0.0

    def check(self, models: Collection[str], framework: str = "") -> None:
        """Raise ValueError naming the option and value for anything out of range."""
        if self.model not in models:
            if framework:
                raise ValueError(
                    f"model {self.model!r} has no {framework} version; with --framework "
                    f"{framework.lower()} choose one of {', '.join(models)}"
                )
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(models)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        self._check_types()
        checks: list[tuple[str, Any, bool]] = [
            ("density", self.density, 0.0 < self.density <= 1.0),
            ("epochs", self.epochs, self.epochs >= 1),
            ("batch_size", self.batch_size, self.batch_size >= 1),
            ("lr", self.lr, self.lr > 0 and math.isfinite(self.lr)),
            ("momentum", self.momentum, 0.0 <= self.momentum < 1.0),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0),
            ("prune_rate", self.prune_rate, 0.0 <= self.prune_rate <= 1.0),
            (
                "update_every",
                self.update_every,
                self.update_every is None or self.update_every >= 1,
            ),
            ("limit_train", self.limit_train, self.limit_train is None or self.limit_train >= 1),
            ("limit_test", self.limit_test, self.limit_test is None or self.limit_test >= 1),
            ("eval_batch_size", self.eval_batch_size, self.eval_batch_size >= 1),
            ("lr_decay_at", self.lr_decay_at, all(0 < f < 1 for f in self.lr_decay_at)),
        ]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"invalid {name}: {value!r}")
        self._check_mask_options()

    def _check_types(self) -> None:
        """Integers, numbers and flags of the type they must be (a boolean is not a number, and
        2.5 epochs is not a number of epochs), so that the range checks compare numbers."""
        from ..validation import is_integer, is_real

        for f in fields(self):
            value = getattr(self, f.name)
            kind = _TYPES.get(f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            if kind == "int" and not is_integer(value):
                raise ValueError(f"invalid {f.name}: {value!r} (an integer)")
            if kind == "real" and not is_real(value):
                raise ValueError(f"invalid {f.name}: {value!r} (a number)")
            if kind == "flag" and not isinstance(value, bool):
                raise ValueError(f"invalid {f.name}: {value!r} (True or False)")
        if not isinstance(self.lr_decay_at, (tuple, list)) or not all(
            is_real(x) for x in self.lr_decay_at
        ):
            raise ValueError(f"invalid lr_decay_at: {self.lr_decay_at!r} (fractions of training)")

    def _check_mask_options(self) -> None:
        from ..modes import GROWTH, IMPORTANCE

        if not 0.0 < self.max_density <= 1.0:
            raise ValueError(f"invalid max_density: {self.max_density!r} (must lie in (0, 1])")
        if not 0.0 <= self.min_density <= self.max_density:
            raise ValueError(
                f"invalid min_density: {self.min_density!r} (must lie in [0, max_density "
                f"{self.max_density!r}])"
            )
        if self.method != "dense" and self.density > self.max_density:
            raise ValueError(
                f"invalid max_density: {self.max_density!r} is below density {self.density!r}"
            )
        redistributions = (*IMPORTANCE, "none")
        if self.redistribution is not None and self.redistribution not in redistributions:
            raise ValueError(
                f"invalid redistribution: {self.redistribution!r}; choose one of "
                f"{', '.join(redistributions)}"
            )
        if self.growth is not None and self.growth not in GROWTH:
            raise ValueError(f"invalid growth: {self.growth!r}; choose one of {', '.join(GROWTH)}")
        if not 0.0 <= self.ablate_below <= 1.0:
            raise ValueError(
                f"invalid ablate_below: {self.ablate_below!r} (a fraction in [0, 1]; 0 is off)"
            )
        if self.stop_at is not None and not 0.0 < self.stop_at <= 1.0:
            raise ValueError(f"invalid stop_at: {self.stop_at!r} (a fraction in (0, 1])")

    def headline(self, framework: str = "") -> str:
        """The first line a run prints: model, method, density, epochs and seed."""
        where = f" ({framework})" if framework else ""
        return (
            f"sparsecore train{where}: {self.model}, method {self.method}"
            + (f", density {self.density:g}" if self.method != "dense" else "")
            + f", {plural(self.epochs, 'epoch')}, seed {self.seed}"
        )

    def caveats(self) -> list[str]:
        """Valid choices that are probably not what was meant (the job warns about them)."""
        out = []
        if self.method != "dense" and self.density >= 1.0:
            out.append(
                f"density {self.density:g} with method {self.method} keeps every weight: the run "
                f"trains dense and its mask updates change nothing; pass --method dense to say "
                f"so, or a density below 1"
            )
        return out

    def sparse_options(
        self, total_steps: int, run_steps: int | None = None
    ) -> dict[str, Any] | None:
        """The SparseConfig keywords of this run (None for ``dense``), the same for both jobs.

        Masks are updated at every epoch end (or every ``update_every`` steps) but not in the
        last epoch, as in the paper, nor from ``stop_at`` on; ``static`` never updates.
        ``total_steps`` is the length the prune-rate schedule spans; ``run_steps`` (default:
        the same) the steps the run takes, longer for a run extended beyond its schedule
        (``sparsecore train --resume DIR --epochs N``): the masks are then updated until the
        new last epoch, at the schedule's final prune rate.
        """
        run = total_steps if run_steps is None else run_steps
        if self.method == "dense":
            return None
        options: dict[str, Any] = {
            "recipe": "paper",
            "update_every": None,
            "update_at_epoch_end": True,
            **METHOD_OPTIONS[self.method],
            "density": self.density,
            "prune_rate": self.prune_rate,
            "prune_schedule": self.prune_schedule,
            "init": self.init,
            "seed": self.seed,
            "total_steps": total_steps,
            "dense_first": self.dense_first,
            "dense_last": self.dense_last,
            "max_density": self.max_density,
            "min_density": self.min_density,
            "cover_units": self.cover_units,
            "revive_dead_units": self.revive_dead_units,
            "scale_init": self.scale_init,
            "ablate_below": self.ablate_below,
        }
        if self.redistribution is not None:
            options["redistribution"] = self.redistribution
        if self.growth is not None:
            options["growth"] = self.growth
        stop_step = run - run // self.epochs  # the last epoch's first step
        if self.stop_at is not None:
            stop_step = min(stop_step, math.floor(self.stop_at * total_steps))
        if self.method == "static":
            pass
        elif self.update_every is None:
            if self.stop_at is not None:
                options["stop_at"] = stop_step
            elif run != total_steps:  # updates go on past the schedule's end, to the run's
                options["stop_at"] = run
        else:
            options.update(
                update_every=self.update_every, update_at_epoch_end=False, stop_at=stop_step
            )
        return options

    def check_images(self, image_shape: tuple[int, int], where: str) -> None:
        """Raise ValueError unless the images are the 28x28 ones every model here is built for.

        ``where`` names the file (or source) the images came from, for the message.
        """
        if tuple(image_shape) != IMAGE_SHAPE:
            raise ValueError(
                f"{where}: images are {image_shape[0]}x{image_shape[1]} pixels; model "
                f"{self.model} takes {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} Fashion-MNIST images"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_decay_at"] = list(self.lr_decay_at)
        return d

    @classmethod
    def from_dict(cls: type[R], d: dict[str, Any]) -> R:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}")
        d = dict(d)
        if "lr_decay_at" in d:
            d["lr_decay_at"] = tuple(d["lr_decay_at"])
        return cls(**d)
