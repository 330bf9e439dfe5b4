"""Prune-rate schedules and the logic deciding when masks are updated."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SparseCoreError

PRUNE_SCHEDULES = ("cosine", "linear", "constant")


def prune_rate_at(
    step: int,
    total_steps: int | None,
    *,
    schedule: str = "cosine",
    initial: float = 0.5,
    final: float = 0.005,
) -> float:
    """Prune rate of an update made after ``step`` of ``total_steps`` training steps.

    ``cosine``: ``final + (initial - final) * (1 + cos(pi * t / T)) / 2`` (the paper's schedule);
    ``linear``: from ``initial`` at t = 0 to ``final`` at t = T; ``constant``: ``initial``.
    ``t`` is clipped to ``[0, T]``.
    """
    if schedule not in PRUNE_SCHEDULES:
        raise SparseCoreError(
            f"unknown prune schedule {schedule!r}; choose one of {list(PRUNE_SCHEDULES)}"
        )
    for label, value in (("prune_rate", initial), ("prune_rate_min", final)):
        if not 0.0 <= value <= 1.0:
            raise SparseCoreError(f"{label} must lie in [0, 1], got {value!r}")
    if schedule == "constant":
        return float(initial)
    if total_steps is None or total_steps <= 0:
        raise SparseCoreError(
            f"the {schedule!r} prune schedule needs the training length: pass total_steps "
            f"(optimizer steps in the whole run), got {total_steps!r}; or use "
            f"prune_schedule='constant'"
        )
    frac = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "cosine":
        return final + (initial - final) * (1.0 + math.cos(math.pi * frac)) / 2.0
    return initial + (final - initial) * frac


@dataclass(frozen=True)
class UpdateSchedule:
    """When masks are updated.

    ``every``: after every ``every``-th optimizer step (None: never by step count).
    ``at_epoch_end``: also at each epoch end. ``stop_at``: no update at or after this point; an
    ``int`` is a step, a ``float`` in (0, 1] a fraction of ``total_steps``. By default updates stop
    at ``total_steps`` when it is known (no update after the last step). With neither ``every`` nor
    ``at_epoch_end`` the masks never change: static sparse training.
    """

    every: int | None = 100
    at_epoch_end: bool = False
    stop_at: int | float | None = None
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if self.every is not None and (not isinstance(self.every, int) or self.every <= 0):
            raise SparseCoreError(
                f"update_every must be a positive integer or None, got {self.every!r}"
            )
        if self.total_steps is not None and (
            not isinstance(self.total_steps, int) or self.total_steps <= 0
        ):
            raise SparseCoreError(
                f"total_steps must be a positive integer, got {self.total_steps!r}"
            )
        if isinstance(self.stop_at, float):
            if not 0.0 < self.stop_at <= 1.0:
                raise SparseCoreError(
                    f"stop_at as a fraction must lie in (0, 1], got {self.stop_at!r}"
                )
            if self.total_steps is None:
                raise SparseCoreError(
                    f"stop_at={self.stop_at!r} is a fraction of training and needs total_steps"
                )
        elif self.stop_at is not None and (not isinstance(self.stop_at, int) or self.stop_at < 0):
            raise SparseCoreError(
                f"stop_at must be a step >= 0 or a fraction, got {self.stop_at!r}"
            )

    @property
    def static(self) -> bool:
        return self.every is None and not self.at_epoch_end

    def stop_step(self) -> float:
        """The first step at which no update happens any more (``inf`` if never)."""
        if isinstance(self.stop_at, float):
            assert self.total_steps is not None
            return math.floor(self.stop_at * self.total_steps)
        if self.stop_at is not None:
            return self.stop_at
        return self.total_steps if self.total_steps is not None else math.inf

    def due(self, step: int, *, epoch_end: bool = False) -> bool:
        """Is a mask update due after optimizer step ``step`` (1-based count of steps taken)?"""
        if step <= 0 or step >= self.stop_step():
            return False
        if epoch_end:
            return self.at_epoch_end
        return self.every is not None and step % self.every == 0

    def steps_until_next(self, step: int) -> float:
        """Optimizer steps from ``step`` to the next step-count update (``inf`` if none)."""
        if self.every is None:
            return math.inf
        nxt = (step // self.every + 1) * self.every
        return nxt - step if nxt < self.stop_step() else math.inf
