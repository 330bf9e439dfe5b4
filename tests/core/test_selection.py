"""The selection primitive of the NumPy reference backend against the brute-force model."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from spec_model import brute_select

from sparsecore import HashKey, get_backend, layer_hash

np_backend = get_backend("numpy")

tie_heavy = st.one_of(
    hnp.arrays(
        np.float32, st.integers(1, 300), elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0])
    ),
    hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-3, 3, width=32)),
    hnp.arrays(np.float16, st.integers(1, 300), elements=st.sampled_from([0.0, 0.5, -0.5, 1e-3])),
    hnp.arrays(
        np.float64, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(-2, 2)
    ),
)


@given(tie_heavy, st.data())
def test_select_matches_brute_force(x: np.ndarray, data: st.DataObject) -> None:
    mask = data.draw(hnp.arrays(bool, x.shape))
    among_active = data.draw(st.booleans())
    largest = data.draw(st.booleans())
    magnitude = data.draw(st.booleans())
    candidates = mask if among_active else ~mask
    k = data.draw(st.integers(0, int(candidates.sum())))
    key = HashKey(data.draw(st.integers(0, 99)), data.draw(st.integers(0, 9)), 3)
    got = np_backend.select(
        x, mask, k, among_active=among_active, largest=largest, magnitude=magnitude, key=key
    )
    scores = np.abs(x) if magnitude else x
    assert got.dtype == bool and int(got.sum()) == k
    assert np.array_equal(got, brute_select(scores, candidates, k, largest=largest, key=key))


def test_ties_break_by_larger_hash_not_by_position() -> None:
    # All scores equal: the chosen positions are those with the largest hashes, which are spread
    # over the layer rather than piled into its first rows.
    x = np.ones((8, 8), dtype=np.float32)
    mask = np.ones((8, 8), dtype=bool)
    key = HashKey(5, 2, 1)
    got = np_backend.select(x, mask, 10, among_active=True, largest=False, magnitude=True, key=key)
    hashes = layer_hash(key, (8, 8)).reshape(-1)
    assert set(np.flatnonzero(got)) == set(np.argsort(hashes)[-10:])
    assert not got[:2].all()  # not simply the first 10 positions


def test_strict_order_beats_hash() -> None:
    x = np.array([3.0, 1.0, 2.0, 1.0, 5.0], dtype=np.float32)
    mask = np.ones(5, dtype=bool)
    key = HashKey(0, 1, 0)
    got = np_backend.select(x, mask, 2, among_active=True, largest=False, magnitude=False, key=key)
    assert got.tolist() == [False, True, False, True, False]
    # One of the two tied 1.0s: the one with the larger hash.
    one = np_backend.select(x, mask, 1, among_active=True, largest=False, magnitude=False, key=key)
    hashes = layer_hash(key, (5,))
    assert np.flatnonzero(one).tolist() == [1 if hashes[1] > hashes[3] else 3]


def test_negative_zero_equals_zero() -> None:
    x = np.array([-0.0, 0.0, -0.0, 0.0], dtype=np.float32)
    mask = np.ones(4, dtype=bool)
    key = HashKey(1, 1, 1)
    got = np_backend.select(x, mask, 2, among_active=True, largest=False, magnitude=False, key=key)
    assert np.array_equal(got, brute_select(x, mask, 2, largest=False, key=key))


def test_sign_filters() -> None:
    x = np.array([0.5, -0.2, 0.0, -0.0, 0.1, -3.0], dtype=np.float32)
    mask = np.ones(6, dtype=bool)
    key = HashKey(0, 1, 0)
    pos = np_backend.select(
        x, mask, 1, among_active=True, largest=False, magnitude=False, key=key, sign="positive"
    )
    assert np.flatnonzero(pos).tolist() == [4]
    neg = np_backend.select(
        x, mask, 3, among_active=True, largest=True, magnitude=False, key=key, sign="nonpositive"
    )
    assert set(np.flatnonzero(neg)) == {1, 2, 3}
