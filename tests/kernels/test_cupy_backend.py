"""The CuPy backend equals the NumPy reference: every primitive and whole mask updates.

The backend's code is written against an array module; it is checked here with ``numpy`` as that
module on every machine, and with ``cupy`` on a GPU (tests marked ``gpu``). Its comparisons and sums
go through the floats' bit patterns (a GPU may flush subnormal float32 values to zero), so the
value strategies include subnormals, signed zeros and float16/float64 arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparsecore import HashKey, Layer, get_backend, layer_hash, new_weights, update
from sparsecore.cupy.backend import BitPatternBackend

REFERENCE = get_backend("numpy")


class _Target:
    """A backend under test and how arrays go to and from it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "numpy-module":
            self.backend = BitPatternBackend(np)
            self.put = lambda a: np.array(a, copy=True)
            self.get = np.asarray
        else:
            import cupy

            from sparsecore.cupy.backend import CupyBackend

            self.backend = CupyBackend()
            self.put = cupy.asarray
            self.get = cupy.asnumpy


@pytest.fixture(
    scope="module",
    params=[
        "numpy-module",
        pytest.param("cupy", marks=pytest.mark.gpu),
    ],
)
def target(request: pytest.FixtureRequest) -> _Target:
    return _Target(request.param)


_SUBNORMAL32 = float(np.finfo(np.float32).smallest_subnormal)
_SUBNORMAL16 = float(np.finfo(np.float16).smallest_subnormal)
values = st.one_of(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 8), st.integers(1, 9)),
        elements=st.sampled_from(
            [0.0, -0.0, _SUBNORMAL32, -_SUBNORMAL32, 3 * _SUBNORMAL32, -1e-40, 1e-39, 1.0]
        ),
    ),
    hnp.arrays(
        np.float16,
        st.tuples(st.integers(1, 8), st.integers(1, 9)),
        elements=st.sampled_from([0.0, -0.0, _SUBNORMAL16, -_SUBNORMAL16, 1e-5, -1.0, 65504.0]),
    ),
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 8), st.integers(1, 9)),
        elements=st.floats(-3, 3, allow_subnormal=True),
    ),
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 12), st.integers(1, 20)),
        elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, 0.5]),
    ),
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3)),
        elements=st.floats(-3, 3, width=32),
    ),
)


@settings(max_examples=30, deadline=None)
@given(values, st.data())
def test_select_matches_reference(target: _Target, x: np.ndarray, data: st.DataObject) -> None:
    mask = data.draw(hnp.arrays(bool, x.shape))
    among_active = data.draw(st.booleans())
    largest = data.draw(st.booleans())
    magnitude = data.draw(st.booleans())
    sign = data.draw(st.sampled_from(["any", "positive", "nonpositive"]))
    candidates = mask if among_active else ~mask
    if sign == "positive":
        candidates = candidates & (x > 0)
    elif sign == "nonpositive":
        candidates = candidates & ~(x > 0)
    k = data.draw(st.integers(0, int(candidates.sum())))
    key = HashKey(data.draw(st.integers(0, 99)), data.draw(st.integers(1, 9)), 2)
    kwargs = dict(
        among_active=among_active, largest=largest, magnitude=magnitude, key=key, sign=sign
    )
    expected = REFERENCE.select(x, mask, k, **kwargs)
    got = target.backend.select(target.put(x), target.put(mask), k, **kwargs)
    assert np.array_equal(target.get(got), expected)


@settings(max_examples=20, deadline=None)
@given(values, st.data())
def test_select_per_unit_and_reductions_match_reference(
    target: _Target, x: np.ndarray, data: st.DataObject
) -> None:
    mask = data.draw(hnp.arrays(bool, x.shape))
    axis = data.draw(st.integers(0, x.ndim - 1))
    among_active = data.draw(st.booleans())
    free = REFERENCE.unit_count(mask, axis, among_active)
    ks = np.array([data.draw(st.integers(0, int(f))) for f in free], dtype=np.int64)
    key = HashKey(3, 4, 5)
    kwargs = dict(axis=axis, among_active=among_active, largest=True, magnitude=True, key=key)
    be, xd, md = target.backend, target.put(x), target.put(mask)
    expected = REFERENCE.select_per_unit(x, mask, ks, **kwargs)
    assert np.array_equal(target.get(be.select_per_unit(xd, md, ks, **kwargs)), expected)
    assert be.count(md) == REFERENCE.count(mask)
    assert be.count_positive(xd, md) == REFERENCE.count_positive(x, mask)
    assert be.abs_sum(xd, md) == pytest.approx(REFERENCE.abs_sum(x, mask), rel=1e-12, abs=0)
    assert be.abs_sum(xd, None) == pytest.approx(REFERENCE.abs_sum(x, None), rel=1e-12, abs=0)
    np.testing.assert_allclose(be.unit_abs_sum(xd, axis), REFERENCE.unit_abs_sum(x, axis), 1e-12)
    for active in (True, False):
        assert np.array_equal(
            be.unit_count(md, axis, active), REFERENCE.unit_count(mask, axis, active)
        )


def test_hash_and_elementwise_ops_match_reference(target: _Target) -> None:
    rng = np.random.default_rng(0)
    like = np.zeros((7, 5, 3), dtype=np.float32)
    key = HashKey(12345, 6, 7)
    be = target.backend
    got = target.get(be.position_hash(key, target.put(like)))
    assert got.dtype == np.uint32
    assert np.array_equal(got, layer_hash(key, like.shape))
    w = rng.standard_normal(like.shape).astype(np.float32)
    a = rng.random(like.shape) < 0.5
    b = rng.random(like.shape) < 0.5
    wd, ad, bd = target.put(w), target.put(a), target.put(b)
    assert np.array_equal(target.get(be.apply(wd, ad, bd)), REFERENCE.apply(w, a, b))
    assert np.array_equal(target.get(be.and_not(ad, bd)), a & ~b)
    assert np.array_equal(target.get(be.logical_or(ad, bd)), a | b)
    assert not target.get(be.zeros_mask(wd)).any()
    assert be.all_finite(wd)
    w[1, 2, 0] = np.nan
    assert not be.all_finite(target.put(w))
    assert be.dtype_kind(ad) == "b" and be.dtype_kind(wd) == "f"
    assert be.owns(wd) and not be.owns([1.0])


def test_subnormal_float32_values_are_not_flushed(target: _Target) -> None:
    """A GPU may flush subnormals in float arithmetic; the backend must still see them."""
    tiny = np.float32(_SUBNORMAL32)
    x = np.array([[0.0, tiny, -tiny, 0.0], [-0.0, 2 * tiny, 0.0, 1e-39]], dtype=np.float32)
    mask = np.ones(x.shape, dtype=bool)
    be, xd, md = target.backend, target.put(x), target.put(mask)
    assert be.count_positive(xd, md) == 3
    assert be.abs_sum(xd, md) == float(np.float32(1e-39)) + 4 * _SUBNORMAL32
    assert np.array_equal(
        be.unit_abs_sum(xd, 0), [2 * _SUBNORMAL32, float(np.float32(1e-39)) + 2 * _SUBNORMAL32]
    )
    key = HashKey(1, 1, 0)
    # The three largest magnitudes: 1e-39, 2*tiny, then one of the two tied at tiny (by hash).
    top = target.get(be.select(xd, md, 3, among_active=True, largest=True, magnitude=True, key=key))
    assert top[1, 3] and top[1, 1] and top[0, 1] != top[0, 2]
    assert np.array_equal(
        top, REFERENCE.select(x, mask, 3, among_active=True, largest=True, magnitude=True, key=key)
    )
    # SET's sign split: the positive subnormals are positive, -0.0 is not.
    positive = target.get(
        be.select(
            xd, md, 3, among_active=True, largest=False, magnitude=True, key=key, sign="positive"
        )
    )
    assert positive.sum() == 3 and positive[0, 1] and positive[1, 1] and positive[1, 3]


def _layers(put: Any, seed: int, n_layers: int, tie_heavy: bool) -> list[Layer]:
    rng = np.random.default_rng(seed)
    layers = []
    shapes = [(6, 4, 3, 3), (20, 30), (5, 7), (10, 3, 1, 1)][:n_layers]
    for i, shape in enumerate(shapes):
        if tie_heavy:
            weight = rng.integers(-2, 3, shape).astype(np.float32)
            momentum = rng.integers(-1, 2, shape).astype(np.float32)
        else:
            weight = rng.standard_normal(shape).astype(np.float32)
            momentum = rng.standard_normal(shape).astype(np.float32)
        mask = rng.random(shape) < 0.3
        weight = weight * mask
        momentum[rng.random(shape[0]) < 0.3] = 0  # silent (dead) units
        grad = rng.standard_normal(shape).astype(np.float32)
        layers.append(Layer(f"l{i}", put(weight), put(mask), put(momentum), put(grad), axis=0))
    return layers


@settings(max_examples=15, deadline=None)
@given(
    st.integers(0, 2**31),
    st.integers(1, 4),
    st.booleans(),
    st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    st.sampled_from(["magnitude", "SET"]),
    st.sampled_from(["momentum", "random", "gradient", "momentum_neuron"]),
    st.sampled_from(["momentum", "magnitude", "nonzero", "none"]),
    st.booleans(),
    st.sampled_from([0.0, 0.5, 1.0]),
)
def test_whole_update_matches_reference(
    target: _Target,
    seed,
    n_layers,
    tie_heavy,
    prune_rate,
    prune,
    growth,
    redistribution,
    revive,
    ablate_below,
) -> None:
    ref_layers = _layers(np.asarray, seed, n_layers, tie_heavy)
    dev_layers = _layers(target.put, seed, n_layers, tie_heavy)
    kwargs = dict(
        prune_rate=prune_rate,
        update_index=3,
        seed=seed % 1000,
        prune=prune,
        growth=growth,
        redistribution=redistribution,
        revive_dead_units=revive,
        ablate_below=ablate_below,
    )
    expected = update(ref_layers, backend=REFERENCE, **kwargs)
    got = update(dev_layers, backend=target.backend, **kwargs)
    for m_ref, m in zip(expected.masks, got.masks):
        assert np.array_equal(target.get(m), m_ref)
    assert [r.nnz_after for r in got.report.layers] == [r.nnz_after for r in expected.report.layers]
    assert [(r.dead_units, r.revived, r.ablated) for r in got.report.layers] == [
        (r.dead_units, r.revived, r.ablated) for r in expected.report.layers
    ]
    for w_ref, w in zip(
        new_weights(ref_layers, expected, REFERENCE),
        new_weights(dev_layers, got, target.backend),
    ):
        assert np.array_equal(target.get(w).view(np.uint32), w_ref.view(np.uint32))


@pytest.mark.gpu
def test_cupy_backend_is_found_for_cupy_arrays() -> None:
    import cupy

    from sparsecore import backend_for

    assert backend_for(cupy.zeros(3)).name == "cupy"
