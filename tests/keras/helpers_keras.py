"""Small real models and data for the Keras adapter tests."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops


def data(n: int = 96, features: int = 12, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype("float32")
    y = (np.abs(x[:, :classes]).argmax(1)).astype("int32")
    return x, y


def mlp(features: int = 12, classes: int = 3, optimizer: Any = None, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(32, activation="relu", name="fc1"),
            keras.layers.Dense(16, activation="relu", name="fc2"),
            keras.layers.Dense(classes, name="out"),
        ]
    )
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def sync_jax_state(model: Any) -> None:
    """On JAX, write fit()'s training state back into the variables so that they can be read
    during an epoch (Keras' own ``jax_state_sync``; the trainer reads them again afterwards)."""
    if keras.backend.backend() == "jax":
        model.jax_state_sync()


def host(x: Any) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x))


class BatchChecker(keras.callbacks.Callback):
    """After every batch: each sparse kernel is exactly 0 outside its mask; records the masks."""

    def __init__(self, sparse: Any) -> None:
        super().__init__()
        self.sparse = sparse
        self.batches = 0
        self.totals: list[int] = []

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        sync_jax_state(self.model)
        total = 0
        for w, c in zip(self.sparse.weights, self.sparse.constraints):
            kernel, mask = host(w.variable), c.mask_numpy()
            assert not np.any(kernel[~mask]), f"{w.name}: nonzero weight outside the mask"
            total += int(mask.sum())
        self.totals.append(total)
        self.batches += 1
