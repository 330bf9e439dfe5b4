"""Every array layout the Numba backend accepts gives the NumPy reference's result.

The Numba kernels read raw bits. Floats in the other byte order, boolean masks whose bytes are
not 0/1 (NumPy reads any nonzero byte as True), read-only, strided, Fortran-order and 0-d arrays
must all give what NumPy gives on the same arrays, through the whole update (fused and generic)
and through each backend operation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sparsecore as sc
from sparsecore.backend_numpy import NumpyBackend
from sparsecore.hashing import HashKey
from sparsecore.numba_backend import NumbaBackend

REFERENCE = NumpyBackend()
VARIANTS = {
    "fused": NumbaBackend(),
    "fused_chunked": NumbaBackend(small_layer=0, min_chunk=64, parallel_min=0),
    "generic_chunked": NumbaBackend(fused=False, small_layer=0, min_chunk=64, parallel_min=0),
}
LAYOUTS = ("other_byte_order", "bool_bytes", "read_only", "strided", "fortran")


def _other_order(a: np.ndarray) -> np.ndarray:
    """The same values stored in the byte order this machine does not use."""
    return a.astype(a.dtype.newbyteorder("S"))


def relayout(a: np.ndarray, layouts: frozenset[str], rng: np.random.Generator) -> np.ndarray:
    """The same values in the given layouts (a new array; ``a`` is left alone)."""
    out = np.array(a, copy=True)
    if "bool_bytes" in layouts and out.dtype == bool:
        raw = out.view(np.uint8) * rng.integers(1, 256, out.shape).astype(np.uint8)
        out = raw.view(bool)  # True positions hold bytes 1..255
    if "other_byte_order" in layouts and out.dtype.kind == "f":
        out = _other_order(out)
        assert not out.dtype.isnative
    if "fortran" in layouts and out.ndim >= 2:
        out = np.asfortranarray(out)
    if "strided" in layouts and out.ndim >= 1:
        wide = np.zeros((*out.shape[:-1], 2 * out.shape[-1]), dtype=out.dtype)
        wide[..., ::2] = out
        out = wide[..., ::2]
        assert not out.flags.c_contiguous or out.shape[-1] <= 1
    if "read_only" in layouts:
        out.flags.writeable = False
    return out


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    layouts = frozenset(draw(st.sets(st.sampled_from(LAYOUTS), min_size=1)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    layers, plain = [], []
    for i in range(draw(st.integers(1, 3))):
        shape = (draw(st.integers(1, 30)), draw(st.sampled_from([1, 7, 40])))
        mask = rng.random(shape) < draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
        weight = (rng.standard_normal(shape) * mask).astype(dtype)
        momentum = rng.standard_normal(shape).astype(dtype)
        momentum[rng.random(shape) < 0.2] = 0.0  # ties
        grad = rng.standard_normal(shape).astype(dtype)
        plain.append(sc.Layer(f"l{i}", weight, mask, momentum, grad))
        layers.append(
            sc.Layer(f"l{i}", *(relayout(a, layouts, rng) for a in (weight, mask, momentum, grad)))
        )
    return layers, plain, layouts


def _assert_same(got: Any, want: Any, plain_want: Any) -> None:
    for have, ref, ref_plain in zip(got.masks, want.masks, plain_want.masks):
        assert have.dtype == np.bool_
        assert np.array_equal(have, ref) and np.array_equal(ref, ref_plain)
    for have, ref in zip(got.report.layers, want.report.layers):
        assert math.isclose(have.importance, ref.importance, rel_tol=1e-12, abs_tol=0.0)
        assert (have.pruned, have.grown, have.net_pruned, have.net_grown) == (
            ref.pruned,
            ref.grown,
            ref.net_pruned,
            ref.net_grown,
        )


@pytest.mark.parametrize("variant", list(VARIANTS))
@given(
    case=cases(),
    growth=st.sampled_from(["momentum", "gradient", "momentum_neuron", "random"]),
    prune=st.sampled_from(["magnitude", "SET"]),
    rate=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_update_on_any_layout_equals_numpy(variant, case, growth, prune, rate):
    layers, plain, _ = case
    before = [np.array(layer.mask, copy=True) for layer in layers]
    options: dict[str, Any] = dict(prune_rate=rate, growth=growth, prune=prune, seed=5)
    want = sc.update(layers, backend=REFERENCE, **options)
    plain_want = sc.update(plain, backend=REFERENCE, **options)
    got = sc.update(layers, backend=VARIANTS[variant], **options)
    _assert_same(got, want, plain_want)
    for layer, old in zip(layers, before):  # the inputs were read, never written
        assert np.array_equal(layer.mask.view(np.uint8), old.view(np.uint8))
    applied = sc.apply_masks(layers, got.masks, backend=VARIANTS[variant])
    reference = sc.apply_masks(plain, got.masks, backend=REFERENCE)
    for have, ref in zip(applied, reference):
        assert np.array_equal(have, ref) and not np.signbit(have[have == 0]).any()


@given(case=cases(), k=st.integers(0, 50))
def test_every_operation_on_any_layout_equals_numpy(case, k):
    layers, _, _ = case
    be = NumbaBackend(small_layer=0, min_chunk=64, parallel_min=0)
    key = HashKey(1, 2, 3)
    for layer in layers:
        w, m, p = layer.weight, layer.mask, layer.momentum
        for among, largest, magnitude in [(True, False, True), (False, True, True)]:
            opts: dict[str, Any] = dict(
                among_active=among, largest=largest, magnitude=magnitude, key=key
            )
            assert np.array_equal(be.select(p, m, k, **opts), REFERENCE.select(p, m, k, **opts))
        assert np.array_equal(
            be.select(w, m, k, among_active=True, largest=False, magnitude=False, key=key,
                      sign="positive"),
            REFERENCE.select(w, m, k, among_active=True, largest=False, magnitude=False, key=key,
                             sign="positive"),
        )  # fmt: skip
        assert be.count(m) == REFERENCE.count(m)
        assert be.count_positive(w, m) == REFERENCE.count_positive(w, m)
        assert math.isclose(be.abs_sum(p, m), REFERENCE.abs_sum(p, m), rel_tol=1e-12)
        assert math.isclose(be.abs_sum(p, None), REFERENCE.abs_sum(p, None), rel_tol=1e-12)
        assert np.array_equal(be.and_not(m, ~m), REFERENCE.and_not(m, ~m))
        assert np.array_equal(be.and_not(m, m), np.zeros(m.shape, bool))
        assert np.array_equal(be.apply(w, m, m), REFERENCE.apply(w, m, m))
        ks = np.minimum(REFERENCE.unit_count(m, 0, False), 2)
        unit_opts: dict[str, Any] = dict(
            axis=0, among_active=False, largest=True, magnitude=True, key=key
        )
        assert np.array_equal(
            be.select_per_unit(p, m, ks, **unit_opts),
            REFERENCE.select_per_unit(p, m, ks, **unit_opts),
        )


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_found_in_the_other_byte_order(dtype, bad):
    x = np.ones(300, dtype=dtype)
    x[123] = bad
    swapped = _other_order(x)
    assert not NumbaBackend().all_finite(swapped) and not REFERENCE.all_finite(swapped)
    assert NumbaBackend().all_finite(_other_order(np.ones(300, dtype=dtype)))
    mask = np.ones(300, bool)
    layer = sc.Layer("w", swapped, mask, _other_order(np.ones(300, dtype=dtype)))
    for backend in (REFERENCE, NumbaBackend()):
        with pytest.raises(sc.NonFiniteError, match="layer 'w': weight contains NaN or Inf"):
            sc.update([layer], prune_rate=0.5, backend=backend)


def test_zero_dimensional_arrays():
    """0-d arrays: each operation agrees with NumPy; as a layer they are refused clearly."""
    be, key = NumbaBackend(), HashKey(0, 1, 0)
    for value in (np.float32(-2.5), np.float64(0.0), np.float16(3.0)):
        x = np.array(value)
        for active in (np.array(True), np.array(False)):
            for k in (0, 1):
                opts: dict[str, Any] = dict(
                    among_active=True, largest=False, magnitude=True, key=key
                )
                have = be.select(x, active, k, **opts)
                assert have.shape == () and have == REFERENCE.select(x, active, k, **opts)
            assert be.abs_sum(x, active) == REFERENCE.abs_sum(x, active)
            assert be.count_positive(x, active) == REFERENCE.count_positive(x, active)
            assert np.array_equal(be.apply(x, active, active), REFERENCE.apply(x, active, active))
            assert be.and_not(active, ~active) == REFERENCE.and_not(active, ~active)
        assert be.all_finite(x) and not be.all_finite(np.array(np.nan, dtype=x.dtype))
    layer = sc.Layer("scalar", np.array(1.0), np.array(True), np.array(1.0))
    for backend in ("numpy", "numba"):
        with pytest.raises(sc.SparseCoreError, match=r"layer 'scalar': weight of shape \(\)"):
            sc.update([layer], prune_rate=0.5, backend=backend)
