"""TorchBackend equals the NumPy reference: importance to 1e-12 relative, masks bit for bit.

Inputs are tie-heavy on purpose (small integer weights, all-zero or integer momentum, float16),
because ties at the selection boundary are where a backend most easily differs. The whole-update
property test and the large-layer paths (shortlists, sampled brackets, word-wise counts, chunked
sums) also run on CUDA where a GPU is present: the same code takes other kernels there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from minimal_backend import defaults_only
from subprocesses import run_python

from sparsecore import HashKey, Layer, get_backend, new_weights, update
from sparsecore.modes import IMPORTANCE
from sparsecore.torch.backend import TorchBackend

# TorchBackend's primitives under the interface's defaults: its own operations set aside
TorchDefaults = defaults_only(TorchBackend)

PRUNES = ["magnitude", "SET"]
GROWTHS = ["momentum", "random", "gradient", "momentum_neuron"]
REDISTRIBUTIONS = ["momentum", "magnitude", "nonzero", "none"]
DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

SHAPES = [(6, 5), (4, 2, 3, 3), (9, 4), (3, 7, 2), (1, 12)]


def _values(rng: np.random.Generator, shape, kind: str, dtype) -> np.ndarray:
    if kind == "ints":
        return rng.integers(-3, 4, size=shape).astype(dtype)
    if kind == "zeros":
        return np.zeros(shape, dtype=dtype)
    if kind == "few":  # two distinct magnitudes: ties everywhere
        return (rng.choice([-1.0, 0.5, 1.0, -0.0], size=shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@st.composite
def layer_sets(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n_layers = draw(st.integers(1, 3))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    w_kind = draw(st.sampled_from(["ints", "few", "normal"]))
    p_kind = draw(st.sampled_from(["ints", "zeros", "few", "normal"]))
    density = draw(st.sampled_from([0.0, 0.1, 0.4, 0.9, 1.0]))
    layers = []
    for i in range(n_layers):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        mask = rng.random(shape) < density
        weight = (_values(rng, shape, w_kind, dtype) * mask).astype(dtype)
        momentum = _values(rng, shape, p_kind, dtype)
        momentum[rng.random(shape[0]) < 0.3] = 0  # silent units: dead, for revival
        grad = _values(rng, shape, w_kind, dtype)
        layers.append(Layer(f"layer{i}", weight, mask, momentum, grad, axis=0))
    return layers


def _to_torch(layers, device="cpu"):
    return [
        Layer(
            layer.name,
            torch.from_numpy(layer.weight).to(device),
            torch.from_numpy(layer.mask).to(device),
            torch.from_numpy(layer.momentum).to(device),
            torch.from_numpy(layer.grad).to(device),
            axis=layer.axis,
        )
        for layer in layers
    ]


@settings(max_examples=40, deadline=None)
@given(
    layers=layer_sets(),
    prune=st.sampled_from(PRUNES),
    growth=st.sampled_from(GROWTHS),
    redistribution=st.sampled_from(REDISTRIBUTIONS),
    rate=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    u=st.integers(1, 50),
    revive=st.booleans(),
    ablate_below=st.sampled_from([0.0, 0.5, 1.0]),
)
@pytest.mark.parametrize("device", DEVICES)
def test_update_equals_numpy_reference(
    device, layers, prune, growth, redistribution, rate, u, revive, ablate_below
):
    kwargs = dict(
        prune_rate=rate,
        update_index=u,
        seed=7,
        prune=prune,
        growth=growth,
        redistribution=redistribution,
        revive_dead_units=revive,
        ablate_below=ablate_below,
    )
    ref = update(layers, backend="numpy", **kwargs)
    torch_layers = _to_torch(layers, device)
    out = update(torch_layers, backend=TorchBackend(), **kwargs)
    # the new weights, revived ones included, bit for bit
    for a, b in zip(new_weights(layers, ref), new_weights(torch_layers, out, TorchBackend())):
        np.testing.assert_array_equal(a.view(np.uint8), b.cpu().numpy().view(np.uint8))
    for a, b, layer in zip(ref.masks, out.masks, layers):
        assert isinstance(b, torch.Tensor) and b.dtype == torch.bool
        assert b.device.type == device
        np.testing.assert_array_equal(a, b.cpu().numpy(), err_msg=layer.name)
    for ra, rb in zip(ref.report.layers, out.report.layers):
        assert (ra.pruned, ra.grown, ra.net_pruned, ra.net_grown) == (
            rb.pruned,
            rb.grown,
            rb.net_pruned,
            rb.net_grown,
        )
        assert (ra.units, ra.dead_units, ra.revived, ra.ablated) == (
            rb.units,
            rb.dead_units,
            rb.revived,
            rb.ablated,
        )
        assert math.isclose(ra.importance, rb.importance, rel_tol=1e-12, abs_tol=0.0)


@settings(max_examples=20, deadline=None)
@given(
    layers=layer_sets(),
    prune=st.sampled_from(PRUNES),
    growth=st.sampled_from(GROWTHS),
    redistribution=st.sampled_from(REDISTRIBUTIONS),
    rate=st.sampled_from([0.2, 0.5, 1.0]),
    revive=st.booleans(),
)
def test_the_defaults_on_torch_primitives_equal_the_reference(
    layers, prune, growth, redistribution, rate, revive
):
    """The update written once on the required primitives, run on torch's: the masks and
    weights of the NumPy reference, bit for bit."""
    kwargs = dict(
        prune_rate=rate, seed=5, prune=prune, growth=growth, redistribution=redistribution,
        revive_dead_units=revive,
    )  # fmt: skip
    ref = update(layers, backend="numpy", **kwargs)
    torch_layers = _to_torch(layers)
    backend = TorchDefaults()
    out = update(torch_layers, backend=backend, **kwargs)
    for a, b in zip(ref.masks, out.masks):
        np.testing.assert_array_equal(a, b.numpy())
    for a, b in zip(new_weights(layers, ref), new_weights(torch_layers, out, backend)):
        np.testing.assert_array_equal(a.view(np.uint8), b.numpy().view(np.uint8))


@settings(max_examples=30, deadline=None)
@given(layers=layer_sets(), mode=st.sampled_from(["momentum", "magnitude", "nonzero"]))
def test_importance_to_1e12(layers, mode):
    np_be, t_be = get_backend("numpy"), TorchBackend()
    for layer, tl in zip(layers, _to_torch(layers)):
        nnz = int(layer.mask.sum())
        a = IMPORTANCE[mode](np_be, layer, nnz)
        b = IMPORTANCE[mode](t_be, tl, nnz)
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


@settings(max_examples=40, deadline=None)
@given(
    layers=layer_sets(),
    k_frac=st.floats(0, 1),
    among_active=st.booleans(),
    largest=st.booleans(),
    magnitude=st.booleans(),
    sign=st.sampled_from(["any", "positive", "nonpositive"]),
)
@pytest.mark.parametrize("backend", [TorchBackend, TorchDefaults], ids=["own", "defaults"])
def test_select_equals_reference(backend, layers, k_frac, among_active, largest, magnitude, sign):
    np_be, t_be = get_backend("numpy"), backend()
    layer = layers[0]
    flat = layer.weight.reshape(-1)
    cand = layer.mask.reshape(-1) if among_active else ~layer.mask.reshape(-1)
    if sign == "positive":
        cand = cand & (flat > 0)
    elif sign == "nonpositive":
        cand = cand & ~(flat > 0)
    k = int(k_frac * int(cand.sum()))
    key = HashKey(3, 2, 1)
    kw = dict(among_active=among_active, largest=largest, magnitude=magnitude, key=key, sign=sign)
    a = np_be.select(layer.weight, layer.mask, k, **kw)
    b = t_be.select(torch.from_numpy(layer.weight), torch.from_numpy(layer.mask), k, **kw)
    np.testing.assert_array_equal(a, b.numpy())
    assert int(b.sum()) == k


@settings(max_examples=30, deadline=None)
@given(layers=layer_sets(), largest=st.booleans(), axis=st.sampled_from([0, -1]))
@pytest.mark.parametrize("backend", [TorchBackend, TorchDefaults], ids=["own", "defaults"])
def test_select_per_unit_equals_reference(backend, layers, largest, axis):
    np_be, t_be = get_backend("numpy"), backend()
    layer = layers[0]
    free = np_be.unit_count(layer.mask, axis, active=False)
    rng = np.random.default_rng(int(free.sum()))
    ks = np.array([rng.integers(0, f + 1) for f in free], dtype=np.int64)
    kw = dict(axis=axis, among_active=False, largest=largest, magnitude=True, key=HashKey(1, 1, 0))
    a = np_be.select_per_unit(layer.momentum, layer.mask, ks, **kw)
    b = t_be.select_per_unit(
        torch.from_numpy(layer.momentum), torch.from_numpy(layer.mask), ks, **kw
    )
    np.testing.assert_array_equal(a, b.numpy())
    np.testing.assert_array_equal(
        t_be.unit_count(torch.from_numpy(layer.mask), axis, active=True),
        np_be.unit_count(layer.mask, axis, active=True),
    )
    np.testing.assert_allclose(
        t_be.unit_abs_sum(torch.from_numpy(layer.momentum), axis),
        np_be.unit_abs_sum(layer.momentum, axis),
        rtol=1e-12,
    )


@pytest.mark.parametrize("shape", [(7,), (5, 11), (3, 4, 5)])
def test_position_hash_bits_equal(shape):
    key = HashKey(123456789, 17, 4)
    a = get_backend("numpy").position_hash(key, np.zeros(shape))
    b = TorchBackend().position_hash(key, torch.zeros(shape))
    np.testing.assert_array_equal(a.astype(np.int64), b.numpy())


def test_bfloat16_matches_float32_reference():
    # NumPy has no bfloat16: its values are exactly representable in float32, so the float32
    # reference on the same values must give the same masks.
    rng = np.random.default_rng(0)
    w32 = torch.from_numpy(rng.integers(-4, 5, size=(12, 10)).astype(np.float32))
    p32 = torch.from_numpy(rng.integers(0, 3, size=(12, 10)).astype(np.float32))
    mask = torch.from_numpy(rng.random((12, 10)) < 0.3)
    w32 = w32 * mask
    layers_bf = [Layer("a", w32.bfloat16(), mask, p32.bfloat16())]
    layers_np = [Layer("a", w32.numpy(), mask.numpy(), p32.numpy())]
    ref = update(layers_np, prune_rate=0.5, update_index=2, backend="numpy")
    out = update(layers_bf, prune_rate=0.5, update_index=2, backend=TorchBackend())
    np.testing.assert_array_equal(ref.masks[0], out.masks[0].numpy())


def test_backend_is_found_for_tensors():
    from sparsecore import backend_for

    assert backend_for(torch.zeros(2)).name == "torch"


def test_the_core_finds_the_torch_backend_without_naming_it(tmp_path):
    """``import sparsecore`` alone: the torch backend comes from the package's entry point, by
    name and by tensor, and only then is sparsecore.torch imported."""
    code = (
        "import json, sys, torch, sparsecore\n"
        "before = 'sparsecore.torch' in sys.modules\n"
        "found = sparsecore.backend_for(torch.zeros(2)).name\n"
        "print(json.dumps([before, found, sparsecore.get_backend('torch').name,\n"
        "                  'sparsecore.torch' in sys.modules]))\n"
    )
    assert run_python(code, tmp_path) == [False, "torch", "torch", True]


def test_apply_keeps_weights_bit_for_bit_and_zeroes_the_rest():
    be = TorchBackend()
    w = torch.tensor([[-0.0, 1.5], [-2.0, 3.0]])
    old = torch.tensor([[True, True], [False, True]])
    new = torch.tensor([[True, False], [True, True]])
    out = be.apply(w, old, new)
    assert out.tolist() == [[0.0, 0.0], [0.0, 3.0]]
    assert not torch.signbit(out[1, 0]) and torch.signbit(out[0, 0])  # kept -0.0 bit for bit


@pytest.mark.parametrize("kind", ["normal", "ints", "zeros", "spiky", "float16"])
@pytest.mark.parametrize("k", [1, 37, 2000, 9000])
@pytest.mark.parametrize("device", DEVICES)
def test_large_layer_selection_equals_reference(device, kind, k):
    """Layers of >= 2**16 positions take the sampled-bound path of the boundary search."""
    rng = np.random.default_rng(k)
    shape = (300, 260)
    if kind == "ints":
        x = rng.integers(0, 3, size=shape).astype(np.float32)
    elif kind == "zeros":
        x = np.zeros(shape, dtype=np.float32)
    elif kind == "spiky":  # a few huge scores the strided sample is likely to miss
        x = rng.random(shape).astype(np.float32)
        x.reshape(-1)[rng.choice(x.size, 50, replace=False)] = 1e6
    elif kind == "float16":
        x = rng.standard_normal(shape).astype(np.float16)
    else:
        x = rng.standard_normal(shape).astype(np.float32)
    mask = rng.random(shape) < 0.05
    key = HashKey(5, 9, 2)
    for largest in (True, False):
        kw = dict(among_active=False, largest=largest, magnitude=True, key=key)
        a = get_backend("numpy").select(x, mask, k, **kw)
        t_x, t_mask = torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device)
        b = TorchBackend().select(t_x, t_mask, k, **kw)
        np.testing.assert_array_equal(a, b.cpu().numpy())


@pytest.mark.parametrize(
    "n", [1, 7, 2040, 2041, 65535, 65536, 65537, 81600, 81613, 235200, 10**6 + 3]
)
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("device", DEVICES)
def test_count_is_exact_on_every_layout(device: str, n: int, p: float) -> None:
    """The word-wise count (large contiguous masks) equals a plain count: chunk edges, tails,
    views that do not start on an 8-byte boundary, strided views."""
    g = torch.Generator().manual_seed(n)
    be = TorchBackend()
    mask = (torch.rand(n + 5, generator=g) < p).to(device)
    for view in (mask[:n], mask[3 : n + 3], mask[::2]):
        assert be.count(view) == int(torch.count_nonzero(view))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1 << 16, 150_000),
    values=st.sampled_from(["normal", "few", "ints", "zeros"]),
    mask_kind=st.sampled_from(["random", "blocks", "every_other_stride"]),
    density=st.sampled_from([0.02, 0.1, 0.5]),
    k_frac=st.sampled_from([0.0005, 0.01, 0.1, 0.2, 0.6]),
    among_active=st.booleans(),
    largest=st.booleans(),
)
@pytest.mark.parametrize("device", DEVICES)
def test_large_layer_selection_with_any_mask_layout_equals_reference(
    device, seed, n, values, mask_kind, density, k_frac, among_active, largest
):
    """Layers of 2**16 positions and more take the shortlist paths (a gathered set of few
    candidates, or a sampled bound for a small k of many); masks laid out in blocks or on the
    sample's own stride make the sampled bound miss, which must fall back, not go wrong."""
    rng = np.random.default_rng(seed)
    x = _values(rng, (n,), values, np.float32)
    if mask_kind == "random":
        mask = rng.random(n) < density
    elif mask_kind == "blocks":  # the inactive positions are one contiguous run
        mask = np.zeros(n, dtype=bool)
        mask[: int(density * n)] = True
        mask = np.roll(mask, int(rng.integers(n)))
    else:  # active exactly on the positions a strided sample reads
        mask = np.zeros(n, dtype=bool)
        mask[:: n // 4096] = True
    candidates = int(mask.sum()) if among_active else int((~mask).sum())
    k = int(k_frac * candidates)
    kw = dict(among_active=among_active, largest=largest, magnitude=True, key=HashKey(5, 1, 0))
    a = get_backend("numpy").select(x, mask, k, **kw)
    b = TorchBackend().select(
        torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device), k, **kw
    )
    np.testing.assert_array_equal(a, b.cpu().numpy())


@pytest.mark.parametrize("n", [2 * 16384, 2 * 16384 + 1, 235_207, 1_000_003])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_large_abs_sum_is_a_float64_sum(device, n, masked):
    """Large CPU tensors are summed in chunks (no whole float64 copy): still a float64 sum."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * rng.choice([1e-30, 1.0, 1e30], size=n)).astype(np.float32)
    mask = rng.random(n) < 0.3 if masked else None
    expected = get_backend("numpy").abs_sum(x, mask)
    got = TorchBackend().abs_sum(
        torch.from_numpy(x).to(device), None if mask is None else torch.from_numpy(mask).to(device)
    )
    assert math.isclose(got, expected, rel_tol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1 << 15, 120_000),
    kind=st.sampled_from(["normal", "ints", "zeros", "sample_misses"]),
    k_frac=st.floats(0.0, 1.0),
    largest=st.booleans(),
)
@pytest.mark.parametrize("device", DEVICES)
def test_kth_best_of_many_values_is_exact(device, seed, n, kind, k_frac, largest):
    """From 2**15 values on, the k-th best is searched inside a sampled bracket first; whatever
    the sample (ties everywhere, or the strided sample seeing only outliers), it is exact."""
    from sparsecore.torch.backend import _kth_best

    rng = np.random.default_rng(seed)
    if kind == "ints":
        x = rng.integers(0, 4, size=n).astype(np.float32)
    elif kind == "zeros":
        x = np.zeros(n, dtype=np.float32)
    elif kind == "sample_misses":  # every value the strided sample reads is an outlier
        x = rng.random(n).astype(np.float32)
        x[:: max(1, n // 4096)] = 1e6 if largest else -1e6
    else:
        x = rng.standard_normal(n).astype(np.float32)
    k = min(n, max(1, int(k_frac * n)))
    values = torch.from_numpy(x).to(device)
    expected = np.sort(x)[::-1][k - 1] if largest else np.sort(x)[k - 1]
    assert float(_kth_best(values, k, largest)) == float(expected)
