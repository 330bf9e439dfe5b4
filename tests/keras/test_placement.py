"""Mask updates on the host (NumPy) and on the device (keras.ops) give the same run.

On a CPU, ``SparseCallback`` runs its updates on NumPy by default (much less dispatch overhead);
``update_backend='device'`` keeps them on ``keras.ops``. Both must pick the same masks after every
update, leave the same kernels, and reset the same optimizer slots.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers_keras import BatchChecker, data, host, mlp

import sparsecore
from sparsecore.keras import SparseCallback
from sparsecore.keras.placement import UPDATE_BACKENDS, on_host, resolve_update_backend


class MaskRecorder(keras.callbacks.Callback):
    """The masks after every batch (placed after SparseCallback, so after its updates)."""

    def __init__(self, sparse: SparseCallback) -> None:
        super().__init__()
        self.sparse = sparse
        self.masks: list[dict[str, np.ndarray]] = []

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        self.masks.append(self.sparse.masks())


def _run(update_backend: str, options: dict, optimizer=None):
    x, y = data(n=128)
    model = mlp(optimizer=optimizer() if optimizer else None, seed=4)
    cb = SparseCallback(update_backend=update_backend, **options)
    recorder, checker = MaskRecorder(cb), BatchChecker(cb)
    model.fit(
        x, y, batch_size=16, epochs=3, shuffle=False, callbacks=[cb, recorder, checker], verbose=0
    )
    return model, cb, recorder, checker


@pytest.mark.parametrize(
    "options,optimizer",
    [
        ({"density": 0.2, "update_every": 2, "seed": 1}, None),
        (
            {"density": 0.3, "update_every": 3, "reset_optimizer_state": True, "init": "ERK"},
            lambda: keras.optimizers.Adam(1e-2),
        ),
        (
            {"density": 0.2, "update_every": 4, "growth": "momentum_neuron", "min_density": 0.1},
            None,
        ),
    ],
    ids=["default-modes", "adam-reset-erk", "neuron-growth"],
)
def test_host_and_device_updates_give_the_same_run(options, optimizer):
    _, cb_np, rec_np, check_np = _run("host", options, optimizer)
    _, cb_k, rec_k, check_k = _run("device", options, optimizer)
    assert cb_np._backend is not None and cb_np._backend.name == "numpy"
    assert cb_k._backend is not None and cb_k._backend.name == "keras"
    assert len(cb_np.history) == len(cb_k.history) >= 4
    # at least one update changed a mask, so the comparison below compares real updates
    assert sum(r.totals()["net_pruned"] for r in cb_np.history) > 0
    assert len(rec_np.masks) == len(rec_k.masks) == 24
    for i, (a, b) in enumerate(zip(rec_np.masks, rec_k.masks)):
        for name in a:
            assert np.array_equal(a[name], b[name]), f"batch {i}, {name}: masks differ"
    assert set(check_np.totals) == set(check_k.totals) == {cb_np.engine.target}
    for w_np, w_k in zip(cb_np.weights, cb_k.weights):
        np.testing.assert_allclose(host(w_np.variable), host(w_k.variable), rtol=1e-5, atol=1e-6)
    for a, b in zip(cb_np.history, cb_k.history):
        assert [x.nnz_after for x in a.layers] == [x.nnz_after for x in b.layers]
        assert a.extra["ever_active"] == b.extra["ever_active"]


def test_auto_runs_updates_on_numpy_for_cpu_tensors():
    x, y = data()
    model = mlp()
    assert all(on_host(v) for v in model.trainable_variables)
    cb = SparseCallback(update_every=2)
    model.fit(x, y, batch_size=32, epochs=2, callbacks=[cb], verbose=0)
    assert cb._backend is not None and cb._backend.name == "numpy"
    assert len(cb.history) == 2
    # the engine's ever-active masks live with the update backend and are saved as host masks
    assert cb.engine is not None and all(isinstance(e, np.ndarray) for e in cb.engine.ever_active)
    ever = cb.constraints[0].snapshot()[1]
    assert ever is not None and ever.dtype == bool and ever.shape == cb.weights[0].shape


def test_the_earlier_names_are_aliases_of_the_placements():
    """One vocabulary with the PyTorch adapter (sparsecore.placement); 'numpy' and 'keras' keep
    working as the host and the device."""
    variables = mlp().trainable_variables
    assert UPDATE_BACKENDS == ("auto", "host", "device", "numpy", "keras")
    for word, backend in [("host", "numpy"), ("numpy", "numpy"), ("auto", "numpy")]:
        assert resolve_update_backend(word, variables).name == backend
    for word in ("device", "keras"):
        assert resolve_update_backend(word, variables).name == "keras"
    # the torch adapter's words are not Keras' (the error lists what is accepted)
    with pytest.raises(sparsecore.SparseCoreError, match=r"'numpy' for 'host'.*got 'numba'"):
        SparseCallback(update_backend="numba")


def test_update_backend_is_checked_and_kept():
    with pytest.raises(sparsecore.SparseCoreError, match="'cuda'"):
        SparseCallback(update_backend="cuda")
    with pytest.raises(sparsecore.SparseCoreError, match="update_backend"):
        SparseCallback(densty=0.1)


def test_keras_backend_run_resumes_from_a_saved_model(tmp_path):
    x, y = data()
    model = mlp()
    cb = SparseCallback(update_backend="keras", update_every=2, density=0.2)
    model.fit(x, y, batch_size=32, epochs=2, callbacks=[cb], verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    again = SparseCallback(update_backend="keras", update_every=2, density=0.2)
    loaded.fit(x, y, batch_size=32, epochs=1, callbacks=[again], verbose=0)
    # 3 steps per epoch: updates at 2 and 4 (none at the last step, 6); the resumed fit runs
    # to step 9, so the update after step 6 is due now and runs before step 7, then 8.
    assert [r.step for r in cb.history] == [2, 4]
    assert again.engine is not None and [r.step for r in again.history] == [2, 4, 6, 8]
    assert all(not isinstance(e, np.ndarray) for e in again.engine.ever_active)
