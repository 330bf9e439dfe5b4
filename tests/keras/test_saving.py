"""Masks and engine state survive model.save()/load_model() and ModelCheckpoint; a resumed fit
continues exactly like an uninterrupted one."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers_keras import BatchChecker, data, host, mlp

import sparsecore
from sparsecore.keras import SparseCallback, SparseMask

OPTIONS = {"density": 0.15, "update_every": 3, "seed": 3}
EPOCHS, BATCH = 4, 16  # 96 samples: 6 steps per epoch, 24 in all, updates at 3, 6, ..., 21


@pytest.fixture(autouse=True, scope="module")
def _deterministic_ops():
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def _fit(model, x, y, callbacks, initial_epoch=0, epochs=EPOCHS):
    return model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        callbacks=callbacks,
        verbose=0,
    )


def _state(model, cb):
    return {w.name: (host(w.variable), cb.masks()[w.name]) for w in cb.weights}


def _assert_same_run(a_model, a_cb, b_model, b_cb):
    a, b = _state(a_model, a_cb), _state(b_model, b_cb)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name][1], b[name][1]), f"{name}: masks differ"
        np.testing.assert_allclose(a[name][0], b[name][0], rtol=1e-5, atol=1e-6, err_msg=name)
    assert [r.step for r in a_cb.history] == [r.step for r in b_cb.history]
    assert a_cb.engine.updates == b_cb.engine.updates
    assert [r.prune_rate for r in a_cb.history] == pytest.approx(
        [r.prune_rate for r in b_cb.history]
    )


@pytest.fixture(scope="module")
def reference():
    x, y = data()
    model = mlp(seed=11)
    cb = SparseCallback(**OPTIONS)
    _fit(model, x, y, [cb])
    assert [r.step for r in cb.history] == [3, 6, 9, 12, 15, 18, 21]
    return model, cb


class _StopAfter(keras.callbacks.Callback):
    """Ends training after ``epochs`` epochs, as if the job had been killed there."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.epochs:
            self.model.stop_training = True


def test_model_checkpoint_resume_equals_uninterrupted(tmp_path, reference):
    x, y = data()
    model = mlp(seed=11)
    cb = SparseCallback(**OPTIONS)
    ckpt = keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt-{epoch}.keras"))
    _fit(model, x, y, [cb, ckpt, _StopAfter(2)])
    assert cb.engine.updates == 4

    loaded = keras.models.load_model(tmp_path / "ckpt-2.keras")
    constraints = [layer.kernel.constraint for layer in loaded.layers]
    assert all(isinstance(c, SparseMask) for c in constraints)
    saved_masks = {c.name: c.mask_numpy() for c in constraints}
    assert all(np.array_equal(saved_masks[k], v) for k, v in cb.masks().items())
    # the loaded model keeps its masks in force even without the callback
    assert all(
        not np.any(host(layer.kernel)[~c.mask_numpy()])
        for layer, c in zip(loaded.layers, constraints)
    )

    resumed = SparseCallback()  # no options: the saved run's options are used
    checker = BatchChecker(resumed)
    _fit(loaded, x, y, [resumed, checker], initial_epoch=2)
    assert resumed.engine.config.density == OPTIONS["density"]
    assert set(checker.totals) == {resumed.engine.target}
    ref_model, ref_cb = reference
    _assert_same_run(ref_model, ref_cb, loaded, resumed)


def test_model_save_and_load_with_explicit_total_steps(tmp_path, reference):
    x, y = data()
    model = mlp(seed=11)
    cb = SparseCallback(total_steps=24, **OPTIONS)
    _fit(model, x, y, [cb], epochs=2)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    resumed = SparseCallback(total_steps=24, **OPTIONS)
    _fit(loaded, x, y, [resumed], initial_epoch=2)
    ref_model, ref_cb = reference
    _assert_same_run(ref_model, ref_cb, loaded, resumed)
    # ever-active positions survive the round trip too
    assert resumed.history[-1].extra["ever_active"] == ref_cb.history[-1].extra["ever_active"]


def test_resume_refuses_other_options_and_changes_nothing(tmp_path):
    x, y = data()
    model = mlp(seed=2)
    _fit(model, x, y, [SparseCallback(**OPTIONS)], epochs=1)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    before = [host(layer.kernel).copy() for layer in loaded.layers]
    masks = [layer.kernel.constraint.mask_numpy() for layer in loaded.layers]
    with pytest.raises(sparsecore.SparseCoreError, match="density"):
        _fit(loaded, x, y, [SparseCallback(density=0.5)], initial_epoch=1, epochs=2)
    for layer, k, m in zip(loaded.layers, before, masks):
        assert np.array_equal(host(layer.kernel), k)
        assert np.array_equal(layer.kernel.constraint.mask_numpy(), m)
