"""The Keras engine backend equals the NumPy reference: importance to 1e-12, masks bit for bit."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops
from minimal_backend import defaults_only

import sparsecore
from sparsecore import HashKey, Layer
from sparsecore.backend_numpy import NumpyBackend
from sparsecore.keras import KerasBackend
from sparsecore.keras.backend import wide_scope

KB = KerasBackend()
NB = NumpyBackend()

SHAPES = [(7, 5), (3, 3, 2, 4), (6,), (2, 3, 4), (1, 1, 4, 6), (12, 3)]
PRUNE = ["magnitude", "SET"]
GROWTH = ["momentum", "random", "gradient", "momentum_neuron"]
REDISTRIBUTION = ["momentum", "magnitude", "nonzero", "none"]


def _examples(n: int) -> int:
    # On JAX every eager keras.ops call is compiled for each new shape, which makes an example
    # several times dearer than on TensorFlow or PyTorch: half as many keep the run's time.
    return max(1, n // 2) if keras.backend.backend() == "jax" else n


def _tensor(x: np.ndarray):
    # float64 inputs stay float64 on JAX too (as in a model trained with jax_enable_x64)
    with wide_scope():
        return ops.convert_to_tensor(x)


def _host(x) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x))


@st.composite
def layer_sets(draw):
    """Two or three layers whose values have many ties (small integers, zeros of both signs)."""
    n_layers = draw(st.integers(2, 3))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    axis = draw(st.sampled_from([0, -1]))
    out_np, out_k = [], []
    for i in range(n_layers):
        shape = SHAPES[draw(st.integers(0, len(SHAPES) - 1))] if i else (7, 5)
        density = draw(st.floats(0.0, 1.0))
        mask = rng.random(shape) < density
        if not mask.any():
            mask.reshape(-1)[0] = True
        levels = draw(st.integers(1, 6))
        w = (rng.integers(-levels, levels + 1, size=shape) * 0.5).astype(dtype)
        w = np.where(rng.random(shape) < 0.1, -0.0, w).astype(dtype)
        p = (rng.integers(-levels, levels + 1, size=shape) * 0.25).astype(dtype)
        np.moveaxis(p, axis, 0)[rng.random(shape[axis]) < 0.3] = 0  # silent (dead) units
        g = rng.standard_normal(shape).astype(dtype)
        out_np.append(Layer(f"l{i}", w, mask, p, g, axis=axis))
        out_k.append(Layer(f"l{i}", _tensor(w), _tensor(mask), _tensor(p), _tensor(g), axis=axis))
    return out_np, out_k


@settings(max_examples=_examples(30))
@given(
    layers=layer_sets(),
    prune=st.sampled_from(PRUNE),
    growth=st.sampled_from(GROWTH),
    redistribution=st.sampled_from(REDISTRIBUTION),
    rate=st.floats(0.0, 1.0),
    update_index=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
    min_density=st.sampled_from([0.0, 0.1]),
    revive=st.booleans(),
    ablate_below=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_update_equals_numpy(
    layers,
    prune,
    growth,
    redistribution,
    rate,
    update_index,
    seed,
    min_density,
    revive,
    ablate_below,
):
    layers_np, layers_k = layers
    kwargs = dict(
        prune_rate=rate,
        update_index=update_index,
        seed=seed,
        prune=prune,
        growth=growth,
        redistribution=redistribution,
        min_density=min_density,
        revive_dead_units=revive,
        ablate_below=ablate_below,
    )
    try:
        ref = sparsecore.update(layers_np, **kwargs)
    except sparsecore.SparseCoreError as err:  # e.g. 'none' beyond max_density: same error
        with pytest.raises(sparsecore.SparseCoreError, match=str(err)[:40].replace("(", r"\(")):
            sparsecore.update(layers_k, backend=KB, **kwargs)
        return
    out = sparsecore.update(layers_k, backend=KB, **kwargs)
    for a, b in zip(ref.masks, out.masks):
        assert np.array_equal(a, _host(b))
    for a, b in zip(ref.report.layers, out.report.layers):
        assert math.isclose(a.importance, b.importance, rel_tol=1e-12, abs_tol=0.0)
        assert (a.pruned, a.grown, a.net_pruned, a.net_grown) == (
            b.pruned,
            b.grown,
            b.net_pruned,
            b.net_grown,
        )
        assert (a.units, a.dead_units, a.revived, a.ablated) == (
            b.units,
            b.dead_units,
            b.revived,
            b.ablated,
        )
    new_np = sparsecore.new_weights(layers_np, ref)
    new_k = sparsecore.new_weights(layers_k, out, backend=KB)
    for a, b in zip(new_np, new_k):
        assert np.array_equal(a.view(np.uint8), _host(b).view(np.uint8))  # bit for bit


@settings(max_examples=_examples(40))
@given(
    n=st.integers(1, 300),
    levels=st.integers(1, 4),
    k_frac=st.floats(0.0, 1.0),
    among_active=st.booleans(),
    largest=st.booleans(),
    magnitude=st.booleans(),
    sign=st.sampled_from(["any", "positive", "nonpositive"]),
    seed=st.integers(0, 2**32 - 1),
    density=st.sampled_from([0.05, 0.5, 0.95]),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
)
def test_select_ties_equal_numpy(
    n, levels, k_frac, among_active, largest, magnitude, sign, seed, density, dtype
):
    rng = np.random.default_rng(seed)
    x = (rng.integers(-levels, levels + 1, size=n) * 0.1).astype(dtype)
    mask = rng.random(n) < density
    candidates = mask if among_active else ~mask
    if sign == "positive":
        candidates = candidates & (x > 0)
    elif sign == "nonpositive":
        candidates = candidates & ~(x > 0)
    k = int(k_frac * candidates.sum())
    key = HashKey(seed, 3, 1)
    kw = dict(among_active=among_active, largest=largest, magnitude=magnitude, key=key, sign=sign)
    a = NB.select(x, mask, k, **kw)
    b = KB.select(_tensor(x), _tensor(mask), k, **kw)
    assert np.array_equal(a, _host(b))
    assert int(_host(b).sum()) == k


@settings(max_examples=_examples(20))
@given(
    shape=st.sampled_from([(5, 6), (3, 3, 2, 4), (4, 1, 3)]),
    axis=st.sampled_from([0, -1, -2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_select_per_unit_and_unit_sums_equal_numpy(shape, axis, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=shape).astype(np.float32)
    mask = rng.random(shape) < 0.4
    free = NB.unit_count(mask, axis, active=False)
    ks = np.array([rng.integers(0, f + 1) for f in free], dtype=np.int64)
    key = HashKey(seed, 1, 0)
    kw = dict(axis=axis, among_active=False, largest=True, magnitude=True, key=key)
    a = NB.select_per_unit(x, mask, ks, **kw)
    b = KB.select_per_unit(_tensor(x), _tensor(mask), ks, **kw)
    assert np.array_equal(a, _host(b))
    np.testing.assert_array_equal(
        NB.unit_count(mask, axis, True), KB.unit_count(_tensor(mask), axis, True)
    )
    np.testing.assert_allclose(
        NB.unit_abs_sum(x, axis), KB.unit_abs_sum(_tensor(x), axis), rtol=1e-12
    )


@pytest.mark.parametrize("shape", [(1,), (17, 3), (4, 4, 3, 2)])
@pytest.mark.parametrize("key", [HashKey(0, 0, 0), HashKey(2**32 - 1, 12345, 7)])
def test_position_hash_equals_numpy(shape, key):
    ref = sparsecore.hashing.layer_hash(key, shape).astype(np.int64)
    out = _host(KB.position_hash(key, ops.zeros(shape)))
    assert np.array_equal(ref, out)


def test_inspection_and_small_ops():
    w = _tensor(np.array([[1.0, -2.0], [0.0, -0.0]], dtype=np.float32))
    m = _tensor(np.array([[True, False], [True, True]]))
    assert KB.owns(w) and not KB.owns(np.zeros(2)) and not KB.owns(keras.Variable([1.0]))
    assert KB.shape(w) == (2, 2)
    assert KB.dtype_kind(w) == "f" and KB.dtype_kind(m) == "b"
    assert KB.dtype_kind(_tensor(np.arange(3))) == "i"
    assert KB.count(m) == 3 and KB.count_positive(w, m) == 1
    assert KB.abs_sum(w, m) == 1.0 and KB.abs_sum(w, None) == 3.0
    assert not KB.all_finite(_tensor(np.array([1.0, np.inf], dtype=np.float32)))
    applied = _host(KB.apply(w, m, _tensor(np.array([[True, True], [False, True]]))))
    # kept where active before and after; +0 elsewhere (never -0 from a product)
    assert applied.tolist() == [[1.0, 0.0], [0.0, -0.0]]
    assert not np.signbit(applied[0, 1]) and not np.signbit(applied[1, 0])


def test_engine_finds_the_keras_backend_by_name():
    assert sparsecore.get_backend("keras").name == "keras"


def test_engine_picks_a_backend_for_keras_tensors_by_itself():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((9, 4)).astype(np.float32)
    m = rng.random((9, 4)) < 0.5
    p = rng.standard_normal((9, 4)).astype(np.float32)
    layers_np = [Layer("a", w, m, p)]
    layers_k = [Layer("a", _tensor(w), _tensor(m), _tensor(p))]
    # torch tensors (Keras' torch backend) are owned by both the torch and the Keras backend;
    # whichever was registered first answers, and both equal the reference.
    expected = {"torch", "keras"} if keras.backend.backend() == "torch" else {"keras"}
    assert sparsecore.backend_for(layers_k[0].weight).name in expected
    ref = sparsecore.update(layers_np, prune_rate=0.5)
    out = sparsecore.update(layers_k, prune_rate=0.5)  # no backend given
    assert np.array_equal(ref.masks[0], _host(out.masks[0]))


# KerasBackend's primitives under the interface's defaults: its own operations set aside. Those
# defaults do not run under KerasBackend's wide_scope (JAX's 64-bit mode), so the tests open it.
KerasDefaults = defaults_only(KerasBackend)


@settings(max_examples=_examples(15))
@given(
    shape=st.sampled_from(SHAPES),
    seed=st.integers(0, 2**32 - 1),
    largest=st.booleans(),
    magnitude=st.booleans(),
    sign=st.sampled_from(["any", "positive", "nonpositive"]),
)
def test_the_defaults_on_keras_primitives_equal_numpy(shape, seed, largest, magnitude, sign):
    """The selection written once, on keras.ops primitives: ties (few distinct values) and the
    per-unit selection included."""
    rng = np.random.default_rng(seed)
    x = (rng.integers(-2, 3, size=shape) * 0.5).astype(np.float32)
    mask = rng.random(shape) < 0.5
    candidates = (
        mask & (x > 0) if sign == "positive" else mask & ~(x > 0) if sign != "any" else mask
    )
    k = int(rng.integers(0, int(candidates.sum()) + 1))
    key = HashKey(seed, 2, 1)
    kw = dict(among_active=True, largest=largest, magnitude=magnitude, key=key)
    with wide_scope():
        _check_defaults(KerasDefaults(), x, mask, k, sign, kw, rng, shape)


def _check_defaults(defaults, x, mask, k, sign, kw, rng, shape):
    a = NB.select(x, mask, k, sign=sign, **kw)
    b = defaults.select(_tensor(x), _tensor(mask), k, sign=sign, **kw)
    assert np.array_equal(a, _host(b))
    axis = int(rng.integers(len(shape)))
    ks = np.array([rng.integers(0, c + 1) for c in NB.unit_count(mask, axis, True)])
    a = NB.select_per_unit(x, mask, ks, axis=axis, **kw)
    b = defaults.select_per_unit(_tensor(x), _tensor(mask), ks, axis=axis, **kw)
    assert np.array_equal(a, _host(b))
    assert defaults.count_positive(_tensor(x), _tensor(mask)) == NB.count_positive(x, mask)
    assert np.array_equal(
        _host(defaults.apply(_tensor(x), _tensor(mask), _tensor(~mask | (x > 0)))),
        NB.apply(x, mask, ~mask | (x > 0)),
    )


def test_an_update_on_keras_primitives_alone_equals_numpy():
    rng = np.random.default_rng(4)
    layers = []
    for i, shape in enumerate([(9, 4), (3, 3, 2, 4)]):
        mask = rng.random(shape) < 0.4
        weight = (rng.standard_normal(shape) * mask).astype(np.float32)
        momentum = rng.integers(-2, 3, size=shape).astype(np.float32)  # ties
        layers.append(Layer(f"l{i}", weight, mask, momentum, axis=len(shape) - 1))
    tensors = [
        Layer(x.name, _tensor(x.weight), _tensor(x.mask), _tensor(x.momentum), axis=x.axis)
        for x in layers
    ]
    for options in (dict(), dict(prune="SET", growth="random"), dict(growth="momentum_neuron")):
        ref = sparsecore.update(layers, prune_rate=0.5, **options)
        with wide_scope():
            out = sparsecore.update(tensors, prune_rate=0.5, backend=KerasDefaults(), **options)
        for a, b in zip(ref.masks, out.masks):
            assert np.array_equal(a, _host(b))
