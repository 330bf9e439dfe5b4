"""Unit ablation (``ablate_below``): the rule against a brute-force model, by hand, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from spec_model import brute_ablate, brute_prune, brute_select, brute_split

import sparsecore as sc
from sparsecore import HashKey, Layer, SparseConfig, SparseCoreError, SparseEngine, update

f32 = np.float32

values = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5]), st.floats(-4, 4, width=32))


@st.composite
def layer_sets(draw: st.DrawFn) -> list[Layer]:
    layers = []
    for i in range(draw(st.integers(1, 3))):
        shape = draw(st.sampled_from([(1, 5), (3, 4), (7, 9), (4, 3, 2, 2), (12, 30)]))
        axis = draw(st.sampled_from([0, -1]))
        units = shape[axis]
        # uneven fan-in: each unit has its own density, some units are empty
        unit_density = draw(hnp.arrays(f32, units, elements=st.sampled_from([0.0, 0.1, 0.5, 0.9])))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        others = tuple(d for k, d in enumerate(shape) if k != axis % len(shape))
        by_unit = rng.random((units, *others)) < unit_density.reshape((units,) + (1,) * len(others))
        mask = np.moveaxis(by_unit, 0, axis)
        w = draw(hnp.arrays(f32, shape, elements=values))
        p = draw(hnp.arrays(f32, shape, elements=values))
        g = draw(hnp.arrays(f32, shape, elements=values))
        layers.append(Layer(f"l{i}", np.where(mask, w, 0).astype(f32), mask, p, g, axis=axis))
    return layers


def _units_of(mask: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1)


@given(
    layer_sets(),
    st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    st.sampled_from([0.3, 0.7, 1.0]),
    st.sampled_from(["magnitude", "SET"]),
    st.sampled_from(["momentum", "random", "gradient", "momentum_neuron"]),
    st.sampled_from(["momentum", "nonzero", "none"]),
    st.booleans(),
    st.sampled_from([0.0, 0.2]),
    st.integers(0, 2**31 - 1),
)
def test_ablation_follows_the_rule(
    layers, rate, ablate_below, prune, growth, redistribution, revive, min_density, seed
) -> None:
    copies = [(layer.weight.copy(), layer.mask.copy()) for layer in layers]
    kwargs = dict(
        prune_rate=rate,
        prune=prune,
        growth=growth,
        redistribution=redistribution,
        seed=seed,
        update_index=3,
        revive_dead_units=revive,
        min_density=min_density,
        ablate_below=ablate_below,
    )
    res = update(layers, **kwargs)
    reports = res.report.layers
    for layer, (w, m) in zip(layers, copies):  # inputs untouched
        assert np.array_equal(layer.weight, w) and np.array_equal(layer.mask, m)
    assert sum(int(m.sum()) for m in res.masks) == sum(int(layer.mask.sum()) for layer in layers)
    assert sum(r.grown for r in reports) == sum(r.pruned for r in reports)
    for i, (layer, mask, r) in enumerate(zip(layers, res.masks, reports)):
        key = HashKey(seed, 3, i)
        base = brute_prune(layer.weight, layer.mask, rate, prune, key)
        floor = min(math.ceil(min_density * layer.mask.size), layer.mask.size)
        nnz = int(layer.mask.sum())
        if int(base.sum()) > max(0, nnz - floor):  # the floor binds: the engine caps pruning
            continue
        kept = layer.mask & ~base
        ablated = brute_ablate(
            kept,
            ablate_below=ablate_below,
            axis=layer.axis,
            nnz_before=nnz,
            removable=max(0, nnz - floor) - int(base.sum()),
            key=key,
        )
        assert r.ablated == int(ablated.sum())
        kept_units = _units_of(kept, layer.axis)
        assert r.pruned == int(base.sum()) + int(kept_units[ablated].sum())
        new_units = _units_of(mask, layer.axis)
        assert not new_units[ablated].any()  # ablated units end empty
        assert r.grown <= r.capacity <= int((~_units_of(kept, layer.axis)[~ablated]).sum())
        assert r.nnz_after == int(mask.sum()) >= 0
        # kept weights of the other units stay, nothing else is lost
        assert not (kept_units[~ablated] & ~new_units[~ablated]).any()
        if growth in ("momentum", "gradient") and not (revive and r.revived):
            blocked = kept.copy()
            np.moveaxis(blocked, layer.axis, 0)[ablated] = True
            score = np.abs(layer.momentum if growth == "momentum" else layer.grad)
            grown = brute_select(score, ~blocked, r.grown, largest=True, key=key)
            kept_after = kept.copy()
            np.moveaxis(kept_after, layer.axis, 0)[ablated] = False
            if not (revive and r.dead_units):
                assert np.array_equal(mask, kept_after | grown)
    if redistribution != "none":
        total = sum(r.pruned for r in reports)
        assert [r.grown for r in reports] == brute_split(
            total, [r.share for r in reports], [r.capacity for r in reports]
        )
    again = update(layers, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(res.masks, again.masks))


def test_by_hand_thin_units_go_and_their_weights_move() -> None:
    # 4 units of 10 positions; unit fan-ins 8, 8, 2, 1 (mean 4.75): 0.5 * 4.75 = 2.375
    mask = np.zeros((4, 10), bool)
    for j, c in enumerate([8, 8, 2, 1]):
        mask[j, :c] = True
    weight = np.where(mask, 1.0, 0.0).astype(f32)
    momentum = np.ones((4, 10), f32)
    layer = Layer("fc", weight, mask, momentum)
    res = update([layer], prune_rate=0.0, ablate_below=0.5)
    (r,) = res.report.layers
    assert r.ablated == 2 and r.pruned == r.grown == 3
    new = res.masks[0]
    assert new[2:].sum() == 0 and new[:2].sum() == 19 and new.sum() == 19
    np.testing.assert_array_equal(new[:2] & mask[:2], mask[:2])  # kept weights stay
    # ablate_below=0.2: threshold 0.95, nothing below it
    assert update([layer], prune_rate=0.0, ablate_below=0.2).report.layers[0].ablated == 0


def test_the_units_left_must_hold_the_layer() -> None:
    def layer_with(counts):
        mask = np.zeros((4, 10), bool)
        for j, c in enumerate(counts):
            mask[j, :c] = True
        return Layer("fc", np.where(mask, 1.0, 0.0).astype(f32), mask, np.ones((4, 10), f32))

    # 31 active: three units (30 positions) cannot hold them, so the thin unit stays
    r = update([layer_with([10, 10, 10, 1])], prune_rate=0.0, ablate_below=1.0).report.layers[0]
    assert r.ablated == 0 and r.pruned == 0
    # 30 active: they can
    r = update([layer_with([10, 10, 9, 1])], prune_rate=0.0, ablate_below=1.0).report.layers[0]
    assert r.ablated == 1 and r.pruned == 1
    # fan-ins 3 and 7 both below the mean 7.5: the 3 goes first, then two units would be too few
    r = update([layer_with([10, 10, 3, 7])], prune_rate=0.0, ablate_below=1.0).report.layers[0]
    assert r.ablated == 1 and r.pruned == 3


def test_min_density_limits_ablation() -> None:
    mask = np.zeros((4, 10), bool)
    for j, c in enumerate([9, 9, 1, 1]):
        mask[j, :c] = True
    layer = Layer("fc", np.where(mask, 1.0, 0.0).astype(f32), mask, np.ones((4, 10), f32))
    # 20 active, floor 19: one weight may go, so one unit of fan-in 1
    r = update([layer], prune_rate=0.0, ablate_below=0.5, min_density=0.475).report.layers[0]
    assert r.ablated == 1 and r.pruned == 1
    r = update([layer], prune_rate=0.0, ablate_below=0.5).report.layers[0]
    assert r.ablated == 2


def test_equal_fan_ins_are_ordered_by_the_unit_hash() -> None:
    units = 16
    mask = np.zeros((units, 8), bool)
    mask[:, 0] = True
    mask[:8, :] = True  # 8 full units (fan-in 8) and 8 with fan-in 1: mean 4.5
    layer = Layer("fc", np.where(mask, 1.0, 0.0).astype(f32), mask, np.ones((units, 8), f32))
    # units left must hold 72 positions: at most 7 of the 8 thin units can go
    res = update([layer], prune_rate=0.0, ablate_below=0.5, seed=11, update_index=4)
    gone = ~res.masks[0].any(axis=1)
    assert gone.sum() == 7
    hashes = sc.position_hash(HashKey(11, 4, 0), np.arange(8, 16)).astype(np.int64)
    kept_thin = 8 + int(np.argmin(hashes))  # the smallest hash stays
    assert not gone[kept_thin] and gone[8:].sum() == 7


def test_revival_leaves_ablated_units_alone() -> None:
    mask = np.zeros((6, 10), bool)
    mask[:3, :6] = True  # units 3, 4, 5 empty: dead and below any threshold
    weight = np.where(mask, np.arange(1, 11, dtype=f32), 0.0).astype(f32)
    momentum = np.ones((6, 10), f32)
    momentum[1] = 0  # unit 1 has weights but no gradient: dead, not ablated (fan-in 4 left)
    layer = Layer("fc", weight, mask, momentum)
    # prunes the two smallest columns of units 0-2: fan-ins 4, 4, 4, 0, 0, 0
    res = update([layer], prune_rate=1 / 3, ablate_below=0.5, revive_dead_units=True)
    (r,) = res.report.layers
    assert r.dead_units == 4 and r.ablated == 3
    assert not res.masks[0][3:].any()
    assert r.revived > 0 and res.revived is not None and res.revived[0][1].any()


def test_zero_is_off_and_the_same_as_before() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((30, 20)) < 0.2
    layer = Layer(
        "fc",
        (rng.standard_normal((30, 20)) * mask).astype(f32),
        mask,
        rng.standard_normal((30, 20)).astype(f32),
    )
    for be in ("numpy", "numba"):
        a = update([layer], prune_rate=0.4, backend=be)
        b = update([layer], prune_rate=0.4, backend=be, ablate_below=0.0)
        np.testing.assert_array_equal(a.masks[0], b.masks[0])
        assert b.report.layers[0].ablated == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half", True])
def test_bad_ablate_below_is_refused(bad) -> None:
    layer = Layer("fc", np.ones((3, 4), f32), np.ones((3, 4), bool), np.ones((3, 4), f32))
    with pytest.raises(SparseCoreError, match="ablate_below"):
        update([layer], prune_rate=0.5, ablate_below=bad)
    with pytest.raises(SparseCoreError, match="ablate_below"):
        SparseConfig(ablate_below=bad)
    assert np.all(layer.mask) and np.all(layer.weight == 1)


def test_one_value_per_layer() -> None:
    mask = np.zeros((4, 10), bool)
    for j, c in enumerate([8, 8, 2, 1]):
        mask[j, :c] = True
    layers = [
        Layer(n, np.where(mask, 1.0, 0.0).astype(f32), mask, np.ones((4, 10), f32))
        for n in ("a", "b")
    ]
    res = update(layers, prune_rate=0.0, ablate_below=[0.5, 0.0])
    assert [r.ablated for r in res.report.layers] == [2, 0]
    assert (res.masks[1] >= mask).all()  # 'b' keeps its weights and may take some of 'a's
    with pytest.raises(SparseCoreError, match="2 values for 1 layers"):
        update(layers[:1], prune_rate=0.0, ablate_below=[0.5, 0.0])
    with pytest.raises(
        SparseCoreError, match=r"layer 'b': ablate_below must lie in \[0, 1\], got 2"
    ):
        update(layers, prune_rate=0.0, ablate_below=[0.5, 2.0])


def test_engine_concentrates_weights_over_updates() -> None:
    shapes = [(300, 784), (100, 300), (10, 100)]
    counts = {}
    for a in (0.0, 0.5):
        cfg = SparseConfig(density=0.05, update_every=1, total_steps=20, ablate_below=a)
        engine = SparseEngine(cfg, ["fc1", "fc2", "fc3"], shapes)
        masks = engine.initial_masks()
        rng = np.random.default_rng(1)
        for step in range(1, 6):
            layers = [
                Layer(
                    n,
                    (rng.standard_normal(s) * m).astype(f32),
                    m,
                    rng.standard_normal(s).astype(f32),
                )
                for n, s, m in zip(engine.names, shapes, masks)
            ]
            masks = engine.update(layers, step).masks
        assert sum(int(m.sum()) for m in masks) == engine.target
        counts[a] = int(masks[0].any(axis=1).sum())
        if a:
            last = engine.history[-1].layers
            assert last[0].ablated > 0 and last[2].ablated == 0  # the output layer stays whole
            assert masks[2].any(axis=1).all()
    assert counts[0.5] < counts[0.0]
    # saved before the option existed: off
    old = engine.config.to_dict()
    del old["ablate_below"]
    assert SparseConfig.from_dict(old).ablate_below == 0.0
