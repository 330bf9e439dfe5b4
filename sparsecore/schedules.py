"""Prune-rate schedules and the logic deciding when masks are updated."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SparseCoreError
from .validation import check_flag, check_integer, check_real, is_integer

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
    initial = check_real("prune_rate", initial, low=0.0, high=1.0)
    final = check_real("prune_rate_min", final, low=0.0, high=1.0)
    if schedule == "constant":
        return float(initial)
    if total_steps is None or not is_integer(total_steps) or total_steps <= 0:
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
        every = (
            None
            if self.every is None
            else check_integer(
                "update_every", self.every, minimum=1, what="a positive integer or None"
            )
        )
        total = (
            None
            if self.total_steps is None
            else check_integer(
                "total_steps", self.total_steps, minimum=1, what="a positive integer"
            )
        )
        stop_at: int | float | None = None
        if self.stop_at is not None and is_integer(self.stop_at):
            stop_at = check_integer(
                "stop_at", self.stop_at, minimum=0, what="a step >= 0 or a fraction"
            )
        elif self.stop_at is not None:
            stop_at = check_real(
                "stop_at as a fraction", self.stop_at, low=0.0, high=1.0, low_open=True
            )
            if total is None:
                raise SparseCoreError(
                    f"stop_at={self.stop_at!r} is a fraction of training and needs total_steps"
                )
        object.__setattr__(self, "every", every)
        object.__setattr__(
            self, "at_epoch_end", check_flag("update_at_epoch_end", self.at_epoch_end)
        )
        object.__setattr__(self, "total_steps", total)
        object.__setattr__(self, "stop_at", stop_at)

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
