"""The integer budget split (water-filling + largest remainder) and capacities, by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsecore import SparseCoreError, capacities, importance_shares, split_budget


def test_proportional_exact() -> None:
    assert split_budget(10, [0.5, 0.3, 0.2], [100, 100, 100]).tolist() == [5, 3, 2]


def test_leftover_goes_to_largest_fraction() -> None:
    # ideal 2.333 each -> floors 2, 2, 2, one unit left -> all fractions equal -> lowest index
    assert split_budget(7, [1, 1, 1], [10, 10, 10]).tolist() == [3, 2, 2]
    # ideal 1.2, 1.8 -> floors 1, 1, leftover 1 -> the 0.8 fraction
    assert split_budget(3, [0.4, 0.6], [10, 10]).tolist() == [1, 2]


def test_fraction_tie_goes_to_lower_index() -> None:
    assert split_budget(1, [1, 1], [5, 5]).tolist() == [1, 0]
    assert split_budget(1, [0, 1, 1], [5, 5, 5]).tolist() == [0, 1, 0]


def test_water_filling_closes_full_layers_and_resplits() -> None:
    # Layer 0 would get 5 but holds 2: it is filled, 8 are re-split 0.3 : 0.2 -> 4.8, 3.2 -> 5, 3.
    assert split_budget(10, [0.5, 0.3, 0.2], [2, 100, 100]).tolist() == [2, 5, 3]
    # Cascade: after closing layer 0, layer 1 overflows too.
    assert split_budget(10, [0.6, 0.3, 0.1], [1, 3, 100]).tolist() == [1, 3, 6]


def test_zero_weights_split_by_capacity() -> None:
    # weights sum to 0 -> split by capacity 3 : 1 -> 1.5, 0.5 -> 1, 0 + leftover to layer 0
    assert split_budget(2, [0, 0], [3, 1]).tolist() == [2, 0]


def test_zero_capacity_layers_get_nothing() -> None:
    assert split_budget(4, [10, 1], [0, 8]).tolist() == [0, 4]


def test_not_enough_room_is_an_error() -> None:
    with pytest.raises(SparseCoreError, match="free slots"):
        split_budget(5, [1, 1], [2, 2])


def test_bad_arguments() -> None:
    with pytest.raises(SparseCoreError):
        split_budget(-1, [1], [1])
    with pytest.raises(SparseCoreError):
        split_budget(1, [float("nan")], [1])
    with pytest.raises(SparseCoreError):
        split_budget(1, [1, 1], [1])


@given(
    st.lists(
        st.tuples(st.floats(0, 10, allow_nan=False), st.integers(0, 50)), min_size=1, max_size=12
    ),
    st.data(),
)
def test_split_invariants(layers: list[tuple[float, int]], data: st.DataObject) -> None:
    w = [a for a, _ in layers]
    cap = [c for _, c in layers]
    total = data.draw(st.integers(0, sum(cap)))
    g = split_budget(total, w, cap)
    assert int(g.sum()) == total
    assert (g >= 0).all() and (g <= np.array(cap)).all()
    # Water-filling: a layer below its capacity never gets less (by more than the one rounding
    # unit) than its proportional share of what is left for the layers below capacity.
    open_ = g < np.array(cap)
    wa = np.array(w, dtype=float)
    if open_.any() and wa[open_].sum() > 0:
        rest = total - int(g[~open_].sum())
        ideal = rest * wa[open_] / wa[open_].sum()
        assert (np.abs(g[open_] - ideal) < 1.0 + 1e-9).all()


def test_capacity_uses_density_ceiling_not_free_slots() -> None:
    # floor(0.5 * 100) - 30 kept = 20; a cap on free slots (0.5 * 70 = 35) would be wrong.
    assert capacities([100], [30], 0.5).tolist() == [20]
    assert capacities([100, 10], [30, 10], 1.0).tolist() == [70, 0]
    assert capacities([10], [9], 0.5).tolist() == [0]


def test_shares() -> None:
    assert importance_shares([1.0, 3.0], [10, 10]).tolist() == [0.25, 0.75]
    # All zero: proportional to layer size, never NaN.
    assert importance_shares([0.0, 0.0], [10, 30]).tolist() == [0.25, 0.75]
    with pytest.raises(SparseCoreError):
        importance_shares([float("nan"), 1.0], [1, 1])
