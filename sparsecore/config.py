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
    are static. Momentum: ``adam_momentum`` (``exp_avg`` or the reference's ``normalized``
    exp_avg / (sqrt(exp_avg_sq) + eps)), ``momentum_beta`` for the library's own gradient EMA when
    the optimizer keeps no momentum; ``reset_optimizer_state`` zeroes optimizer state at positions
    whose mask changed. ``on_nonfinite``: ``raise`` (default) or ``skip`` an update that would
    read NaN/Inf. ``seed`` fixes initial masks, random growth and tie-breaking. Dead units
    (:mod:`sparsecore.units`): ``cover_units`` gives every output unit an initial weight where
    the budget allows; ``revive_dead_units`` regrows units without weights or gradient with
    non-zero weights. :meth:`from_options` also takes ``recipe`` (:data:`RECIPES`).
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
    adam_momentum: str = "exp_avg"
    momentum_beta: float = 0.9
    reset_optimizer_state: bool = False
    on_nonfinite: str = "raise"
    seed: int = 0
    cover_units: bool = True
    revive_dead_units: bool = True

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if (
            isinstance(self.density, bool)
            or not isinstance(self.density, (int, float))
            or not (0.0 < float(self.density) <= 1.0)
        ):
            raise SparseCoreError(f"density must lie in (0, 1], got {self.density!r}")
        _choice("init", self.init, INIT_METHODS)
        _choice("prune", self.prune, tuple(PRUNE))
        _choice("growth", self.growth, tuple(GROWTH))
        _choice("redistribution", self.redistribution, (*IMPORTANCE, "none"))
        _choice("prune_schedule", self.prune_schedule, PRUNE_SCHEDULES)
        _choice("adam_momentum", self.adam_momentum, ADAM_MOMENTUM)
        _choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        for name in ("prune_rate", "prune_rate_min"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SparseCoreError(f"{name} must lie in [0, 1], got {value!r}")
        if not 0.0 < self.max_density <= 1.0:
            raise SparseCoreError(f"max_density must lie in (0, 1], got {self.max_density!r}")
        if not 0.0 <= self.min_density <= self.max_density:
            raise SparseCoreError(
                f"min_density must lie in [0, max_density], got {self.min_density!r}"
            )
        if self.density > self.max_density:
            raise SparseCoreError(f"density {self.density} exceeds max_density {self.max_density}")
        if not 0.0 <= self.momentum_beta < 1.0:
            raise SparseCoreError(f"momentum_beta must lie in [0, 1), got {self.momentum_beta!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SparseCoreError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("cover_units", "revive_dead_units", "reset_optimizer_state"):
            if not isinstance(getattr(self, name), bool):
                raise SparseCoreError(f"{name} must be True or False, got {getattr(self, name)!r}")
        # update_every, stop_at and total_steps are validated by the schedule. A missing
        # total_steps for a decaying prune rate is reported when the first update needs it,
        # since adapters may learn the training length late (Keras knows it at fit time).
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
        """Read :meth:`to_dict` output. Options added since the state was saved take the value
        that reproduces the saved run (see :data:`_ADDED_OPTIONS`), not today's default."""
        return cls().replace(**{**_ADDED_OPTIONS, **data})


#: Options added after configs were first saved, with the value that behaves as before them.
_ADDED_OPTIONS: dict[str, Any] = {"cover_units": False, "revive_dead_units": False}


def option_names() -> list[str]:
    """Names of all options (``recipe`` included), for adapters that forward keyword arguments."""
    return [f.name for f in fields(SparseConfig)] + ["recipe"]


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SparseCoreError(f"{name} must be one of {list(allowed)}, got {value!r}")
