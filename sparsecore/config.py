"""Every option of sparse training, defined once for the core and all adapters.

``sparsecore.torch.attach(model, **options)`` and ``sparsecore.keras.SparseCallback(**options)``
take exactly these names with these meanings, plus ``recipe``: a named set of defaults
(:data:`RECIPES`). The library's defaults were chosen by measurement on real training scripts
(docs/results.md, "Defaults chosen on real clients"); ``recipe="paper"`` gives the sparse momentum
paper's choices, which were the defaults before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import SparseCoreError
from .init import INIT_METHODS
from .modes import GROWTH, IMPORTANCE, PRUNE
from .schedules import PRUNE_SCHEDULES, UpdateSchedule, prune_rate_at
from .validation import check_flag, check_integer, check_real, is_integer

ADAM_MOMENTUM = ("exp_avg", "normalized")
ON_NONFINITE = ("raise", "skip")

#: Named sets of defaults; options given explicitly win over the recipe's. ``"default"`` is the
#: library's defaults (the field defaults of :class:`SparseConfig`); ``"paper"`` is Dettmers &
#: Zettlemoyer's recipe: uniform initial densities, growth by momentum over the whole layer, and
#: dead units left as they are (weights always grown at 0).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        "init": "uniform",
        "prune": "magnitude",
        "growth": "momentum",
        "redistribution": "momentum",
        "cover_units": False,
        "revive_dead_units": False,
        "scale_init": False,
        "adam_momentum": "exp_avg",
    },
}


@dataclass(frozen=True)
class SparseConfig:
    """Options of sparse-momentum training.

    Masks: ``density`` (of all sparse layers together), ``init`` (``uniform``/``ER``/``ERK``),
    ``max_density`` (per-layer ceiling) and ``min_density`` (per-layer floor, keeps layers from
    emptying). Updates: ``prune`` (``magnitude``/``SET``), ``growth`` (``momentum``/``random``/
    ``gradient``/``momentum_neuron``), ``redistribution`` (``momentum``/``magnitude``/``nonzero``/
    ``none``), prune rate ``prune_rate`` decayed to ``prune_rate_min`` by ``prune_schedule``
    (``cosine``/``linear``/``constant``). When: every ``update_every`` optimizer steps and/or at
    epoch ends, until ``stop_at`` (a step, or a fraction of ``total_steps``); with neither, masks
    are static. Momentum: ``adam_momentum``, how an Adam-family optimizer's momentum is
    read: ``normalized`` (default; the reference implementation's exp_avg / (sqrt(exp_avg_sq) +
    eps), Adam's own step direction) or ``exp_avg``; other optimizers' momentum is read as it
    is. ``momentum_beta`` for the library's own gradient EMA when
    the optimizer keeps no momentum; ``reset_optimizer_state`` zeroes optimizer state at positions
    whose mask changed. ``on_nonfinite``: ``raise`` (default) or ``skip`` an update that would
    read NaN/Inf. ``seed`` fixes initial masks, random growth and tie-breaking. Dead units
    (:mod:`sparsecore.units`): ``cover_units`` gives every output unit an initial weight where
    the budget allows; ``revive_dead_units`` regrows units without weights or gradient with
    non-zero weights. ``scale_init`` multiplies each output unit's initial weights by
    ``sqrt(fan_in / active fan_in)`` when the masks are first applied, so that a sparse layer
    starts with its initialiser's dense output scale (:func:`sparsecore.init.init_scales`; set it
    False when attaching to trained weights). Structure (:mod:`sparsecore.structured`): ``ablate_below`` (0, off, by
    default; at most 1) empties, at every update, the output units whose active fan-in pruning
    left below that fraction of the layer's mean, and gives their weights to the rest, so that
    channel compaction removes them; every sparse layer but the last (the outputs). :meth:`from_options` also takes ``recipe`` (:data:`RECIPES`).
    """

    density: float = 0.05
    init: str = "ER"
    prune: str = "magnitude"
    growth: str = "momentum_neuron"
    redistribution: str = "momentum"
    prune_rate: float = 0.5
    prune_rate_min: float = 0.005
    prune_schedule: str = "cosine"
    update_every: int | None = 100
    update_at_epoch_end: bool = False
    stop_at: int | float | None = None
    total_steps: int | None = None
    max_density: float = 1.0
    min_density: float = 0.0
    adam_momentum: str = "normalized"
    momentum_beta: float = 0.9
    reset_optimizer_state: bool = False
    on_nonfinite: str = "raise"
    seed: int = 0
    cover_units: bool = True
    revive_dead_units: bool = True
    scale_init: bool = True
    ablate_below: float = 0.0

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        """Check every option (a bad one raises naming it, the value and the valid range) and
        store numbers as plain Python values (a NumPy float32 density becomes a float)."""
        values: dict[str, Any] = {
            "density": check_real("density", self.density, low=0.0, high=1.0, low_open=True),
            "prune_rate": check_real("prune_rate", self.prune_rate, low=0.0, high=1.0),
            "prune_rate_min": check_real("prune_rate_min", self.prune_rate_min, low=0.0, high=1.0),
            "max_density": check_real(
                "max_density", self.max_density, low=0.0, high=1.0, low_open=True
            ),
            "momentum_beta": check_real(
                "momentum_beta", self.momentum_beta, low=0.0, high=1.0, high_open=True
            ),
            "seed": check_integer("seed", self.seed, minimum=0),
            "update_at_epoch_end": check_flag("update_at_epoch_end", self.update_at_epoch_end),
            "reset_optimizer_state": check_flag(
                "reset_optimizer_state", self.reset_optimizer_state
            ),
            "cover_units": check_flag("cover_units", self.cover_units),
            "revive_dead_units": check_flag("revive_dead_units", self.revive_dead_units),
            "scale_init": check_flag("scale_init", self.scale_init),
            "ablate_below": check_real("ablate_below", self.ablate_below, low=0.0, high=1.0),
            "update_every": None
            if self.update_every is None
            else check_integer(
                "update_every", self.update_every, minimum=1, what="a positive integer or None"
            ),
            "total_steps": None
            if self.total_steps is None
            else check_integer(
                "total_steps", self.total_steps, minimum=1, what="a positive integer"
            ),
            "stop_at": _stop_at(self.stop_at),
        }
        values["min_density"] = check_real(
            f"min_density (at most max_density={values['max_density']:g})",
            self.min_density,
            low=0.0,
            high=values["max_density"],
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: the normalised value replaces the given
        _choice("init", self.init, INIT_METHODS)
        _choice("prune", self.prune, tuple(PRUNE))
        _choice("growth", self.growth, tuple(GROWTH))
        _choice("redistribution", self.redistribution, (*IMPORTANCE, "none"))
        _choice("prune_schedule", self.prune_schedule, PRUNE_SCHEDULES)
        _choice("adam_momentum", self.adam_momentum, ADAM_MOMENTUM)
        _choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        if self.density > self.max_density:
            raise SparseCoreError(f"density {self.density} exceeds max_density {self.max_density}")
        # A missing total_steps for a decaying prune rate is reported when the first update needs
        # it, since adapters may learn the training length late (Keras knows it at fit time).
        self.schedule()

    def schedule(self) -> UpdateSchedule:
        """The update timing these options describe."""
        return UpdateSchedule(
            every=self.update_every,
            at_epoch_end=self.update_at_epoch_end,
            stop_at=self.stop_at,
            total_steps=self.total_steps,
        )

    def prune_rate_at(self, step: int) -> float:
        """Prune rate for an update after optimizer step ``step``."""
        return prune_rate_at(
            step,
            self.total_steps,
            schedule=self.prune_schedule,
            initial=self.prune_rate,
            final=self.prune_rate_min,
        )

    def replace(self, **changes: Any) -> SparseConfig:
        """A copy with ``changes`` applied (validated)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise SparseCoreError(
                f"unknown option(s) {sorted(unknown)}; options are {option_names()}"
            )
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_options(cls, recipe: str = "default", **options: Any) -> SparseConfig:
        """The options of ``recipe`` (:data:`RECIPES`), overridden by those given explicitly."""
        if recipe not in RECIPES:
            raise SparseCoreError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise SparseCoreError(
                f"unknown option(s) {sorted(unknown)}; options are {option_names()}"
            )
        return cls(**{**RECIPES[recipe], **options})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseConfig:
        """The config :meth:`to_dict` gave; unknown keys and bad values raise naming them.
        Options added since the state was saved take the value that reproduces the saved run
        (see :data:`ADDED_OPTIONS`), not today's default."""
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise SparseCoreError(
                f"a SparseConfig is stored as a dict of options, got {type(data).__name__}"
            )
        return cls().replace(**{**ADDED_OPTIONS, **data})


#: Options added after configs were first saved, with the value that behaves as before them.
ADDED_OPTIONS: dict[str, Any] = {
    "cover_units": False,
    "revive_dead_units": False,
    "ablate_below": 0.0,
    "scale_init": False,
}
#: Options whose default changed since configs were first saved: a saved config always holds
#: them, so they need no entry above (``adam_momentum``: ``exp_avg`` before, ``normalized`` now).


def option_names() -> list[str]:
    """Names of all options (``recipe`` included), for adapters that forward keyword arguments."""
    return [f.name for f in fields(SparseConfig)] + ["recipe"]


def _stop_at(value: Any) -> int | float | None:
    """``stop_at``: None, a step (an integer >= 0) or a fraction of training (a float in (0, 1])."""
    if value is None:
        return None
    if is_integer(value):
        return check_integer("stop_at", value, minimum=0, what="a step >= 0 or a fraction")
    return check_real("stop_at as a fraction", value, low=0.0, high=1.0, low_open=True)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise SparseCoreError(f"{name} must be one of {list(allowed)}, got {value!r}")
