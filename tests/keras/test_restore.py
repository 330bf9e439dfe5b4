"""SparseCallback's restore from a loaded model is all or nothing: any corrupted field of the
saved sparse state (the engine state, the ever-active masks the constraints carry) is refused
naming the field, and kernels, masks, optimizer variables and the saved state stay as they were."""

from __future__ import annotations

import copy

import keras
import numpy as np
import pytest
from corrupt import apply, corruptions, field_name
from helpers_keras import data, host, mlp
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecore
from sparsecore.keras import SparseCallback

NULLABLE = {"step", "stop_at", "total_steps", "update_every"}
FREE_TEXT = {"reason"}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    x, y = data()
    model = mlp(seed=4)
    cb = SparseCallback(density=0.2, update_every=2, seed=1)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, callbacks=[cb], verbose=0)
    assert cb.engine.updates >= 4
    path = tmp_path_factory.mktemp("restore") / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    constraints = [layer.kernel.constraint for layer in loaded.layers]
    state = copy.deepcopy(constraints[0].state)
    return loaded, constraints, state


def _snapshot(model, constraints) -> list[np.ndarray]:
    out = [host(layer.kernel).copy() for layer in model.layers]
    out += [c.mask_numpy().copy() for c in constraints]
    out += [np.array(c.ever_active, copy=True) for c in constraints]
    out += [host(v).copy() for v in model.optimizer.variables]
    return out


def _refused_and_unchanged(loaded, corrupted_state, name: str, before=None) -> None:
    model, constraints, state = loaded
    before = _snapshot(model, constraints) if before is None else before
    constraints[0].state = corrupted_state
    try:
        with pytest.raises(sparsecore.SparseCoreError) as info:
            SparseCallback().attach(model)
        assert name in str(info.value), (name, str(info.value))
        after = _snapshot(model, constraints)
        assert all(np.array_equal(a, b) for a, b in zip(before, after)), name
        assert constraints[0].state == corrupted_state and constraints[0].provider is None
    finally:
        constraints[0].state = copy.deepcopy(state)


def test_the_saved_state_restores(loaded):
    model, constraints, state = loaded
    assert len(corruptions(state, nullable=NULLABLE, free_text=FREE_TEXT)) > 200
    cb = SparseCallback()
    cb.attach(model)
    assert cb.engine.updates == state["updates"]
    for c in constraints:  # leave the loaded model as it was for the other tests
        c.provider = None


@settings(max_examples=40)
@given(pick=st.data())
def test_any_corrupted_field_is_refused_and_changes_nothing(loaded, pick):
    found = corruptions(loaded[2], nullable=NULLABLE, free_text=FREE_TEXT)
    corruption = pick.draw(st.sampled_from(found))
    _refused_and_unchanged(loaded, apply(loaded[2], corruption), field_name(corruption))


def test_every_corruption_of_every_field_is_refused(loaded):
    model, constraints, state = loaded
    before = _snapshot(model, constraints)
    for corruption in corruptions(state, nullable=NULLABLE, free_text=FREE_TEXT):
        _refused_and_unchanged(loaded, apply(state, corruption), field_name(corruption), before)


@pytest.mark.parametrize("how", ["shape", "dtype", "missing_one", "flipped"])
def test_corrupted_ever_active_masks_are_refused(loaded, how):
    _, constraints, state = loaded
    original = constraints[1].ever_active
    bad = {
        "shape": original.reshape(-1),
        "dtype": original.astype(np.uint8),
        "missing_one": None,
        "flipped": ~original,
    }[how]
    constraints[1].ever_active = bad
    try:
        _refused_and_unchanged(loaded, copy.deepcopy(state), "ever_active")
    finally:
        constraints[1].ever_active = original
