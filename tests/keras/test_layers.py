"""Which weights are sparse: layer types, output axes, opt-in/out, nested/functional/subclassed."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers_keras import BatchChecker, host

import sparsecore
from sparsecore.keras import SparseCallback, find_sparse_weights

L = keras.layers


def _built(layer, input_shape):
    model = keras.Sequential([keras.Input(input_shape), layer])
    return model


@pytest.mark.parametrize(
    "layer,input_shape,expected",
    [
        # (attr, output axis, number of output units along that axis)
        (L.Dense(7), (5,), [("kernel", -1, 7)]),
        (L.Conv1D(6, 3), (9, 4), [("kernel", -1, 6)]),
        (L.Conv2D(6, 3), (8, 8, 4), [("kernel", -1, 6)]),
        (L.Conv3D(6, 2), (4, 4, 4, 3), [("kernel", -1, 6)]),
        (L.DepthwiseConv2D(3, depth_multiplier=2), (8, 8, 4), [("kernel", -2, 4)]),
        (
            L.SeparableConv2D(6, 3, depth_multiplier=2),
            (8, 8, 4),
            [("depthwise_kernel", -2, 4), ("pointwise_kernel", -1, 6)],
        ),
        (L.Conv2DTranspose(6, 3), (5, 5, 4), [("kernel", -2, 6)]),
        (L.Conv1DTranspose(6, 3), (5, 4), [("kernel", -2, 6)]),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, L.Layer) else None,
)
def test_layer_types_and_output_axes(layer, input_shape, expected):
    model = _built(layer, input_shape)
    found = find_sparse_weights(model)
    got = [(w.attr, w.axis, w.shape[w.axis]) for w in found]
    assert got == expected
    for w in found:
        assert w.variable is getattr(layer, w.attr)


def test_conv_model_trains_with_neuron_growth_on_every_layer_type():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.SeparableConv2D(8, 3, padding="same", name="sep")(h)
    h = L.Conv2DTranspose(4, 3, strides=2, padding="same", name="up")(h)
    h = L.GlobalAveragePooling2D()(h)
    outputs = L.Dense(3, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 32).astype("int32")
    cb = SparseCallback(density=0.3, growth="momentum_neuron", update_every=2, init="ERK")
    checker = BatchChecker(cb)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[cb, checker], verbose=0)
    assert [w.layer.name for w in cb.weights] == ["conv", "dw", "sep", "sep", "up", "head"]
    assert len(cb.history) == 3 and set(checker.totals) == {cb.engine.target}


def test_embedding_is_opt_in():
    model = keras.Sequential(
        [keras.Input((4,), dtype="int32"), L.Embedding(20, 6, name="emb"), L.Flatten(), L.Dense(2)]
    )
    default = find_sparse_weights(model)
    assert [(type(w.layer), w.attr) for w in default] == [(L.Dense, "kernel")]
    found = find_sparse_weights(model, embeddings=True)
    assert [(w.layer.name, w.attr, w.axis) for w in found][:1] == [("emb", "embeddings", -1)]
    assert [w.attr for w in find_sparse_weights(model, include="emb")] == ["embeddings"]
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    cb = SparseCallback(embeddings=True, density=0.25, update_every=2)
    x = np.random.default_rng(0).integers(0, 20, (16, 4)).astype("int32")
    model.fit(x, np.zeros((16, 2), "float32"), batch_size=4, epochs=1, callbacks=[cb], verbose=0)
    emb = host(model.get_layer("emb").embeddings)
    assert not np.any(emb[~cb.masks()[cb.weights[0].name]])
    assert len(cb.history) == 1


def _mlp():
    return keras.Sequential(
        [keras.Input((6,)), L.Dense(5, name="a"), L.Dense(5, name="b_1"), L.Dense(2, name="b_2")]
    )


@pytest.mark.parametrize(
    "kwargs,names",
    [
        ({}, ["a", "b_1", "b_2"]),
        ({"include": "b_*"}, ["b_1", "b_2"]),
        ({"include": ["a", "b_2"]}, ["a", "b_2"]),
        ({"exclude": "a"}, ["b_1", "b_2"]),
        ({"exclude": L.Dense}, []),
        ({"include": "Dense", "exclude": "b_1"}, ["a", "b_2"]),
        ({"dense_first": True}, ["b_1", "b_2"]),
        ({"dense_last": True}, ["a", "b_1"]),
        ({"dense_first": True, "dense_last": True}, ["b_1"]),
    ],
)
def test_include_exclude_first_last(kwargs, names):
    assert [w.layer.name for w in find_sparse_weights(_mlp(), **kwargs)] == names


def test_bad_include_entries():
    with pytest.raises(sparsecore.SparseCoreError, match="include/exclude"):
        find_sparse_weights(_mlp(), include=[3])
    model = keras.Sequential([keras.Input((4, 3)), L.Bidirectional(L.LSTM(2), name="bi")])
    with pytest.raises(sparsecore.SparseCoreError, match="'bi'"):
        find_sparse_weights(model, include="bi")  # a wrapper: include the layers it wraps


class Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.parts = [L.Dense(8, name="inner1"), L.Dense(8, name="inner2")]

    def call(self, x):
        for part in self.parts:
            x = part(x)
        return x


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = Block(name="block")
        self.head = L.Dense(3, name="head")

    def call(self, x):
        return self.head(self.block(x))


def test_nested_functional_and_subclassed_models():
    inner = keras.Sequential([keras.Input((6,)), L.Dense(4, name="seq_dense")], name="inner")
    inputs = keras.Input((6,))
    shared = L.Dense(6, name="shared")
    h = shared(shared(inputs))  # a shared layer counts once
    h = inner(h)
    outputs = L.Dense(2, name="top")(h)
    functional = keras.Model(inputs, outputs)
    names = [w.layer.name for w in find_sparse_weights(functional)]
    assert names == ["shared", "seq_dense", "top"]

    model = Subclassed(name="subclassed")
    model(np.zeros((2, 5), "float32"))
    found = find_sparse_weights(model)
    assert sorted(w.layer.name for w in found) == ["head", "inner1", "inner2"]
    assert len({w.name for w in found}) == 3
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    cb = SparseCallback(density=0.2, update_every=2)
    x = np.random.default_rng(0).standard_normal((16, 5)).astype("float32")
    model.fit(x, np.zeros((16, 3), "float32"), batch_size=4, epochs=1, callbacks=[cb], verbose=0)
    assert len(cb.history) == 1
    for w in cb.weights:
        assert not np.any(host(w.variable)[~cb.masks()[w.name]])


class OutIn(keras.layers.Layer):
    """A user's dense layer whose weight ``w`` is stored as (out, in)."""

    def __init__(self, units: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape) -> None:
        self.w = self.add_weight(shape=(self.units, input_shape[-1]), name="w")

    def call(self, x):
        return keras.ops.matmul(x, keras.ops.transpose(self.w))


@pytest.fixture
def user_rules():
    from sparsecore.keras import discovery

    saved = list(discovery._USER_RULES)
    yield
    discovery._USER_RULES[:] = saved


def test_users_declare_their_own_layer_types(user_rules):
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [keras.Input((6,)), OutIn(9, name="mine"), L.Activation("relu"), L.Dense(3, name="head")]
    )
    assert [w.layer.name for w in find_sparse_weights(model)] == ["head"]
    with pytest.raises(sparsecore.SparseCoreError, match="does not know which of its weights"):
        find_sparse_weights(model, include=["mine", "head"])
    sparsecore.keras.register_layer_type(OutIn, attr="w", axis=0)
    found = find_sparse_weights(model)
    assert [(w.layer.name, w.attr, w.axis, w.shape[w.axis]) for w in found] == [
        ("mine", "w", 0, 9),
        ("head", "kernel", -1, 3),
    ]
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 6)).astype("float32")
    y = rng.integers(0, 3, 32).astype("int32")
    cb = SparseCallback(density=0.4, growth="momentum_neuron", update_every=2)
    checker = BatchChecker(cb)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[cb, checker], verbose=0)
    assert len(cb.history) == 3 and set(checker.totals) == {cb.engine.target}
    assert cb.history[-1].layers[0].units == 9  # output units along axis 0
    with pytest.raises(sparsecore.SparseCoreError, match="keras.layers.Layer subclass"):
        sparsecore.keras.register_layer_type(int, attr="w", axis=0)
    sparsecore.keras.register_layer_type(OutIn, attr="w", axis=2)
    with pytest.raises(sparsecore.SparseCoreError, match="has no output axis 2"):
        find_sparse_weights(model)
