"""The Numba backend equals the NumPy reference: masks bit for bit, importance to 1e-12.

Every selection path is reached on small arrays through the backend's options: the serial gather
(small layers), the sampled one-pass threshold with several chunks, and the histogram path. The
fused update of magnitude pruning with momentum growth has its own tests (test_numba_fused.py);
one variant here switches it off so the generic path runs those modes too.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsecore as sc
from sparsecore.backend_numpy import NumpyBackend
from sparsecore.hashing import HashKey, position_hash
from sparsecore.numba_backend import NumbaBackend, select_flat
from sparsecore.numba_backend.bits import _jit

REFERENCE = NumpyBackend()
# Each variant forces one selection path on arrays of a few hundred elements.
VARIANTS = {
    "default": NumbaBackend(),
    "sampled_chunked": NumbaBackend(small_layer=0, min_chunk=64, parallel_min=0),
    "histogram_chunked": NumbaBackend(sampled=False, small_layer=0, min_chunk=64, parallel_min=0),
    # the generic engine path for every mode (magnitude + momentum otherwise runs fused)
    "generic_chunked": NumbaBackend(fused=False, small_layer=0, min_chunk=64, parallel_min=0),
}
DTYPES = [np.float16, np.float32, np.float64]
PRUNE = ["magnitude", "SET"]
GROWTH = ["momentum", "gradient", "random", "momentum_neuron"]
REDISTRIBUTION = ["momentum", "magnitude", "nonzero", "none"]
SETTINGS = settings(
    max_examples=int(os.environ.get("SPARSECORE_MAX_EXAMPLES", "40")),  # mutation runs use fewer
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def brute_force_select(x, mask, k, *, among_active, largest, magnitude, key, sign="any"):
    """Selection by a full sort on (score, hash, index): the specification, written plainly."""
    flat = np.asarray(x).reshape(-1)
    cand = mask.reshape(-1) == among_active
    if sign == "positive":
        cand &= flat > 0
    elif sign == "nonpositive":
        cand &= ~(flat > 0)
    positions = np.flatnonzero(cand)
    hashes = position_hash(key, positions)
    scores = [abs(float(flat[i])) if magnitude else float(flat[i]) for i in positions]
    order = sorted(
        range(positions.size),
        key=lambda t: (-scores[t] if largest else scores[t], -int(hashes[t]), int(positions[t])),
    )
    out = np.zeros(flat.size, dtype=bool)
    out[positions[order[:k]]] = True
    return out.reshape(np.shape(x))


# -- strategies ----------------------------------------------------------------------------------


@st.composite
def values(draw, size: int, dtype) -> np.ndarray:
    """Normal values, tie-heavy small integers (with -0.0), or all zeros."""
    kind = draw(st.sampled_from(["normal", "small_int", "zeros"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "normal":
        out = rng.standard_normal(size)
    elif kind == "small_int":
        out = rng.integers(-2, 3, size).astype(np.float64)
        out[rng.random(size) < 0.2] = -0.0
    else:
        out = np.zeros(size)
    return out.astype(dtype)


@st.composite
def layer_sets(draw):
    """One to three layers of 1..10^4 weights, with empty, full and random masks."""
    dtype = draw(st.sampled_from(DTYPES))
    count = draw(st.integers(1, 3))
    layers = []
    for i in range(count):
        rows = draw(st.integers(1, 40))
        cols = draw(st.sampled_from([1, 3, 17, 250]))
        shape = (rows, cols)
        size = rows * cols
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        density = draw(st.sampled_from([0.0, 1.0, 0.05, 0.3, 0.7]))
        mask = (rng.random(shape) < density) if 0 < density < 1 else np.full(shape, density > 0)
        weight = draw(values(size, dtype)).reshape(shape) * mask
        momentum = draw(values(size, dtype)).reshape(shape)
        momentum[rng.random(rows) < 0.3] = 0  # silent (dead) units
        grad = draw(values(size, dtype)).reshape(shape)
        layers.append(sc.Layer(f"layer{i}", weight, mask, momentum, grad))
    return layers


# -- the whole update ---------------------------------------------------------------------------


def assert_same_update(layers, variant, **options):
    expected = sc.update(layers, backend=REFERENCE, **options)
    got = sc.update(layers, backend=variant, **options)
    for layer, want, have in zip(layers, expected.masks, got.masks):
        assert have.dtype == np.bool_ and have.shape == want.shape
        assert np.array_equal(have, want), f"{layer.name}: masks differ ({options})"
    for want, have in zip(expected.report.layers, got.report.layers):
        assert math.isclose(have.importance, want.importance, rel_tol=1e-12, abs_tol=0.0)
        assert (have.pruned, have.grown, have.net_pruned, have.net_grown) == (
            want.pruned,
            want.grown,
            want.net_pruned,
            want.net_grown,
        )
        assert (have.units, have.dead_units, have.revived, have.ablated) == (
            want.units,
            want.dead_units,
            want.revived,
            want.ablated,
        )
    applied = sc.new_weights(layers, got, backend=variant)
    reference = sc.new_weights(layers, expected, backend=REFERENCE)
    for have, want in zip(applied, reference):
        assert have.dtype == want.dtype
        assert np.array_equal(have.view(np.uint8), want.view(np.uint8))  # bit for bit, +0.0


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
@SETTINGS
@given(
    layers=layer_sets(),
    prune=st.sampled_from(PRUNE),
    growth=st.sampled_from(GROWTH),
    redistribution=st.sampled_from(REDISTRIBUTION),
    rate=st.sampled_from([0.0, 0.1, 0.5, 0.97, 1.0]),
    seed=st.integers(0, 2**31 - 1),
    update_index=st.integers(1, 50),
    revive=st.booleans(),
    ablate_below=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_update_equals_numpy(
    variant, layers, prune, growth, redistribution, rate, seed, update_index, revive, ablate_below
):
    assert_same_update(
        layers,
        VARIANTS[variant],
        prune_rate=rate,
        update_index=update_index,
        seed=seed,
        prune=prune,
        growth=growth,
        redistribution=redistribution,
        revive_dead_units=revive,
        ablate_below=ablate_below,
    )


def test_update_equals_numpy_with_density_bounds():
    rng = np.random.default_rng(3)
    layers = []
    for i, shape in enumerate([(64, 9), (30, 30), (5, 200)]):
        mask = rng.random(shape) < 0.4
        weight = (rng.standard_normal(shape) * mask).astype(np.float32)
        momentum = rng.standard_normal(shape).astype(np.float32)
        layers.append(sc.Layer(f"l{i}", weight, mask, momentum))
    for variant in VARIANTS.values():
        assert_same_update(layers, variant, prune_rate=0.6, max_density=0.5, min_density=0.2)


def test_large_layers_take_the_fast_path_and_agree():
    """Real sizes: sampled threshold over two chunks, against the reference."""
    rng = np.random.default_rng(7)
    layers = []
    for i, shape in enumerate([(512, 256), (300, 700)]):
        mask = rng.random(shape) < 0.1
        weight = (rng.standard_normal(shape) * mask).astype(np.float32)
        momentum = rng.standard_normal(shape).astype(np.float32)
        layers.append(sc.Layer(f"big{i}", weight, mask, momentum))
    assert_same_update(layers, NumbaBackend(), prune_rate=0.5, update_index=3, seed=11)


# -- the selection primitive ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
@pytest.mark.parametrize("dtype", [*DTYPES, np.uint32])
@SETTINGS
@given(
    data=st.data(),
    size=st.integers(1, 600),
    among_active=st.booleans(),
    largest=st.booleans(),
    magnitude=st.booleans(),
    sign=st.sampled_from(["any", "positive", "nonpositive"]),
)
def test_select_matches_brute_force(
    variant, dtype, data, size, among_active, largest, magnitude, sign
):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if dtype == np.uint32:
        x = rng.integers(0, 4, size).astype(np.uint32)  # hash-like integer scores, many ties
    else:
        x = data.draw(values(size, dtype))
    mask = rng.random(size) < data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    brute = brute_force_select(
        x, mask, size, among_active=among_active, largest=largest, magnitude=magnitude,
        key=HashKey(0, 0, 0), sign=sign,
    )  # fmt: skip
    k = data.draw(st.integers(0, int(brute.sum())))
    key = HashKey(data.draw(st.integers(0, 99)), data.draw(st.integers(0, 9)), 2)
    options: dict[str, Any] = dict(
        among_active=among_active, largest=largest, magnitude=magnitude, key=key, sign=sign
    )
    got = VARIANTS[variant].select(x, mask, k, **options)
    assert np.array_equal(got, brute_force_select(x, mask, k, **options))
    assert np.array_equal(got, REFERENCE.select(x, mask, k, **options))


def test_ties_are_broken_by_hash_not_by_position():
    """All-zero momentum: the k grown positions are those with the largest hashes."""
    size = 5000
    x = np.zeros(size, dtype=np.float32)
    mask = np.zeros(size, dtype=bool)
    key = HashKey(5, 2, 1)
    expected = np.zeros(size, dtype=bool)
    expected[np.argsort(-position_hash(key, np.arange(size)).astype(np.int64))[:100]] = True
    for variant in VARIANTS.values():
        got = variant.select(
            x, mask, 100, among_active=False, largest=True, magnitude=True, key=key
        )
        assert np.array_equal(got, expected)
        assert got[:100].sum() < 20  # not piled into the first positions


def test_ties_only_at_the_boundary():
    """Distinct scores above the boundary are all taken; only the tied value uses the hash."""
    x = np.array([3.0, 1.0, 1.0, 1.0, 2.0, 1.0, 0.5, 1.0], dtype=np.float32)
    mask = np.ones(8, dtype=bool)
    key = HashKey(1, 1, 0)
    for variant in VARIANTS.values():
        got = variant.select(x, mask, 4, among_active=True, largest=True, magnitude=False, key=key)
        assert got[0] and got[4] and not got[6]
        tied = np.array([1, 2, 3, 5, 7])
        best = tied[np.argsort(-position_hash(key, tied).astype(np.int64))[:2]]
        assert set(np.flatnonzero(got)) == {0, 4, *best.tolist()}


def test_negative_and_positive_zero_tie():
    x = np.array([-0.0, 0.0, -0.0, 0.0, 1.0, -1.0], dtype=np.float64)
    mask = np.ones(6, dtype=bool)
    key = HashKey(0, 1, 0)
    for variant in VARIANTS.values():
        for magnitude in (True, False):
            opts: dict[str, Any] = dict(
                among_active=True, largest=False, magnitude=magnitude, key=key
            )
            got = variant.select(x, mask, 2, **opts)
            assert np.array_equal(got, brute_force_select(x, mask, 2, **opts))


def test_float16_extremes_and_subnormals():
    x = np.array([6.0e-8, -6.0e-8, 65504.0, -65504.0, 1e-5, 0.0, -2.0, 2.0], dtype=np.float16)
    mask = np.ones(x.size, dtype=bool)
    for k in range(x.size + 1):
        for largest in (True, False):
            opts: dict[str, Any] = dict(
                among_active=True, largest=largest, magnitude=False, key=HashKey(0, 1, 0)
            )
            want = brute_force_select(x, mask, k, **opts)
            for variant in VARIANTS.values():
                assert np.array_equal(variant.select(x, mask, k, **opts), want)


def test_sampled_path_falls_back_when_the_interval_misses():
    """A layout where a strided sample sees only zeros: the sampled guess is wrong, the result
    is still exact (the counts detect the miss and the histogram path runs)."""
    size = 1 << 15
    x = np.zeros(size, dtype=np.float32)
    x[1::2] = np.arange(1, size // 2 + 1, dtype=np.float32)  # stride-even sample sees zeros
    mask = np.zeros(size, dtype=bool)
    key = HashKey(0, 1, 0)
    opts: dict[str, Any] = dict(among_active=False, largest=True, magnitude=True, key=key)
    got = select_flat(x, mask, 1000, **opts, small_layer=0, min_chunk=1024)
    want = REFERENCE.select(x, mask, 1000, **opts)
    assert np.array_equal(got, want)
    assert got[size - 2000 :].sum() == 1000


# -- the other operations -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_sum_and_counts_match(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((70, 300)).astype(dtype)
    x[0, :5] = [-0.0, 0.0, 1.0, -1.0, 0.0]
    mask = rng.random(x.shape) < 0.3
    backend = NumbaBackend(min_chunk=1024, parallel_min=0)
    for m in (mask, None):
        want = REFERENCE.abs_sum(x, m)
        assert math.isclose(backend.abs_sum(x, m), want, rel_tol=1e-12)
    assert backend.count_positive(x, mask) == REFERENCE.count_positive(x, mask)
    for axis in (0, 1, -1):
        assert np.allclose(
            backend.unit_abs_sum(x, axis), REFERENCE.unit_abs_sum(x, axis), rtol=1e-12
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite(dtype, bad):
    backend = NumbaBackend(min_chunk=256, parallel_min=0)
    x = np.linspace(-3, 3, 5000).astype(dtype)
    assert backend.all_finite(x)
    x[4321] = bad
    assert not backend.all_finite(x)
    x[4321] = np.finfo(dtype).max
    assert backend.all_finite(x)


def test_apply_keeps_bits_and_zeroes_with_positive_zero():
    rng = np.random.default_rng(2)
    for dtype in DTYPES:
        w = rng.standard_normal((40, 50)).astype(dtype)
        w[0, 0] = -0.0
        old = rng.random(w.shape) < 0.5
        old[0, 0] = True
        new = rng.random(w.shape) < 0.5
        new[0, 0] = True
        got = NumbaBackend(min_chunk=256, parallel_min=0).apply(w, old, new)
        want = np.where(old & new, w, np.zeros((), dtype=w.dtype))
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
        assert np.signbit(got[0, 0]) and not np.signbit(got[~(old & new)]).any()


def test_position_hash_and_and_not_match():
    backend = NumbaBackend(min_chunk=256, parallel_min=0)
    like = np.empty((33, 77), dtype=np.float32)
    key = HashKey(123, 4, 5)
    assert np.array_equal(backend.position_hash(key, like), REFERENCE.position_hash(key, like))
    rng = np.random.default_rng(4)
    a, b = rng.random((2, 33, 77)) < 0.5
    assert np.array_equal(backend.and_not(a, b), a & ~b)


def test_select_per_unit_matches_on_every_axis():
    rng = np.random.default_rng(9)
    x = rng.integers(-2, 3, (6, 5, 4)).astype(np.float32)
    mask = rng.random(x.shape) < 0.3
    key = HashKey(2, 3, 4)
    for axis in (0, 1, 2, -1):
        free = REFERENCE.unit_count(mask, axis, active=False)
        ks = np.minimum(free, rng.integers(0, 6, free.size))
        opts: dict[str, Any] = dict(
            axis=axis, among_active=False, largest=True, magnitude=True, key=key
        )
        want = REFERENCE.select_per_unit(x, mask, ks, **opts)
        assert np.array_equal(NumbaBackend().select_per_unit(x, mask, ks, **opts), want)


def test_non_contiguous_and_integer_inputs():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((50, 40)).astype(np.float32).T  # a transposed view
    mask = rng.random(x.shape) < 0.5
    key = HashKey(0, 1, 0)
    opts: dict[str, Any] = dict(among_active=True, largest=False, magnitude=True, key=key)
    assert np.array_equal(
        NumbaBackend().select(x, mask, 300, **opts), REFERENCE.select(x, mask, 300, **opts)
    )
    ints = rng.integers(-5, 5, (20, 20)).astype(np.int32)  # not a rank-key dtype: reference path
    opts = dict(among_active=True, largest=True, magnitude=False, key=key)
    assert np.array_equal(
        NumbaBackend().select(ints, mask[:20, :20], 50, **opts),
        REFERENCE.select(ints, mask[:20, :20], 50, **opts),
    )


# -- registration, caching ------------------------------------------------------------------------


def test_chosen_by_name_not_by_array_type():
    assert isinstance(sc.get_backend("numba"), NumbaBackend)
    assert sc.backend_for(np.zeros((2, 2))).name == "numpy"
    layer = sc.Layer(
        "fc", np.ones((4, 4), np.float32), np.eye(4, dtype=bool), np.ones((4, 4), np.float32)
    )
    result = sc.update([layer], prune_rate=0.5, backend="numba")
    assert int(result.masks[0].sum()) == 4


def test_jit_falls_back_quietly_without_a_cache_location():
    namespace: dict = {}
    exec("def plus_one(x):\n    return x + 1\n", namespace)  # no source file: nowhere to cache
    compiled = _jit()(namespace["plus_one"])
    assert compiled(41) == 42


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.bool_])
def test_unit_nonzero_matches_the_reference_on_every_axis(dtype):
    """The early-exit scan behind dead-unit counts: -0.0 is zero, any other value is not."""
    rng = np.random.default_rng(5)
    numba_backend = NumbaBackend()
    for shape in [(6, 5), (4, 3, 2, 2), (3, 7), (1, 9)]:
        x = rng.standard_normal(shape)
        x[np.abs(x) < 0.9] = 0
        x[rng.random(shape) < 0.2] = -0.0
        x = (x != 0) if dtype is np.bool_ else x.astype(dtype)
        for axis in range(-len(shape), len(shape)):
            want = REFERENCE.unit_nonzero(x, axis)
            assert np.array_equal(numba_backend.unit_nonzero(x, axis), want), (shape, axis)
            strided = np.asfortranarray(x)  # not C-contiguous: the reference's way
            assert np.array_equal(numba_backend.unit_nonzero(strided, axis), want)
    zeros = np.zeros((4, 3), dtype=dtype)
    assert not numba_backend.unit_nonzero(zeros, 0).any()


def test_unit_nonzero_of_other_byte_orders_and_types_takes_the_reference_way():
    x = np.array([[0.0, 1.5], [0.0, -0.0]], dtype=">f4")
    assert NumbaBackend().unit_nonzero(x, 0).tolist() == [True, False]
    assert NumbaBackend().unit_nonzero(x.astype(np.int32), 1).tolist() == [False, True]
