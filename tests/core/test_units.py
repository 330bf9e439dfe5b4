"""Dead output units: how they are counted, how an update revives them, how masks cover them.

The revival rule is checked against a brute-force model of its words (tests/helpers/spec_model.py);
the other backends are checked against NumPy in their own equivalence tests.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_model import brute_dead_units, brute_prune, brute_revive, brute_select

import sparsecore as sc
from sparsecore import DeadUnitsWarning, HashKey, Layer, SparseConfig, SparseEngine, update
from sparsecore.units import dead_units, revival_quotas, revival_scale

f32 = np.float32
NP = sc.get_backend("numpy")


def _layer(mask, momentum, weight=None, axis=0) -> Layer:
    mask = np.asarray(mask, bool)
    if weight is None:
        weight = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0).astype(f32)
    return Layer(
        "l", weight, mask, None if momentum is None else np.asarray(momentum, f32), axis=axis
    )


def test_a_unit_is_dead_without_weights_or_without_gradient() -> None:
    mask = [[1, 0, 0], [0, 0, 0], [0, 1, 1], [1, 1, 0]]
    momentum = [[0.5, 0, 0], [0.1, 0, 0], [0, 0, 0], [0, 0, 0.2]]
    # unit 1 has no weight (it still has momentum), unit 2 no gradient anywhere
    assert dead_units(NP, _layer(mask, momentum)).tolist() == [False, True, True, False]
    # along axis 1 the units are the columns: column 1 has weights but no momentum
    assert dead_units(NP, _layer(mask, momentum, axis=1)).tolist() == [False, True, False]


def test_without_momentum_or_with_momentum_zero_everywhere_only_empty_units_count() -> None:
    mask = [[1, 0], [0, 0], [0, 1]]
    assert dead_units(NP, _layer(mask, None)).tolist() == [False, True, False]
    assert dead_units(NP, _layer(mask, np.zeros((3, 2)))).tolist() == [False, True, False]


def test_revival_quotas_are_the_dead_units_equal_share() -> None:
    dead = np.array([True, False, True, False])
    # 10 grown weights, 2 of 4 units dead: 5 to share, 3 and 2 (ties to the lower unit)
    assert revival_quotas(10, dead, np.array([9, 9, 9, 9])).tolist() == [3, 0, 2, 0]
    # a dead unit with one free slot takes one; the other takes the rest of the share
    assert revival_quotas(10, dead, np.array([1, 9, 9, 9])).tolist() == [1, 0, 4, 0]
    # no free slots in dead units: nothing
    assert revival_quotas(10, dead, np.array([0, 9, 0, 9])).tolist() == [0, 0, 0, 0]
    assert revival_scale((8, 3, 3, 3), 0) == pytest.approx(1 / math.sqrt(27))
    assert revival_scale((3, 3, 4, 16), -1) == pytest.approx(1 / math.sqrt(36))


@st.composite
def dead_layers(draw):
    """One layer with a few dead units (empty ones, silent ones) and tie-heavy momentum."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shape = draw(st.sampled_from([(6, 5), (4, 2, 3, 3), (3, 3, 2, 5), (9, 4)]))
    axis = draw(st.sampled_from([0, -1]))
    units = shape[axis]
    mask = rng.random(shape) < draw(st.sampled_from([0.1, 0.3, 0.6]))
    momentum = rng.choice([0.0, 0.5, 1.0, -1.0], size=shape).astype(f32)
    rows = np.moveaxis(momentum, axis, 0)  # a view: zero some units' momentum
    silent = rng.random(units) < 0.4
    rows[silent] = 0.0
    rows_mask = np.moveaxis(mask, axis, 0)
    rows_mask[rng.random(units) < 0.2] = False  # some empty units
    weight = (rng.standard_normal(shape).astype(f32) * mask).astype(f32)
    return Layer("l", weight, mask, momentum, axis=axis)


@settings(max_examples=60, deadline=None)
@given(layer=dead_layers(), rate=st.sampled_from([0.2, 0.5, 1.0]), u=st.integers(1, 9))
def test_revival_grows_the_dead_units_share_at_signed_starts(layer, rate, u) -> None:
    res = update(
        [layer], prune_rate=rate, update_index=u, seed=3, redistribution="none",
        revive_dead_units=True,
    )  # fmt: skip
    key = HashKey(3, u, 0)
    dead = brute_dead_units(layer.mask, layer.momentum, layer.axis)
    rep = res.report.layers[0]
    assert (rep.units, rep.dead_units) == (layer.mask.shape[layer.axis], int(dead.sum()))
    pruned = brute_prune(layer.weight, layer.mask, rate, "magnitude", key)
    kept = layer.mask & ~pruned
    g = int(pruned.sum())  # redistribution 'none': the layer regrows what it pruned
    revived = brute_revive(layer.momentum, kept, g, dead, layer.axis, key) if g else kept & False
    rest = brute_select(
        np.abs(layer.momentum), ~(kept | revived), g - int(revived.sum()), largest=True, key=key
    )
    expected = kept | revived | rest
    np.testing.assert_array_equal(res.masks[0], expected)
    assert int(res.masks[0].sum()) == int(layer.mask.sum())  # exact count
    fresh = revived & ~layer.mask
    assert rep.revived == int(fresh.sum())
    weights = sc.new_weights([layer], res)[0]
    scale = f32(revival_scale(layer.weight.shape, layer.axis))
    odd = (sc.layer_hash(key, layer.weight.shape) & 1).astype(bool)
    np.testing.assert_array_equal(weights[fresh], np.where(odd, scale, -scale)[fresh])
    kept_before = layer.mask & expected  # active before and after: bit for bit
    np.testing.assert_array_equal(
        weights[kept_before].view(np.uint32), layer.weight[kept_before].view(np.uint32)
    )
    others = expected & ~layer.mask & ~fresh
    assert (weights[others] == 0).all() and (weights[~expected] == 0).all()
    if fresh.any():
        assert res.revived is not None and res.revived[0] is not None
        np.testing.assert_array_equal(res.revived[0], fresh)
    else:
        assert res.weights is None and res.revived is None


def test_without_revival_the_update_is_the_papers() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((8, 6)) < 0.3
    mask[:, 0] = True
    mask[2] = False  # the one empty unit
    layer = Layer("l", (rng.standard_normal((8, 6)) * mask).astype(f32), mask,
                  rng.standard_normal((8, 6)).astype(f32))  # fmt: skip
    plain = update([layer], prune_rate=0.5)
    off = update([layer], prune_rate=0.5, revive_dead_units=False)
    np.testing.assert_array_equal(plain.masks[0], off.masks[0])
    assert off.weights is None and off.revived is None
    assert off.report.layers[0].dead_units == 1 and off.report.layers[0].revived == 0
    on = update([layer], prune_rate=0.5, revive_dead_units=True)
    assert on.report.layers[0].revived > 0
    assert sc.new_weights([layer], on)[0][2].any()  # the empty unit starts non-zero


def test_no_dead_unit_means_no_change() -> None:
    rng = np.random.default_rng(1)
    mask = np.ones((5, 4), bool)
    mask[:, 0] = False
    layer = Layer("l", (rng.standard_normal((5, 4)) * mask).astype(f32), mask,
                  rng.standard_normal((5, 4)).astype(f32))  # fmt: skip
    a = update([layer], prune_rate=0.5)
    b = update([layer], prune_rate=0.5, revive_dead_units=True)
    np.testing.assert_array_equal(a.masks[0], b.masks[0])
    assert b.weights is None and b.report.layers[0].dead_units == 0


def test_the_fused_numba_update_hands_revival_to_the_generic_path() -> None:
    numba = sc.get_backend("numba")
    rng = np.random.default_rng(2)
    layers = []
    for i, shape in enumerate([(40, 30), (16, 40)]):
        mask = rng.random(shape) < 0.2
        momentum = rng.standard_normal(shape).astype(f32)
        momentum[3] = 0  # a silent unit
        mask[5] = False  # an empty unit
        layers.append(
            Layer(f"l{i}", (rng.standard_normal(shape) * mask).astype(f32), mask, momentum)
        )
    for revive in (False, True):
        ref = update(layers, prune_rate=0.4, backend="numpy", revive_dead_units=revive)
        out = update(layers, prune_rate=0.4, backend=numba, revive_dead_units=revive)
        for a, b in zip(ref.masks, out.masks):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(sc.new_weights(layers, ref), sc.new_weights(layers, out, numba)):
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
        assert (
            [r.dead_units for r in ref.report.layers]
            == [r.dead_units for r in out.report.layers]
            == [2, 2]
        )


def test_the_engine_warns_once_per_layer_when_most_units_are_dead() -> None:
    cfg = SparseConfig(density=0.02, init="uniform", update_every=1, total_steps=10)
    engine = SparseEngine(cfg, ["a", "b"], [(32, 9), (10, 100)])
    with pytest.warns(
        DeadUnitsWarning, match="layer .a.: 2[0-9] of 32 output units start with no weight"
    ):
        masks = engine.initial_masks()
    momentum = [np.ones((32, 9), f32), np.ones((10, 100), f32)]
    layers = [Layer(n, m.astype(f32), m, p) for n, m, p in zip(["a", "b"], masks, momentum)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadUnitsWarning)
        engine.update(layers, 1)  # layer 'a' was named already
    assert engine.history[-1].layers[0].dead_units > 16


def test_covered_initial_masks_give_every_unit_a_weight_where_the_budget_allows() -> None:
    shapes = [(3, 3, 1, 32), (3, 3, 32, 64), (1600, 10)]
    axes = [-1, -1, -1]
    plain = sc.layer_counts(shapes, 0.1, axes=axes)
    covered = sc.layer_counts(shapes, 0.1, axes=axes, cover_units=True)
    assert plain[0] == 29 and covered[0] == 32  # raised to one weight per filter
    assert sum(covered) == sum(plain) == sc.target_count(shapes, 0.1)
    masks = sc.initial_masks(shapes, 0.1, axes=axes, cover_units=True, seed=4)
    for m, c in zip(masks, covered):
        assert int(m.sum()) == c
        assert m.reshape(-1, m.shape[-1]).any(axis=0).all()  # every unit has a weight
    # ER and ERK counts that already cover every unit are not changed
    for method in ("ER", "ERK"):
        assert sc.layer_counts(shapes, 0.1, method, axes=axes, cover_units=True) == sc.layer_counts(
            shapes, 0.1, method, axes=axes
        )


def test_covered_positions_follow_the_hash() -> None:
    shape, count = (6, 10), 14
    mask = sc.initial_mask(shape, count, seed=5, layer=1, cover_axis=0)
    hashes = sc.layer_hash(HashKey(5, 0, 1), shape).astype(np.int64)
    firsts = np.zeros(shape, bool)
    firsts[np.arange(6), hashes.argmax(axis=1)] = True  # each unit's largest hash
    assert (mask & firsts).sum() == 6
    rest = np.where(firsts, -1, hashes).reshape(-1)
    expected = firsts.reshape(-1) | (rest >= np.sort(rest)[-(count - 6)])
    np.testing.assert_array_equal(mask.reshape(-1), expected)
    # without cover_axis: the plain largest hashes, as before
    plain = sc.initial_mask(shape, count, seed=5, layer=1)
    assert plain.sum() == count and (hashes[plain].min() > hashes[~plain].max())
    # fewer weights than units: the units whose largest hashes are largest get one each
    few = sc.initial_mask(shape, 4, seed=5, layer=1, cover_axis=0)
    assert few.sum() == 4 and few.any(axis=1).sum() == 4


def test_cover_units_needs_the_budget_for_all_layers() -> None:
    shapes = [(100, 2), (100, 2)]  # 200 units, 40 weights at 10%
    assert sc.layer_counts(shapes, 0.1, cover_units=True) == sc.layer_counts(shapes, 0.1)
    # min_density floors stay while raising: the other layer keeps its floor
    shapes = [(4, 100), (20, 5)]  # 50 weights at 10%: 40 and 10, floors of 20 and 5
    assert sc.layer_counts(shapes, 0.1, min_density=0.05) == [40, 10]
    assert sc.layer_counts(shapes, 0.1, cover_units=True, min_density=0.05) == [30, 20]
    # floors of 32 and 8 plus 20 units: more than 50, so no unit floor
    assert sc.layer_counts(shapes, 0.1, cover_units=True, min_density=0.08) == [40, 10]
