"""Settings that cannot work are refused with the option, the value and the valid range; numbers
given as NumPy scalars work and are stored as plain Python values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sparsecore as sc
from sparsecore import SparseConfig, SparseCoreError, SparseEngine
from sparsecore.schedules import UpdateSchedule

# Every numeric or boolean option of SparseConfig, a value that is valid for it, and the words its
# error message must hold.
NUMERIC = {
    "density": (0.05, r"density must lie in \(0, 1\]"),
    "prune_rate": (0.5, r"prune_rate must lie in \[0, 1\]"),
    "prune_rate_min": (0.005, r"prune_rate_min must lie in \[0, 1\]"),
    "max_density": (1.0, r"max_density must lie in \(0, 1\]"),
    "min_density": (0.0, r"min_density .*must lie in \[0, 1\]"),
    "momentum_beta": (0.9, r"momentum_beta must lie in \[0, 1\)"),
    "seed": (0, r"seed must be an integer >= 0"),
    "update_every": (100, r"update_every must be a positive integer or None"),
    "total_steps": (1000, r"total_steps must be a positive integer"),
    "stop_at": (500, r"stop_at"),
}
FLAGS = ("update_at_epoch_end", "reset_optimizer_state")
CHOICES = ("init", "prune", "growth", "redistribution", "prune_schedule", "adam_momentum")
BAD_NUMBERS = [True, False, np.True_, "0.5", None, [0.5], math.nan, math.inf, -math.inf, 1j]


@given(option=st.sampled_from(sorted(NUMERIC)), bad=st.sampled_from(BAD_NUMBERS))
def test_non_numbers_are_refused_naming_the_option(option, bad):
    if bad is None and option in ("update_every", "total_steps", "stop_at"):
        return  # None is valid there (never / unknown / no stop)
    with pytest.raises(SparseCoreError, match=NUMERIC[option][1]) as info:
        SparseConfig(**{"total_steps": 1000, option: bad})
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("density", 1.5, r"density must lie in \(0, 1\], got 1.5"),
        ("density", 0, r"density must lie in \(0, 1\], got 0"),
        ("prune_rate", -0.1, r"prune_rate must lie in \[0, 1\], got -0.1"),
        ("momentum_beta", 1.0, r"momentum_beta must lie in \[0, 1\), got 1.0"),
        ("seed", 1.5, r"seed must be an integer >= 0, got 1.5"),
        ("seed", -1, r"seed must be an integer >= 0, got -1"),
        ("update_every", 2.0, r"update_every must be a positive integer or None, got 2.0"),
        ("total_steps", 0, r"total_steps must be a positive integer, got 0"),
        ("stop_at", 1.5, r"stop_at as a fraction must lie in \(0, 1\], got 1.5"),
        ("stop_at", -3, r"stop_at must be a step >= 0 or a fraction, got -3"),
        ("update_at_epoch_end", 1, r"update_at_epoch_end must be True or False, got 1"),
        ("reset_optimizer_state", "no", r"reset_optimizer_state must be True or False"),
        ("init", ["ERK"], r"init must be one of .* got \['ERK'\]"),
        ("on_nonfinite", None, r"on_nonfinite must be one of"),
    ],
)
def test_out_of_range_values_give_the_range(option, value, message):
    with pytest.raises(SparseCoreError, match=message):
        SparseConfig(**{"total_steps": 1000, option: value})


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("bad", [0, 1, "True", None])
def test_flags_take_only_booleans(flag, bad):
    with pytest.raises(SparseCoreError, match=f"{flag} must be True or False"):
        SparseConfig(**{flag: bad})


@pytest.mark.parametrize("choice", CHOICES)
def test_choices_take_only_their_names(choice):
    with pytest.raises(SparseCoreError, match=f"{choice} must be one of"):
        SparseConfig(**{choice: 3})


def test_numpy_numbers_are_numbers_and_are_stored_as_python_values():
    config = SparseConfig(
        density=np.float32(0.05),
        prune_rate=np.float64(0.4),
        seed=np.int64(7),
        update_every=np.int32(10),
        total_steps=np.uint16(500),
        stop_at=np.float32(0.5),
        update_at_epoch_end=np.True_,
    )
    plain = SparseConfig(
        density=float(np.float32(0.05)),
        prune_rate=0.4,
        seed=7,
        update_every=10,
        total_steps=500,
        stop_at=float(np.float32(0.5)),
        update_at_epoch_end=True,
    )
    assert config == plain
    for value in config.to_dict().values():
        assert type(value) in (bool, int, float, str, type(None))
    json.dumps(config.to_dict())
    assert config.schedule().stop_step() == 250


def test_a_density_that_keeps_no_weight_is_refused():
    with pytest.raises(SparseCoreError, match=r"0 active weights.*density above 0.0556"):
        sc.layer_counts([(3, 3)], 0.01)
    with pytest.raises(SparseCoreError, match="0 active weights"):
        SparseEngine(SparseConfig(density=0.01), ["w"], [(3, 3)])
    assert sc.layer_counts([(3, 3)], 0.06) == [1]  # round(0.54) = 1: the smallest that works


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((), r"shape \(\) has no elements"),
        ((3, 0), "no elements"),
        ((3, -2), "no elements"),
        ((3, 2.5), r"size 2.5; every size must be an integer >= 1"),
        ((3, True), "size True"),
        (5, "shape must be a sequence"),
    ],
)
def test_bad_shapes_are_refused(shape, message):
    with pytest.raises(SparseCoreError, match=message):
        sc.layer_counts([(4, 4), shape], 0.5)
    with pytest.raises(SparseCoreError, match=message):
        SparseEngine(SparseConfig(density=0.5), ["a", "b"], [(4, 4), shape])


def test_bad_axes_and_names_are_refused():
    with pytest.raises(SparseCoreError, match="output axis 2 is out of range"):
        sc.layer_counts([(4, 4)], 0.5, axes=[2])
    with pytest.raises(SparseCoreError, match="output axis 0.5"):
        sc.layer_counts([(4, 4)], 0.5, axes=[0.5])
    with pytest.raises(SparseCoreError, match="names must be strings"):
        SparseEngine(SparseConfig(), [3], [(4, 4)])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("seed", 1.5, "seed must be an integer >= 0, got 1.5"),
        ("seed", True, "seed must be an integer >= 0, got True"),
        ("update_index", True, r"update_index must be an integer >= 1 \(0 is the initial mask\)"),
        ("update_index", 0, "update_index must be an integer >= 1"),
        ("prune_rate", True, r"prune rate must lie in \[0, 1\], got True"),
        ("prune_rate", math.nan, r"prune rate must lie in \[0, 1\], got nan"),
        ("max_density", 0, r"max_density must lie in \(0, 1\]"),
        ("step", -1, "step must be an integer >= 0"),
    ],
)
def test_update_arguments_are_checked_the_same_on_every_backend(backend, option, value, message):
    rng = np.random.default_rng(0)
    mask = rng.random((6, 5)) < 0.3
    layer = sc.Layer("w", rng.standard_normal((6, 5)) * mask, mask, rng.standard_normal((6, 5)))
    kwargs = {"prune_rate": 0.5, option: value}
    with pytest.raises(SparseCoreError, match=message):
        sc.update([layer], backend=backend, **kwargs)
    # a NumPy integer seed is a seed: the same masks as the Python integer
    a = sc.update([layer], prune_rate=0.5, seed=np.int64(3), backend=backend)
    b = sc.update([layer], prune_rate=0.5, seed=3, backend=backend)
    assert np.array_equal(a.masks[0], b.masks[0])


def test_initial_masks_check_seed_and_count():
    with pytest.raises(SparseCoreError, match="seed must be an integer >= 0, got 1.5"):
        sc.initial_masks([(4, 4)], 0.5, seed=1.5)
    with pytest.raises(SparseCoreError, match="cannot activate 2.0 of 16"):
        sc.initial_mask((4, 4), 2.0, seed=0, layer=0)


def test_schedule_refuses_booleans():
    with pytest.raises(SparseCoreError, match="update_every must be a positive integer"):
        UpdateSchedule(every=True)
    with pytest.raises(SparseCoreError, match="total_steps must be a positive integer"):
        UpdateSchedule(total_steps=True)
    with pytest.raises(SparseCoreError, match="stop_at"):
        UpdateSchedule(stop_at=True)
    with pytest.raises(SparseCoreError, match="prune_rate must lie"):
        sc.prune_rate_at(3, 10, initial=True)
