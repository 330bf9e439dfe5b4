"""The position hash: the formula of ALGORITHM.md, bit for bit."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from sparsecore import HashKey, layer_hash, mix32, position_hash


def spec_mix(x: int) -> int:
    # Written from the specification with explicit modular arithmetic, independent of the library.
    m = 2**32
    x %= m
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) % m
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) % m
    return x ^ (x >> 16)


def spec_hash(seed: int, u: int, layer: int, i: int) -> int:
    return spec_mix(i ^ spec_mix(layer ^ spec_mix(u ^ spec_mix(seed))))


u32 = st.integers(0, 2**32 - 1)


@given(u32)
def test_mix32_matches_spec(x: int) -> None:
    assert mix32(x) == spec_mix(x)


@given(
    st.integers(0, 2**31), st.integers(0, 10**6), st.integers(0, 500), st.lists(u32, max_size=20)
)
def test_position_hash_matches_spec(seed: int, u: int, layer: int, ids: list[int]) -> None:
    got = position_hash(HashKey(seed, u, layer), np.array(ids, dtype=np.int64))
    assert got.dtype == np.uint32
    assert got.tolist() == [spec_hash(seed, u, layer, i) for i in ids]


def test_known_values() -> None:
    # mix(0) is 0 for this finaliser; the rest guards against a changed constant or shift.
    assert mix32(0) == 0
    assert spec_hash(0, 0, 0, 1) == mix32(1)
    assert layer_hash(HashKey(7, 3, 2), (2, 3)).shape == (2, 3)


def test_hash_is_a_bijection_within_a_layer() -> None:
    hashes = layer_hash(HashKey(1, 1, 0), (256, 256)).reshape(-1)
    assert np.unique(hashes).size == hashes.size


def test_hash_depends_on_every_key_part() -> None:
    base = layer_hash(HashKey(0, 1, 0), (64,))
    for key in (HashKey(1, 1, 0), HashKey(0, 2, 0), HashKey(0, 1, 1)):
        assert not np.array_equal(base, layer_hash(key, (64,)))
