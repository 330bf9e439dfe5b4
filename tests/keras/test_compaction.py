"""sparsecore.keras.compact: a smaller functional model with the masked model's outputs.

Runs on the TensorFlow and the PyTorch backends of Keras (tox runs tests/keras on both):
random convolutional networks (hypothesis) with empty filters and unread channels, batch norm,
'same' and 'valid' padding, groups, pooling, residual additions and flattening; a Sequential MLP
trained with SparseCallback (masks from its constraints), saved and loaded; training mode with
``for_training=True``; bad input.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers_keras import data, host, mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecore.errors import SparseCoreError
from sparsecore.keras import SparseCallback, SparseMask, compact

L = keras.layers


def _close(got, want, rtol: float = 1e-5) -> None:
    got, want = host(got), host(want)
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"max error {err:.3g}, scale {scale:.3g}"


def _sparsify(model: keras.Model, rng: np.random.Generator, density: float) -> None:
    """Random masks with a third of each layer's units emptied; random batch-norm statistics."""
    for layer in model.layers:
        if isinstance(layer, (L.Dense, L.Conv2D)):
            kernel = host(layer.kernel)
            keep = rng.random(kernel.shape) < density
            keep[..., rng.random(kernel.shape[-1]) < 0.35] = False
            layer.kernel.assign(kernel * keep)
            if layer.use_bias:
                layer.bias.assign(rng.standard_normal(layer.bias.shape).astype("float32") * 0.1)
        if isinstance(layer, L.BatchNormalization):
            for var in (layer.gamma, layer.beta, layer.moving_mean):
                var.assign(rng.standard_normal(var.shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))


def _convnet(spec: dict) -> keras.Model:
    keras.utils.set_random_seed(spec["seed"])
    x = inputs = keras.Input((8, 8, 4))
    for i, (filters, padding, groups, bn) in enumerate(spec["convs"]):
        groups = groups if x.shape[-1] % groups == 0 else 1
        act = "relu" if i % 2 == 0 else None
        x = L.Conv2D(filters * groups, 3, padding=padding, groups=groups, activation=act)(x)
        if bn:
            x = L.BatchNormalization()(x)
        if act is None:
            x = L.Activation("tanh")(x)
    if spec["residual"]:
        branch = L.Conv2D(x.shape[-1], 1)(x)
        x = L.ReLU()(L.Add()([x, branch]))
    x = L.MaxPooling2D(2, padding="same")(x) if spec["pool"] == "max" else L.AveragePooling2D(2)(x)
    x = L.Flatten()(x) if spec["flatten"] else L.GlobalAveragePooling2D()(x)
    x = L.Dense(12, activation="relu")(x)
    return keras.Model(inputs, L.Dense(3)(x))


@settings(max_examples=8, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "seed": st.integers(0, 1000),
            "convs": st.lists(
                st.tuples(
                    st.integers(2, 6),
                    st.sampled_from(["same", "valid"]),
                    st.sampled_from([1, 1, 2]),
                    st.booleans(),
                ),
                min_size=1,
                max_size=2,
            ),
            "residual": st.booleans(),
            "pool": st.sampled_from(["max", "avg"]),
            "flatten": st.booleans(),
            "density": st.sampled_from([0.15, 0.5]),
        }
    )
)
def test_compact_equals_masked_model_in_inference(spec: dict) -> None:
    model = _convnet(spec)
    rng = np.random.default_rng(spec["seed"])
    _sparsify(model, rng, spec["density"])
    small, report = compact(model)
    assert report.max_abs_difference is not None
    x = rng.standard_normal((5, 8, 8, 4)).astype("float32")
    _close(small(x, training=False), model(x, training=False))
    for layer in small.layers:  # plain layers: no sparsecore constraint
        assert not isinstance(getattr(layer, "kernel_constraint", None), SparseMask)


def test_sparse_callback_masks_and_saving(tmp_path) -> None:
    x, y = data()
    model = mlp(seed=5)
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[SparseCallback(density=0.1, update_every=3)],
    )
    fc1 = model.get_layer("fc1")
    mask = fc1.kernel_constraint.mask_numpy()
    small, report = compact(model, x[:8])
    assert report.layer("fc1").empty == int((~mask.any(axis=0)).sum())
    assert small.get_layer("fc1").kernel.shape[1] == report.layer("fc1").kept_out
    _close(small.predict(x, verbose=0), model.predict(x, verbose=0))
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.models.load_model(path)
    _close(loaded.predict(x, verbose=0), small.predict(x, verbose=0), rtol=1e-6)


def test_for_training_keeps_batch_norm_constants_and_is_exact_in_training_mode() -> None:
    keras.utils.set_random_seed(2)
    inputs = keras.Input((6, 6, 3))
    h = L.Conv2D(8, 3, use_bias=True)(inputs)
    h = L.BatchNormalization()(h)
    h = L.ReLU()(h)
    h = L.Conv2D(6, 1)(h)
    out = L.Dense(2)(L.Flatten()(h))
    model = keras.Model(inputs, out)
    rng = np.random.default_rng(0)
    _sparsify(model, rng, 0.4)
    x = rng.standard_normal((6, 6, 6, 3)).astype("float32")
    inference, fast = compact(model)
    training, exact = compact(model, for_training=True)
    conv = fast.layer(model.layers[1].name)
    assert conv.empty > 0 and exact.layer(model.layers[1].name).kept_out > conv.kept_out
    _close(inference(x, training=False), model(x, training=False))
    _close(training(x, training=False), model(x, training=False))
    # training mode uses batch statistics: the removed constants differ from their inference
    # values, so only the for_training model follows the original there
    _close(training(x, training=True), model(x, training=True))


class _Subclassed(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.fc = L.Dense(2)

    def call(self, x):
        return self.fc(x)


def test_bad_models_are_refused() -> None:
    sub = _Subclassed()
    sub(np.zeros((1, 3), "float32"))
    with pytest.raises(SparseCoreError, match="subclassed"):
        compact(sub)
    with pytest.raises(SparseCoreError, match="input shape"):
        compact(keras.Sequential([L.Dense(2)]))
    open_size = keras.Model(*(lambda i: (i, L.Dense(2)(i)))(keras.Input((None, 3))))
    with pytest.raises(SparseCoreError, match="example_input"):
        compact(open_size)
