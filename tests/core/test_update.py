"""One mask update: hand-checked examples for every mode, invariants as properties, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from spec_model import brute_importance, brute_prune, brute_select, brute_split

import sparsecore as sc
from sparsecore import HashKey, Layer, SparseCoreError, layer_hash, update

f32 = np.float32


def layer_a() -> Layer:
    return Layer(
        "a",
        np.array([[0.1, -0.5, 0.3], [0.0, 0.0, 0.8]], f32),
        np.array([[1, 1, 1], [0, 0, 1]], bool),
        np.array([[0.0, 0.0, 0.0], [0.9, 0.2, 0.1]], f32),
    )


def layer_b() -> Layer:
    return Layer(
        "b",
        np.array([1, 2, 3, 4, 0, 0, 0, 0], f32).reshape(2, 4),
        np.array([1, 1, 1, 1, 0, 0, 0, 0], bool).reshape(2, 4),
        np.array([0.1, 0.1, 0.1, 0.1, 0.5, 0.4, 0.3, 0.2], f32).reshape(2, 4),
    )


def test_single_layer_magnitude_prune_momentum_growth() -> None:
    res = update([layer_a()], prune_rate=0.5)
    # prune round(0.5 * 4) = 2 smallest |w|: 0.1 and 0.3; regrow the 2 largest |P| among the
    # inactive positions: (1, 0) with 0.9 and (1, 1) with 0.2.
    assert res.masks[0].astype(int).tolist() == [[0, 1, 0], [1, 1, 1]]
    rep = res.report.layers[0]
    assert (rep.pruned, rep.grown, rep.net_pruned, rep.net_grown) == (2, 2, 2, 2)
    assert (rep.nnz_before, rep.nnz_after, rep.capacity) == (4, 4, 4)
    assert rep.importance == pytest.approx(0.1 / 4)


@pytest.mark.parametrize(
    ("redistribution", "budgets", "b_mask"),
    [
        # s = (0.025, 0.1) -> shares 0.2/0.8 -> ideal 0.8, 3.2 -> 0 + 3, leftover to the 0.8
        ("momentum", [1, 3], [0, 0, 1, 1, 1, 1, 1, 0]),
        # s = (4, 4) -> 2, 2
        ("nonzero", [2, 2], [0, 0, 1, 1, 1, 1, 0, 0]),
        # s = (0.425, 2.5) -> ideal 0.581, 3.419 -> 0 + 3, leftover to the .581
        ("magnitude", [1, 3], [0, 0, 1, 1, 1, 1, 1, 0]),
        # each layer regrows what it pruned
        ("none", [2, 2], [0, 0, 1, 1, 1, 1, 0, 0]),
    ],
)
def test_redistribution_modes_by_hand(
    redistribution: str, budgets: list[int], b_mask: list[int]
) -> None:
    res = update([layer_a(), layer_b()], prune_rate=0.5, redistribution=redistribution)
    assert [r.grown for r in res.report.layers] == budgets
    assert [r.pruned for r in res.report.layers] == [2, 2]
    assert res.masks[1].reshape(-1).astype(int).tolist() == b_mask
    # layer a grows by |P|: (1, 0) first, then (1, 1)
    expected_a = [[0, 1, 0], [1, 1, 1]] if budgets[0] == 2 else [[0, 1, 0], [1, 0, 1]]
    assert res.masks[0].astype(int).tolist() == expected_a


def test_set_prunes_each_sign_apart() -> None:
    w = np.array([0.01, 0.02, 0.03, -5.0, -6.0, -7.0], f32).reshape(2, 3)
    layer = Layer("s", w, np.ones((2, 3), bool), np.zeros((2, 3), f32))
    backend, key = sc.get_backend("numpy"), HashKey(0, 1, 0)
    magnitude = sc.modes.PRUNE["magnitude"](backend, layer, 0.5, 6, key)
    set_ = sc.modes.PRUNE["SET"](backend, layer, 0.5, 6, key)
    # magnitude: round(0.5 * 6) = 3 smallest |w|, all positive.
    assert np.flatnonzero(magnitude).tolist() == [0, 1, 2]
    # SET: round(1.5) = 2 of the 3 positives, smallest first, and 2 of the 3 non-positives,
    # closest to zero first (-5, -6), never the large-magnitude -7.
    assert np.flatnonzero(set_).tolist() == [0, 1, 3, 4]


def test_set_counts_negative_zero_as_nonpositive() -> None:
    w = np.array([0.2, -0.1, 0.05, -0.7, 0.9, -0.0], f32).reshape(2, 3)
    layer = Layer("s", w, np.ones((2, 3), bool), np.arange(6, dtype=f32).reshape(2, 3))
    pruned = sc.modes.PRUNE["SET"](sc.get_backend("numpy"), layer, 0.5, 6, HashKey(0, 1, 0))
    # positives 0.2, 0.05, 0.9 -> 0.05, 0.2; non-positives -0.1, -0.7, -0.0 -> -0.0, -0.1
    assert set(np.flatnonzero(pruned)) == {0, 1, 2, 5}


def test_random_growth_takes_largest_hashes() -> None:
    layer = layer_a()
    res = update([layer], prune_rate=0.5, growth="random", seed=4, update_index=3)
    kept = np.array([[0, 1, 0], [0, 0, 1]], bool)
    hashes = layer_hash(HashKey(4, 3, 0), (2, 3)).reshape(-1)
    free = np.flatnonzero(~kept.reshape(-1))
    best = free[np.argsort(hashes[free])[-2:]]
    expected = kept.reshape(-1).copy()
    expected[best] = True
    assert np.array_equal(res.masks[0].reshape(-1), expected)


def test_gradient_growth_reads_the_gradient() -> None:
    base = layer_a()
    grad = np.array([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]], f32)
    layer = Layer(base.name, base.weight, base.mask, base.momentum, grad=grad)
    res = update([layer], prune_rate=0.5, growth="gradient", redistribution="nonzero")
    # grad picks (0, 0) (just pruned: may come straight back) and one tied zero by hash.
    assert res.masks[0][0, 0]
    with pytest.raises(SparseCoreError, match="grad"):
        update([base], prune_rate=0.5, growth="gradient", redistribution="nonzero")


@pytest.mark.parametrize("transpose", [False, True])
def test_momentum_neuron_growth(transpose: bool) -> None:
    w = np.array([[0.1, 0.2, 3, 4], [0, 0, 0, 0]], f32)
    mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)
    p = np.array([[5, 0, 0, 0], [0.1, 0.2, 0.3, 0.4]], f32)
    if transpose:  # the Keras layout: output units on the last axis
        w, mask, p = w.T.copy(), mask.T.copy(), p.T.copy()
    layer = Layer("n", w, mask, p, axis=-1 if transpose else 0)
    res = update([layer], prune_rate=0.5, growth="momentum_neuron")
    # prune 0.1, 0.2; unit means |P| 1.25 and 0.25 -> ideal 1.67, 0.33 with free slots 2, 4
    # -> unit 0 gets both units (its 2 free slots), unit 1 none.
    expected = np.ones((2, 4), bool)
    expected[1] = False
    got = res.masks[0].T if transpose else res.masks[0]
    assert np.array_equal(got, expected)
    # plain momentum growth would instead take (0, 0) and the 0.4 of unit 1.
    plain = update([layer], prune_rate=0.5, growth="momentum").masks[0]
    plain = plain.T if transpose else plain
    assert plain[0, 0] and plain[1, 3] and not plain[0, 1]


def test_pruned_and_regrown_weight_keeps_its_bits() -> None:
    w = np.array([[1e-8, 2.0], [3.0, 0.0]], f32)
    mask = np.array([[1, 1], [1, 0]], bool)
    p = np.array([[9.0, 0.0], [0.0, 0.0]], f32)
    layer = Layer("k", w, mask, p)
    res = update([layer], prune_rate=0.34)  # round(1.02) = 1: prunes 1e-8, regrows it (P = 9)
    assert res.report.layers[0].pruned == 1 and res.report.layers[0].net_pruned == 0
    new_w = sc.apply_masks([layer], res.masks)[0]
    assert new_w[0, 0] == f32(1e-8)


def test_apply_zeroes_removed_and_new_positions() -> None:
    w = np.array([[-1.0, 2.0], [7.0, 0.0]], f32)  # 7.0 is at an inactive position (user's array)
    old = np.array([[1, 1], [0, 0]], bool)
    new = np.array([[0, 1], [1, 0]], bool)
    out = sc.apply_masks([Layer("x", w, old)], [new])[0]
    assert out.tolist() == [[0.0, 2.0], [0.0, 0.0]]
    assert not np.signbit(out[0, 0])  # exactly +0


def test_min_density_keeps_a_layer_from_emptying() -> None:
    layer = Layer("m", np.ones((4, 4), f32), np.ones((4, 4), bool), np.zeros((4, 4), f32))
    other = Layer("o", np.zeros((4, 4), f32), np.zeros((4, 4), bool), np.ones((4, 4), f32))
    res = update([layer, other], prune_rate=1.0, min_density=0.25, redistribution="momentum")
    assert res.report.layers[0].pruned == 12  # not 16: 4 = 0.25 * 16 stay
    assert res.report.layers[0].nnz_after >= 4


def test_max_density_caps_growth() -> None:
    big = Layer(
        "big",
        np.ones((10, 10), f32),
        np.ones((10, 10), bool) & (np.arange(100) < 20).reshape(10, 10),
        np.zeros((10, 10), f32),
    )
    small = Layer(
        "small",
        np.ones((2, 5), f32),
        np.zeros((2, 5), bool) | (np.arange(10) < 2).reshape(2, 5),
        np.full((2, 5), 10.0, f32),
    )
    res = update([big, small], prune_rate=0.5, max_density=0.5)
    # small: ceiling floor(0.5 * 10) = 5, kept 1 -> capacity 4, although it would take far more.
    assert res.report.layers[1].capacity == 4 and res.report.layers[1].nnz_after == 5
    assert sum(r.nnz_after for r in res.report.layers) == 22


def test_empty_layer_does_not_crash_and_can_regrow() -> None:
    empty = Layer("e", np.zeros((3, 3), f32), np.zeros((3, 3), bool), np.full((3, 3), 2.0, f32))
    full = Layer("f", np.ones((3, 3), f32), np.ones((3, 3), bool), np.zeros((3, 3), f32))
    res = update([empty, full], prune_rate=0.5)
    # empty layer: importance is the mean over all positions (2.0), so it gets all 4 freed weights
    assert res.report.layers[0].importance == 2.0
    assert [r.nnz_after for r in res.report.layers] == [4, 5]


def test_all_zero_momentum_splits_by_size() -> None:
    a = Layer("a", np.ones((4, 4), f32), np.ones((4, 4), bool), np.zeros((4, 4), f32))
    b = Layer(
        "b",
        np.ones((4, 12), f32),
        np.zeros((4, 12), bool) | (np.arange(48) < 16).reshape(4, 12),
        np.zeros((4, 12), f32),
    )
    res = update([a, b], prune_rate=0.5)
    shares = [r.share for r in res.report.layers]
    assert shares == [0.25, 0.75] and not any(math.isnan(s) for s in shares)


# -- invariants as properties ------------------------------------------------------------------

values = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5]),  # tie-heavy
    st.floats(-4, 4, width=32),
)


@st.composite
def layer_sets(draw: st.DrawFn) -> list[Layer]:
    n_layers = draw(st.integers(1, 4))
    layers = []
    for i in range(n_layers):
        shape = draw(
            st.sampled_from([(1, 1), (1, 5), (3, 4), (7, 9), (4, 3, 2, 2), (40, 50), (100, 100)])
        )
        kind = draw(st.sampled_from(["random", "empty", "full", "zero_momentum"]))
        w = draw(hnp.arrays(np.float32, shape, elements=values))
        if kind == "empty":
            mask = np.zeros(shape, bool)
        elif kind == "full":
            mask = np.ones(shape, bool)
        else:
            mask = draw(hnp.arrays(bool, shape))
        p = (
            np.zeros(shape, np.float32)
            if kind == "zero_momentum"
            else draw(hnp.arrays(np.float32, shape, elements=values))
        )
        g = draw(hnp.arrays(np.float32, shape, elements=values))
        layers.append(Layer(f"l{i}", np.where(mask, w, 0).astype(np.float32), mask, p, g))
    return layers


@given(
    layer_sets(),
    st.floats(0, 1),
    st.sampled_from(["magnitude", "SET"]),
    st.sampled_from(["momentum", "random", "gradient", "momentum_neuron"]),
    st.sampled_from(["momentum", "magnitude", "nonzero", "none"]),
    st.integers(0, 2**31 - 1),
)
def test_update_invariants(layers, rate, prune, growth, redistribution, seed) -> None:
    copies = [(layer.weight.copy(), layer.mask.copy(), layer.momentum.copy()) for layer in layers]
    res = update(
        layers,
        prune_rate=rate,
        prune=prune,
        growth=growth,
        redistribution=redistribution,
        seed=seed,
        update_index=2,
    )
    reports = res.report.layers
    # inputs untouched
    for layer, (w, m, p) in zip(layers, copies):
        assert (
            np.array_equal(layer.weight, w)
            and np.array_equal(layer.mask, m)
            and np.array_equal(layer.momentum, p)
        )
    # exact total, bounds, capacity
    assert sum(r.nnz_after for r in reports) == sum(int(layer.mask.sum()) for layer in layers)
    for layer, mask, r in zip(layers, res.masks, reports):
        assert mask.shape == layer.mask.shape and mask.dtype == bool
        assert 0 <= r.nnz_after == int(mask.sum()) <= r.size
        assert r.grown <= r.capacity
        assert r.net_pruned == int((layer.mask & ~mask).sum())
        assert r.net_grown == int((mask & ~layer.mask).sum())
    assert sum(r.grown for r in reports) == sum(r.pruned for r in reports)
    # the gross pruned set, the budgets and the grown set, from the specification
    kept_masks = []
    for i, (layer, r) in enumerate(zip(layers, reports)):
        key = HashKey(seed, 2, i)
        pruned = brute_prune(layer.weight, layer.mask, rate, prune, key)
        assert r.pruned == int(pruned.sum())
        kept_masks.append(layer.mask & ~pruned)
    if redistribution in ("momentum", "magnitude"):
        signal = [
            layer.momentum if redistribution == "momentum" else layer.weight for layer in layers
        ]
        s = [brute_importance(x, layer.mask) for x, layer in zip(signal, layers)]
        for r, expected in zip(reports, s):
            assert r.importance == pytest.approx(expected, rel=1e-12, abs=0)
    if redistribution != "none":
        total = sum(r.pruned for r in reports)
        assert [r.grown for r in reports] == brute_split(
            total, [r.share for r in reports], [r.capacity for r in reports]
        )
    if growth in ("momentum", "gradient", "random"):
        for i, (layer, kept, r, mask) in enumerate(zip(layers, kept_masks, reports, res.masks)):
            key = HashKey(seed, 2, i)
            score = {
                "momentum": np.abs(layer.momentum),
                "gradient": np.abs(layer.grad),
                "random": layer_hash(key, layer.mask.shape),
            }[growth]
            grown = brute_select(score, ~kept, r.grown, largest=True, key=key)
            assert np.array_equal(mask, kept | grown)
    # deterministic
    again = update(
        layers,
        prune_rate=rate,
        prune=prune,
        growth=growth,
        redistribution=redistribution,
        seed=seed,
        update_index=2,
    )
    assert all(np.array_equal(a, b) for a, b in zip(res.masks, again.masks))


# -- bad input: a clear error naming the layer, and nothing changed -------------------------------


def good_layers() -> list[Layer]:
    return [layer_a(), layer_b()]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda ls: [ls[0], Layer("b", ls[1].weight, ls[1].mask[:, :3], ls[1].momentum)],
            "'b'.*mask shape",
        ),
        (
            lambda ls: [ls[0], Layer("b", ls[1].weight, ls[1].mask, ls[1].momentum[:1])],
            "'b'.*momentum shape",
        ),
        (
            lambda ls: [
                ls[0],
                Layer("b", ls[1].weight.astype(np.int32), ls[1].mask, ls[1].momentum),
            ],
            "'b'.*floating",
        ),
        (
            lambda ls: [ls[0], Layer("b", ls[1].mask.copy(), ls[1].mask, ls[1].momentum)],
            "'b'.*floating",
        ),
        (
            lambda ls: [ls[0], Layer("b", ls[1].weight, ls[1].mask.astype(f32), ls[1].momentum)],
            "'b'.*boolean",
        ),
        (lambda ls: [ls[0], Layer("a", ls[1].weight, ls[1].mask, ls[1].momentum)], "unique"),
        (lambda ls: [ls[0], Layer("b", ls[1].weight, ls[1].mask, None)], "'b'.*momentum"),
        (lambda ls: [], "no layers"),
    ],
)
def test_bad_layers(mutate, match) -> None:
    layers = mutate(good_layers())
    snapshot = [(layer.weight.copy(), layer.mask.copy()) for layer in layers]
    with pytest.raises(SparseCoreError, match=match):
        update(layers, prune_rate=0.5, backend="numpy")
    for layer, (w, m) in zip(layers, snapshot):
        assert np.array_equal(layer.weight, w) and np.array_equal(layer.mask, m)


@pytest.mark.parametrize("where", ["weight", "momentum"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs(where: str, bad: float) -> None:
    layers = good_layers()
    getattr(layers[1], where)[0, 1] = bad
    with pytest.raises(sc.NonFiniteError, match=f"'b'.*{where}.*NaN or Inf"):
        update(layers, prune_rate=0.5)


def test_non_finite_gradient_only_matters_when_read() -> None:
    base = layer_a()
    grad = np.full((2, 3), np.nan, f32)
    layer = Layer("a", base.weight, base.mask, base.momentum, grad)
    update([layer], prune_rate=0.5)  # momentum growth does not read the gradient
    with pytest.raises(sc.NonFiniteError, match=r"'a'.*grad"):
        update([layer], prune_rate=0.5, growth="gradient")


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_bad_prune_rate(rate: float) -> None:
    with pytest.raises(SparseCoreError, match="prune rate"):
        update(good_layers(), prune_rate=rate)


def test_unknown_modes_name_the_alternatives() -> None:
    with pytest.raises(SparseCoreError, match="available"):
        update(good_layers(), prune_rate=0.5, growth="biggest")
    with pytest.raises(SparseCoreError, match="available"):
        update(good_layers(), prune_rate=0.5, prune="smallest")
