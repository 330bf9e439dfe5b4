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


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=50))
def test_one_mix_for_every_integer_type(xs: list[int]) -> None:
    """hashing.mix is the one definition: Python ints, NumPy uint32 and int64 arrays (updated in
    place) and the Numba backend's compiled copy of the same function agree with the spec."""
    from sparsecore.hashing import MIX_CONSTANTS, mix
    from sparsecore.numba_backend.bits import _U64_MIX, _mix_u64

    expected = [spec_mix(x) for x in xs]
    assert [mix(x) for x in xs] == expected
    as_uint32 = np.array(xs, dtype=np.uint32)
    assert mix(as_uint32, tuple(np.uint32(c) for c in MIX_CONSTANTS)).tolist() == expected
    assert mix(np.array(xs, dtype=np.int64)).tolist() == expected
    assert [int(_mix_u64(np.uint64(x), _U64_MIX)) for x in xs] == expected


def test_no_other_module_spells_out_the_mixing_constants() -> None:
    """The multipliers appear once, in hashing.py: every backend calls hashing.mix."""
    import importlib.util
    from pathlib import Path

    packages = (
        "sparsecore",
        "sparsecore.torch",
        "sparsecore.keras",
        "sparsecore.cupy",
        "sparsecore.kernels",
    )
    roots = set()
    for name in packages:  # their folders, without importing the frameworks
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, name
        roots |= {Path(p) for p in spec.submodule_search_locations}
    spelled = {
        path.name
        for root in roots
        for path in root.rglob("*.py")
        if "MUL1" in path.read_text() or "7FEB352D" in path.read_text().upper()
    }
    assert spelled == {"hashing.py"}, spelled
