"""The Numba backend's fused update equals the NumPy reference's generic update, bit for bit.

The fused path (magnitude pruning + momentum growth, any built-in redistribution) reads each layer
twice and decides pruning and growth in one pass, resolving only the positions near the sampled
boundaries. Whatever the sample guessed, the masks, the new weights and the report must be those
of the generic path; bad inputs must raise the generic path's error and change nothing. Every
internal way through (all decided, resolved, prune-interval miss, growth-interval miss, several
chunks, the refining sample) is forced on small arrays through the backend's options or by
handing it deliberately wrong intervals.
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
from sparsecore.errors import SparseCoreError
from sparsecore.numba_backend import BufferPool, NumbaBackend, fused, warm_up
from sparsecore.numba_backend import backend as numba_class

REFERENCE = NumpyBackend()
VARIANTS = {
    "default": NumbaBackend(),
    # several chunks per layer, and the refining dense sample on small layers
    "chunked_dense": NumbaBackend(min_chunk=64, dense_min=64, parallel_min=0),
    # no sample: every candidate is left to the resolution
    "open": NumbaBackend(sampled=False, min_chunk=64, parallel_min=0),
    # zero-width intervals: the sample misses most of the time and the exact fallback runs
    "narrow": NumbaBackend(spread=(0.0, 0.0), min_chunk=64, dense_min=64, parallel_min=0),
}
DTYPES = [np.float16, np.float32, np.float64]
REDISTRIBUTION = ["momentum", "magnitude", "nonzero", "none"]
SETTINGS = settings(
    max_examples=int(os.environ.get("SPARSECORE_MAX_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- strategies ----------------------------------------------------------------------------------


@st.composite
def values(draw, size: int, dtype: Any) -> tuple[np.ndarray, bool]:
    """Values and whether float64 sums of their magnitudes are exact in any order.

    Normal values, tie-heavy small integers and halves (with -0.0), or all zeros.
    """
    kind = draw(st.sampled_from(["normal", "small", "zeros"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "normal":
        out = rng.standard_normal(size)
    elif kind == "small":
        out = rng.integers(-4, 5, size) / 2.0
        out[rng.random(size) < 0.2] = -0.0
    else:
        out = np.zeros(size)
    return out.astype(dtype), kind != "normal"


@st.composite
def layer_sets(draw) -> tuple[list[sc.Layer], bool]:
    """One to four layers of 1..10^4 weights (empty, full and random masks; float16/32/64,
    sometimes weight and momentum of different precisions) and whether their sums are exact."""
    dtype = draw(st.sampled_from(DTYPES))
    mixed = draw(st.booleans())
    layers, exact = [], True
    for i in range(draw(st.integers(1, 4))):
        shape = (draw(st.integers(1, 40)), draw(st.sampled_from([1, 3, 17, 250])))
        size = math.prod(shape)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        density = draw(st.sampled_from([0.0, 1.0, 0.05, 0.3, 0.7]))
        mask = (rng.random(shape) < density) if 0 < density < 1 else np.full(shape, density > 0)
        weight, w_exact = draw(values(size, dtype))
        momentum, p_exact = draw(values(size, np.float32 if mixed else dtype))
        exact = exact and w_exact and p_exact
        layers.append(
            sc.Layer(f"layer{i}", weight.reshape(shape) * mask, mask, momentum.reshape(shape))
        )
    return layers, exact


def snapshot(layers: list[sc.Layer]) -> list[bytes]:
    return [a.tobytes() for x in layers for a in (x.weight, x.mask, x.momentum)]


def assert_same_as_reference(
    layers: list[sc.Layer], backend: NumbaBackend, exact: bool, **options: Any
) -> sc.UpdateResult:
    """The fused update against NumPy's generic update followed by NumPy's apply."""
    before = snapshot(layers)
    want = sc.update(layers, backend=REFERENCE, **options)
    want_weights = sc.apply_masks(layers, want.masks, backend=REFERENCE)
    got = sc.update(layers, backend=backend, **options)
    assert snapshot(layers) == before, "the update changed its inputs"
    assert got.weights is not None, "the Numba backend did not take the fused path"
    for layer, m_want, m_got, w_want, w_got in zip(
        layers, want.masks, got.masks, want_weights, got.weights
    ):
        assert m_got.dtype == np.bool_ and m_got.shape == layer.mask.shape
        assert np.array_equal(m_got, m_want), f"{layer.name}: masks differ ({options})"
        assert w_got.dtype == layer.weight.dtype and w_got.shape == layer.weight.shape
        assert w_got.tobytes() == w_want.tobytes(), f"{layer.name}: weights differ ({options})"
    if exact:  # sums of these values are exact in any order: the whole report is identical
        assert got.report == want.report
    else:
        for have, ref in zip(got.report.layers, want.report.layers):
            assert math.isclose(have.importance, ref.importance, rel_tol=1e-12, abs_tol=0.0)
            assert math.isclose(have.share, ref.share, rel_tol=1e-12, abs_tol=1e-300)
            same = {k: v for k, v in vars(have).items() if k not in ("importance", "share")}
            assert same == {k: v for k, v in vars(ref).items() if k not in ("importance", "share")}
    return got


# -- equality with the reference -----------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
@SETTINGS
@given(
    data=layer_sets(),
    redistribution=st.sampled_from(REDISTRIBUTION),
    rate=st.sampled_from([0.0, 0.1, 0.5, 0.97, 1.0]),
    densities=st.sampled_from([(0.0, 1.0), (0.0, 0.5), (0.2, 1.0), (0.3, 0.6)]),
    seed=st.integers(0, 2**31 - 1),
    update_index=st.integers(1, 50),
)
def test_fused_update_equals_numpy(
    variant, data, redistribution, rate, densities, seed, update_index
):
    layers, exact = data
    min_density, max_density = densities
    options = dict(
        prune_rate=rate, update_index=update_index, seed=seed, redistribution=redistribution,
        min_density=min_density, max_density=max_density,
    )  # fmt: skip
    try:
        sc.update(layers, backend=REFERENCE, **options)
    except SparseCoreError as err:  # e.g. max_density leaves no room: same error, same message
        with pytest.raises(SparseCoreError) as got:
            sc.update(layers, backend=VARIANTS[variant], **options)
        assert str(got.value) == str(err)
        return
    assert_same_as_reference(layers, VARIANTS[variant], exact, **options)


@st.composite
def intervals(draw, width: int) -> tuple[int, int, int, int]:
    """Any (plo, phi, glo, ghi) with plo <= phi and glo <= ghi, often near the data."""
    top = 1 << 63
    near = st.one_of(
        st.integers(0, top),
        st.integers(0, (1 << (width - 1)) - 1),
        st.sampled_from([0, 1, 0x3C00, 0x3F800000, 0x3FF0000000000000, top]),
    )
    a, b, c, d = (draw(near) for _ in range(4))
    return min(a, b), max(a, b), min(c, d), max(c, d)


@SETTINGS
@given(data=layer_sets(), choice=st.data(), rate=st.sampled_from([0.1, 0.5, 1.0]))
def test_any_interval_gives_the_exact_result(data, choice, rate):
    """The sampled intervals are only a guess: hand the kernels arbitrary ones (too wide, too
    narrow, empty, missing the boundary on either side) and the result must not change."""
    layers, exact = data
    width = 8 * layers[0].weight.dtype.itemsize
    bounds = choice.draw(intervals(width))

    def guess(*args: Any) -> tuple[int, int, int, int]:
        return bounds

    backend = NumbaBackend(min_chunk=64, parallel_min=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_class, "_fused_bounds", guess)
        assert_same_as_reference(layers, backend, exact, prune_rate=rate, seed=3)


def test_every_path_is_taken():
    """All decided, resolved, and both misses (each then selected exactly), on real data."""
    rng = np.random.default_rng(0)
    layers = []
    for i, shape in enumerate([(64, 300), (40, 17), (7, 3)]):
        mask = rng.random(shape) < 0.3
        weight = (rng.standard_normal(shape) * mask).astype(np.float32)
        layers.append(
            sc.Layer(f"l{i}", weight, mask, rng.standard_normal(shape).astype(np.float32))
        )
    cases = [
        (NumbaBackend(), 0.0, "decided"),  # nothing pruned, nothing to grow: no boundary
        (NumbaBackend(min_chunk=64, dense_min=64, parallel_min=0), 0.5, "resolved"),
    ]
    for backend, rate, path in cases:
        assert_same_as_reference(layers, backend, False, prune_rate=rate)
        assert backend.fused_paths[path] > 0, backend.fused_paths
    top = 1 << 63
    misses = {
        "prune_miss": (top, top, 0, top),  # every active weight "surely pruned": too many
        "grow_miss": (0, top, top, top),  # no growth candidate left open: too few
    }
    for path, bounds in misses.items():
        backend = NumbaBackend(min_chunk=64, parallel_min=0)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(numba_class, "_fused_bounds", lambda *args, b=bounds: b)
            assert_same_as_reference(layers, backend, False, prune_rate=0.5)
        assert backend.fused_paths[path] > 0, backend.fused_paths


def test_all_zero_momentum_ties_by_hash_on_a_large_layer():
    """Every inactive position ties on |p| = 0: growth is decided by the position hash, through
    the sampled, refined and resolved path of a layer above every size threshold."""
    rng = np.random.default_rng(1)
    shape = (256, 512)
    mask = rng.random(shape) < 0.1
    weight = (rng.integers(-3, 4, shape) * mask).astype(np.float32)  # ties when pruning too
    layer = sc.Layer("big", weight, mask, np.zeros(shape, np.float32))
    backend = NumbaBackend()
    got = assert_same_as_reference([layer], backend, True, prune_rate=0.5, update_index=4)
    assert backend.fused_paths["resolved"] == 1
    assert got.report.layers[0].grown > 0


def test_large_layers_resolve_without_falling_back():
    """Real sizes (two chunks, refined intervals): the sample brackets the boundary."""
    rng = np.random.default_rng(7)
    layers = []
    for i, shape in enumerate([(512, 256, 3, 3), (1000, 2048)]):
        mask = rng.random(shape) < 0.1
        weight = (rng.standard_normal(shape) * mask).astype(np.float32)
        layers.append(
            sc.Layer(f"big{i}", weight, mask, rng.standard_normal(shape).astype(np.float32))
        )
    backend = NumbaBackend()
    assert_same_as_reference(layers, backend, False, prune_rate=0.5, update_index=3, seed=11)
    assert backend.fused_paths == {"decided": 0, "resolved": 2, "prune_miss": 0, "grow_miss": 0}


# -- bad inputs -----------------------------------------------------------------------------------


def small_layers(dtype: Any = np.float32) -> list[sc.Layer]:
    rng = np.random.default_rng(2)
    layers = []
    for i, shape in enumerate([(30, 40), (20, 10), (9, 9)]):
        mask = rng.random(shape) < 0.3
        weight = (rng.standard_normal(shape) * mask).astype(dtype)
        layers.append(sc.Layer(f"l{i}", weight, mask, rng.standard_normal(shape).astype(dtype)))
    return layers


def assert_same_error(layers: list[sc.Layer], **options: Any) -> str:
    """Both paths raise the same error, and neither changes a thing."""
    before = snapshot(layers)
    with pytest.raises(SparseCoreError) as want:
        sc.update(layers, backend=REFERENCE, prune_rate=0.5, **options)
    for backend in VARIANTS.values():
        with pytest.raises(SparseCoreError) as got:
            sc.update(layers, backend=backend, prune_rate=0.5, **options)
        assert type(got.value) is type(want.value)
        assert str(got.value) == str(want.value)
    assert snapshot(layers) == before
    return str(want.value)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["active weight", "inactive weight", "momentum"])
def test_non_finite_inputs_raise_the_generic_error(dtype, bad, where):
    layers = small_layers(dtype)
    target = layers[1]
    if where == "momentum":
        target.momentum[3, 4] = bad
    else:
        position = np.argwhere(target.mask if where == "active weight" else ~target.mask)[0]
        target.weight[tuple(position)] = bad
    message = assert_same_error(layers)
    assert "'l1'" in message and ("momentum" if where == "momentum" else "weight") in message


def test_the_first_bad_layer_is_named_whatever_the_fused_passes_see_first():
    """The fused path finds a NaN momentum (pass 1) before a NaN weight (pass 2); the generic
    order (layer by layer, weight before momentum) decides which one the error names."""
    layers = small_layers()
    layers[2].momentum[0, 0] = np.nan
    layers[1].weight[0, 0] = np.inf
    assert "'l1': weight" in assert_same_error(layers)
    layers = small_layers()
    layers[0].weight[5, 5] = np.nan  # a NaN weight, then a layer of the wrong shape
    layers[2] = sc.Layer("l2", layers[2].weight, layers[2].mask, np.zeros((3, 3), np.float32))
    assert "'l0': weight" in assert_same_error(layers)


def test_nan_weight_is_reported_before_a_budget_error():
    """max_density leaves no room for the pruned weights (a host-side error after pass 1), but
    a NaN weight, which the generic path checks first, is what is reported."""
    layers = small_layers()
    layers[1].weight[0, 0] = np.nan
    assert "'l1': weight" in assert_same_error(layers, redistribution="none", max_density=0.05)
    layers[1].weight[0, 0] = 0.0
    assert "max_density" in assert_same_error(layers, redistribution="none", max_density=0.05)


# -- when the fused path runs ---------------------------------------------------------------------


def test_only_the_builtin_modes_take_the_fused_path():
    layers = small_layers()
    backend = NumbaBackend()
    assert sc.update(layers, prune_rate=0.5, backend=backend).weights is not None
    for options in ({"growth": "random"}, {"prune": "SET"}, {"growth": "momentum_neuron"}):
        assert sc.update(layers, prune_rate=0.5, backend=backend, **options).weights is None
    assert sc.update(layers, prune_rate=0.5, backend=NumbaBackend(fused=False)).weights is None
    assert sc.update(layers, prune_rate=0.5, backend=REFERENCE).weights is None
    assert not REFERENCE.supports_fused_update


def test_a_mode_registered_over_a_builtin_name_takes_the_generic_path():
    from sparsecore.modes import PRUNE

    builtin = PRUNE["magnitude"]
    calls = []

    def counting_prune(backend, layer, rate, max_prune, key):
        calls.append(layer.name)
        return builtin(backend, layer, rate, max_prune, key)

    sc.register_prune("magnitude")(counting_prune)
    try:
        result = sc.update(small_layers(), prune_rate=0.5, backend=NumbaBackend())
    finally:
        sc.register_prune("magnitude")(builtin)
    assert result.weights is None and calls == ["l0", "l1", "l2"]


def test_engine_passes_the_new_weights_through():
    layers = small_layers()
    names = [x.name for x in layers]
    config = sc.SparseConfig.from_options(recipe="paper", density=0.3)  # the fused modes
    engine = sc.SparseEngine(config, names, [x.weight.shape for x in layers])
    masks = engine.initial_masks()
    layers = [sc.Layer(x.name, x.weight * m, m, x.momentum) for x, m in zip(layers, masks)]
    result = engine.update(layers, step=1, backend=NumbaBackend(), prune_rate=0.5)
    assert result.weights is not None
    want = sc.apply_masks(layers, result.masks, backend=REFERENCE)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(result.weights, want))


# -- output buffers -------------------------------------------------------------------------------


def test_results_held_by_the_caller_are_never_reused():
    """Updates reuse released output arrays; arrays the caller still holds stay as they were."""
    backend = NumbaBackend()
    first_layers = small_layers()
    first = sc.update(first_layers, prune_rate=0.5, backend=backend)
    kept = [a.copy() for a in first.masks + first.weights]
    for seed in range(4):  # different results, same shapes: the pool is asked for the same sizes
        layers = small_layers()
        for x in layers:
            x.momentum[...] = np.random.default_rng(seed).standard_normal(x.momentum.shape)
        sc.update(layers, prune_rate=0.5, backend=backend, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(first.masks + first.weights, kept))


def test_buffer_pool_hands_out_only_unreferenced_arrays():
    pool = BufferPool()
    dtype = np.dtype(np.float32)
    with pool.update():
        a = pool.take(10, dtype)
        b = pool.take(10, dtype)
    assert a is not b
    view = a.reshape(2, 5)
    b_id = id(b)
    del a, b
    with pool.update():
        c = pool.take(10, dtype)  # a is still referenced through its view: b is free
    assert id(c) == b_id and c.base is None
    del view, c
    with pool.update():
        d = pool.take(10, dtype)
        e = pool.take(10, dtype)
        f = pool.take(10, dtype)
    assert len({id(d), id(e), id(f)}) == 3
    with pool.update():  # a later update that takes one: keeps at most two of this kind
        pool.take(10, dtype)
    assert len(pool._arrays[(10, dtype.str)]) <= 2


def test_warm_up_compiles_the_fused_kernels():
    warm_up()
    kernels = (fused._chunk_scan, fused._fused_bounds, fused._chunk_decide, fused._fused_resolve)
    for kernel in kernels:
        assert kernel.signatures, kernel
