"""ablate_below with SparseCallback in a real Keras fit: units emptied, the output layer whole."""

from __future__ import annotations

import numpy as np
from helpers_keras import data, mlp

from sparsecore.keras import SparseCallback


def test_callback_with_ablation_empties_units_and_keeps_the_count():
    x, y = data()
    model = mlp()
    cb = SparseCallback(density=0.2, update_every=3, ablate_below=0.8)
    model.fit(x, y, batch_size=16, epochs=3, callbacks=[cb], verbose=0)
    target = cb.engine.target
    assert all(r.total_nnz == target for r in cb.history)
    masks = cb.masks()
    assert sum(int(m.sum()) for m in masks.values()) == target
    last = cb.history[-1].layers
    assert last[0].ablated > 0 and last[-1].ablated == 0
    fc1 = masks["fc1/kernel"]  # Keras kernels: output units on the last axis
    assert 32 - int(fc1.any(axis=0).sum()) >= last[0].ablated
    assert masks["out/kernel"].any(axis=0).all()
    kernel = np.asarray(model.get_layer("fc1").kernel)
    assert (kernel[:, ~fc1.any(axis=0)] == 0).all()
