"""SparseEngine.load_state_dict is all or nothing: any corrupted field of a real saved state is
refused naming the field, and the engine keeps its counters, history, config and ever-active
masks exactly as they were."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from corrupt import apply, corruptions, field_name
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecore as sc
from sparsecore import Layer, SparseConfig, SparseCoreError, SparseEngine

SHAPES = [(20, 30), (10, 20), (4, 10)]
NAMES = ["fc1", "fc2", "out"]
NULLABLE = {"step", "stop_at", "total_steps", "update_every"}
FREE_TEXT = {"reason"}


def _run(steps: int, seed: int = 0, density: float = 0.2) -> SparseEngine:
    """An engine after ``steps`` toy steps: updates every 10 steps, one of them skipped."""
    config = SparseConfig(
        density=density, total_steps=100, update_every=10, seed=seed, on_nonfinite="skip"
    )
    engine = SparseEngine(config, NAMES, SHAPES)
    rng = np.random.default_rng(seed)
    masks = engine.initial_masks()
    weights = [rng.normal(size=s).astype(np.float32) * m for s, m in zip(SHAPES, masks)]
    for step in range(1, steps + 1):
        momentum = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
        if step == 20:
            momentum[1][0, 0] = np.nan  # this update is skipped and recorded
        if engine.due(step):
            layers = [Layer(n, w, m, p) for n, w, m, p in zip(NAMES, weights, masks, momentum)]
            result = engine.update(layers, step)
            weights = sc.apply_masks(layers, result.masks)
            masks = result.masks
    return engine


SAVED = _run(45, seed=3).state_dict()  # 4 updates, one skipped (the last one is not)
CORRUPTIONS = corruptions(SAVED, nullable=NULLABLE, free_text=FREE_TEXT)


def _snapshot(engine: SparseEngine) -> tuple:
    return (
        engine.config,
        engine.target,
        engine.updates,
        [r.to_dict() for r in engine.history],
        None if engine.ever_active is None else [e.copy() for e in engine.ever_active],
    )


def _same(a: tuple, b: tuple) -> bool:
    ever_a, ever_b = a[4], b[4]
    same_ever = (ever_a is None and ever_b is None) or (
        ever_a is not None
        and ever_b is not None
        and all(np.array_equal(x, y) for x, y in zip(ever_a, ever_b))
    )
    return a[:4] == b[:4] and same_ever


def test_the_saved_state_is_valid_and_covers_every_kind_of_field():
    assert [r["skipped"] for r in SAVED["history"]] == [False, True, False, False]
    fresh = _run(25, seed=1)
    fresh.load_state_dict(copy.deepcopy(SAVED))
    assert fresh.updates == 3 and len(fresh.history) == 4
    kinds = {how for _, how in CORRUPTIONS}
    assert {"shape", "dtype", "missing:updates", "extra", "drop_last", "nan"} <= kinds
    assert len(CORRUPTIONS) > 300


ENGINE = _run(25, seed=1)  # another run at another point: a restore would change it all
BEFORE = _snapshot(ENGINE)


def _refused_and_unchanged(corruption) -> None:
    with pytest.raises(SparseCoreError) as info:
        ENGINE.load_state_dict(apply(SAVED, corruption))
    assert field_name(corruption) in str(info.value), (corruption, str(info.value))
    assert _same(_snapshot(ENGINE), BEFORE), corruption


@settings(max_examples=150)
@given(corruption=st.sampled_from(CORRUPTIONS))
def test_any_corrupted_field_is_refused_and_changes_nothing(corruption):
    _refused_and_unchanged(corruption)


def test_every_corruption_of_every_field_is_refused():
    for corruption in CORRUPTIONS:  # the whole list: a few milliseconds each
        _refused_and_unchanged(corruption)


def test_steps_none_and_abc_are_refused_before_anything_changes():
    engine = _run(25, seed=1)
    before = _snapshot(engine)
    for bad in (None, "abc", -3, True):
        state = copy.deepcopy(SAVED)
        state["history"][0]["step"] = bad if bad is not None else "x"
        state["updates"] = bad
        with pytest.raises(SparseCoreError, match=r"field 'updates' must be an integer >= 0"):
            engine.load_state_dict(state)
        assert _same(_snapshot(engine), before)


def test_a_state_saved_at_another_density_or_target_is_refused():
    engine = _run(25, seed=1)
    other = _run(15, seed=1, density=0.3).state_dict()
    with pytest.raises(SparseCoreError, match=r"field 'config' holds density 0.3, this run 0.2"):
        engine.load_state_dict(other)
    state = copy.deepcopy(SAVED)
    state["target"] += 1
    with pytest.raises(SparseCoreError, match=r"field 'target' is 169, but density 0.2"):
        engine.load_state_dict(state)


def test_ever_active_of_the_wrong_shape_is_refused_instead_of_breaking_the_next_update():
    engine = _run(25, seed=1)
    state = copy.deepcopy(SAVED)
    state["ever_active"][0] = np.ones((30, 20), dtype=bool)
    with pytest.raises(SparseCoreError, match=r"'ever_active\[0\]' has shape \(30, 20\)"):
        engine.load_state_dict(state)
    state["ever_active"][0] = ~SAVED["ever_active"][0]  # right shape, wrong content
    with pytest.raises(SparseCoreError, match="the last update counted"):
        engine.load_state_dict(state)


def test_a_state_saved_before_dead_units_were_counted_still_loads():
    """States of the previous version have no cover_units / revive_dead_units options and no
    dead-unit counts in their reports: they load, with the options off (the run they saved
    continues as it was) and the counts 0."""
    old = copy.deepcopy(SAVED)
    for key in ("cover_units", "revive_dead_units", "ablate_below"):
        del old["config"][key]
    for report in old["history"]:
        for layer in report["layers"]:
            for key in ("units", "dead_units", "revived", "ablated"):
                del layer[key]
    fresh = _run(0, seed=1)
    fresh.load_state_dict(old)
    assert (fresh.config.cover_units, fresh.config.revive_dead_units) == (False, False)
    assert fresh.config.ablate_below == 0.0
    assert all(layer.units == 0 for r in fresh.history for layer in r.layers)
    assert fresh.updates == 3
