"""Prune-rate schedules and update timing."""

from __future__ import annotations

import math

import pytest

from sparsecore import SparseConfig, SparseCoreError, UpdateSchedule, prune_rate_at


def test_cosine() -> None:
    assert prune_rate_at(0, 100) == pytest.approx(0.5)
    assert prune_rate_at(100, 100) == pytest.approx(0.005)
    assert prune_rate_at(50, 100) == pytest.approx(0.005 + 0.495 / 2)
    assert prune_rate_at(25, 100) == pytest.approx(0.005 + 0.495 * (1 + math.cos(math.pi / 4)) / 2)
    assert prune_rate_at(500, 100) == pytest.approx(0.005)  # clipped


def test_linear_and_constant() -> None:
    assert prune_rate_at(25, 100, schedule="linear", initial=0.4, final=0.0) == pytest.approx(0.3)
    assert prune_rate_at(25, None, schedule="constant", initial=0.3) == 0.3


def test_missing_total_steps_is_explained() -> None:
    with pytest.raises(SparseCoreError, match="total_steps"):
        prune_rate_at(10, None)
    with pytest.raises(SparseCoreError, match="total_steps"):
        SparseConfig(update_every=10).prune_rate_at(10)


def test_bad_rates() -> None:
    with pytest.raises(SparseCoreError, match="prune_rate"):
        prune_rate_at(0, 10, initial=1.5)
    with pytest.raises(SparseCoreError, match="schedule"):
        prune_rate_at(0, 10, schedule="step")


def test_update_every_k_steps_until_the_end() -> None:
    s = UpdateSchedule(every=100, total_steps=1000)
    assert [t for t in range(1, 1001) if s.due(t)] == list(range(100, 1000, 100))
    assert not s.due(1000)  # no update after the last step
    assert s.steps_until_next(950) == math.inf
    assert s.steps_until_next(130) == 70


def test_stop_at_step_and_fraction() -> None:
    assert not UpdateSchedule(every=10, stop_at=50).due(50)
    assert UpdateSchedule(every=10, stop_at=50).due(40)
    assert UpdateSchedule(every=10, stop_at=0.5, total_steps=100).stop_step() == 50
    assert UpdateSchedule(every=10).due(10**9)  # no end known: never stops


def test_epoch_end_updates() -> None:
    s = UpdateSchedule(every=None, at_epoch_end=True, total_steps=100)
    assert s.due(10, epoch_end=True) and not s.due(10)
    assert not s.due(100, epoch_end=True)
    assert not UpdateSchedule(every=10).due(10, epoch_end=True)


def test_static_schedule() -> None:
    s = UpdateSchedule(every=None, at_epoch_end=False)
    assert s.static and not any(s.due(t) for t in range(1, 100))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every": 0},
        {"every": 1.5},
        {"stop_at": 1.5, "total_steps": 10},
        {"stop_at": 0.5},
        {"stop_at": -1},
        {"total_steps": 0},
    ],
)
def test_bad_schedules(kwargs: dict) -> None:
    with pytest.raises(SparseCoreError):
        UpdateSchedule(**kwargs)
