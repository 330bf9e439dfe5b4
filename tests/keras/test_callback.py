"""SparseCallback in real ``fit`` loops: masking in the train step, schedule, momentum, logs, errors."""

from __future__ import annotations

import itertools
import math

import keras
import numpy as np
import pytest
from helpers_keras import BatchChecker, data, host, mlp, sync_jax_state

import sparsecore
from sparsecore.keras import SparseCallback, SparseMask


def test_default_callback_trains_sparse_with_exact_count():
    x, y = data()
    model = mlp()
    cb = SparseCallback(update_every=3)
    checker = BatchChecker(cb)
    model.fit(x, y, batch_size=16, epochs=3, callbacks=[cb, checker], verbose=0)
    sizes = [12 * 32, 32 * 16, 16 * 3]
    target = round(0.05 * sum(sizes))
    assert cb.engine is not None and cb.engine.target == target
    assert checker.batches == 18 and set(checker.totals) == {target}
    # updates after steps 3, 6, ..., 15 (none at or after total_steps = 18)
    assert [r.step for r in cb.history] == [3, 6, 9, 12, 15]
    assert all(r.total_nnz == target for r in cb.history)
    assert sum(r.totals()["net_pruned"] for r in cb.history) > 0
    assert cb.engine.config.total_steps == 18
    assert all(isinstance(w.variable.constraint, SparseMask) for w in cb.weights)
    assert [w.name for w in cb.weights] == ["fc1/kernel", "fc2/kernel", "out/kernel"]


def test_summary_is_a_per_layer_table_and_repr_one_line():
    x, y = data()
    model = mlp()
    cb = SparseCallback(update_every=3)
    assert repr(cb) == "SparseCallback(not attached, density 0.05)"
    with pytest.raises(sparsecore.SparseCoreError, match="not attached"):
        cb.summary()
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0)
    lines: list[str] = []
    cb.summary(print_fn=lines.append)
    assert lines[0].startswith("SparseCallback: 3 sparse weights, ") and "step 12" in lines[0]
    assert "3 mask updates" in lines[0]  # after steps 3, 6, 9
    rows = {line.split()[0]: line for line in lines[3:-1]}
    last = cb.history[-1]
    for i, (name, mask) in enumerate(cb.masks().items()):
        cells = rows[name].split()
        assert f"({mask.shape[0]}, {mask.shape[1]})" in rows[name]
        assert cells[-8:-5] == [str(mask.size), str(int(mask.sum())), f"{100 * mask.mean():.2f}%"]
        assert cells[-4:-2] == [str(last.layers[i].pruned), str(last.layers[i].grown)]
        assert cells[-1] == f"{last.layers[i].dead_units}/{last.layers[i].units}"
    assert rows["all"].split()[2] == str(cb.engine.target)
    assert "\n" not in repr(cb) and repr(cb).startswith("SparseCallback(3 sparse weights, density")


def test_mask_is_applied_inside_the_train_step_without_the_callback():
    x, y = data()
    model = mlp()
    cb = SparseCallback()
    cb.attach(model)
    before = cb.masks()
    checker = BatchChecker(cb)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[checker], verbose=0)  # no SparseCallback
    assert checker.batches == 12
    after = cb.masks()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # the kept weights did train
    assert all(np.any(host(w.variable)[cb.masks()[w.name]] != 0) for w in cb.weights)


def _snapshot(cb, model, reader_kind: str):
    out = []
    for w, c in zip(cb.weights, cb.constraints):
        m = cb._reader.read(w.variable, w.name)
        out.append(sparsecore.Layer(w.name, host(w.variable), c.mask_numpy(), host(m), axis=w.axis))
    return out


@pytest.mark.parametrize(
    "optimizer,adam_momentum",
    [
        (lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True), "exp_avg"),
        # "normalized" (the default) applies to the Adam family only: SGD's slot as it is
        (lambda: keras.optimizers.SGD(0.05, momentum=0.9), "normalized"),
        (lambda: keras.optimizers.Adam(1e-2), "exp_avg"),
        (lambda: keras.optimizers.AdamW(1e-2, weight_decay=1e-3), "normalized"),
        (lambda: keras.optimizers.Nadam(1e-2), "exp_avg"),
    ],
    ids=["sgd", "sgd-normalized", "adam", "adamw-normalized", "nadam"],
)
def test_update_reads_optimizer_momentum_and_equals_numpy_reference(optimizer, adam_momentum):
    x, y = data()
    model = mlp(optimizer=optimizer())
    cb = SparseCallback(
        update_every=None, density=0.2, seed=5, adam_momentum=adam_momentum, recipe="paper"
    )
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0)
    slots = [cb._reader.read(w.variable, w.name) for w in cb.weights]
    assert all(np.any(host(s) != 0) for s in slots), "momentum must be read from the slots"
    layers = _snapshot(cb, model, adam_momentum)
    # momentum exists at inactive positions too (dense gradients, never masked)
    assert any(np.any(layer.momentum[~layer.mask] != 0) for layer in layers)
    rate = 0.3
    ref = sparsecore.update(layers, prune_rate=rate, update_index=1, seed=5)
    cb.engine.config = cb.engine.config.replace(prune_schedule="constant", prune_rate=rate)
    report = cb.update_masks(step=12)
    assert report.update == 1
    for layer, new_ref, w, c in zip(layers, ref.masks, cb.weights, cb.constraints):
        assert np.array_equal(c.mask_numpy(), new_ref), w.name
        kernel = host(w.variable)
        kept = layer.mask & new_ref
        assert np.array_equal(kernel[kept].view(np.uint32), layer.weight[kept].view(np.uint32))
        assert not np.any(kernel[~kept])
        assert not np.any(np.signbit(kernel[~kept]))
    for a, b in zip(ref.report.layers, report.layers):
        assert math.isclose(a.importance, b.importance, rel_tol=1e-6)


def test_epoch_end_updates_and_logs_reach_history():
    x, y = data()
    model = mlp()
    cb = SparseCallback(update_every=None, update_at_epoch_end=True, density=0.1)
    hist = model.fit(x, y, batch_size=32, epochs=3, callbacks=[cb], verbose=0)
    # epoch-end updates after epochs 1 and 2, none after the last
    assert [r.step for r in cb.history] == [3, 6]
    h = hist.history
    assert h["sparse_updates"] == [1.0, 2.0, 2.0]
    target = cb.engine.target / sum(math.prod(s) for s in cb.engine.shapes)
    assert h["sparse_density"] == pytest.approx([target] * 3)
    assert all(m <= d + 1e-12 for m, d in zip(h["sparse_measured_density"], h["sparse_density"]))
    assert h["sparse_prune_rate"][0] == pytest.approx(cb.history[0].prune_rate)
    assert h["sparse_pruned"][1] == cb.history[1].totals()["pruned"]
    per_layer = {k for k in h if k.startswith("sparse_density/")}
    assert per_layer == {f"sparse_density/{w.name}" for w in cb.weights}
    # epoch-end only: Keras keeps async dispatch (our batch hook is the default one)
    assert keras.src.utils.python_utils.is_default(cb.on_train_batch_end)


def test_tensorboard_gets_the_sparse_scalars(tmp_path):
    import tensorflow as tf  # installed (with tensorboard) in both Keras tox envs

    x, y = data()
    model = mlp()
    cb = SparseCallback(update_every=2)
    tb = keras.callbacks.TensorBoard(log_dir=str(tmp_path))
    model.fit(x, y, batch_size=32, epochs=2, callbacks=[cb, tb], verbose=0)
    tags = set()
    for path in tmp_path.rglob("events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(v.tag for v in event.summary.value)
    assert {"epoch_sparse_density", "epoch_sparse_updates", "epoch_sparse_pruned"} <= tags


def test_reset_optimizer_state_zeroes_slots_at_changed_positions():
    x, y = data()
    model = mlp(optimizer=keras.optimizers.Adam(1e-2))
    cb = SparseCallback(update_every=None, density=0.2, reset_optimizer_state=True)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    before = cb.masks()
    cb.engine.config = cb.engine.config.replace(prune_schedule="constant", prune_rate=0.5)
    cb.update_masks(step=6)
    after = cb.masks()
    opt = model.optimizer
    changed_any = False
    for w in cb.weights:
        changed = before[w.name] != after[w.name]
        changed_any |= bool(changed.any())
        i = opt._get_variable_index(w.variable)
        for slots in (opt._momentums, opt._velocities):
            s = host(slots[i])
            assert not np.any(s[changed])
            assert np.any(s[~changed])
    assert changed_any


def test_nonfinite_momentum_raises_and_changes_nothing_or_skips():
    x, y = data()
    model = mlp()
    cb = SparseCallback(update_every=None)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    opt = model.optimizer
    w0 = cb.weights[1]
    slot = opt.momentums[opt._get_variable_index(w0.variable)]
    bad = host(slot).copy()
    bad[0, 0] = np.nan
    slot.assign(bad)
    masks, kernels = cb.masks(), [host(w.variable).copy() for w in cb.weights]
    with pytest.raises(sparsecore.NonFiniteError, match="fc2"):
        cb.update_masks(step=6)
    assert all(np.array_equal(masks[k], v) for k, v in cb.masks().items())
    assert all(np.array_equal(k, host(w.variable)) for k, w in zip(kernels, cb.weights))
    cb.engine.config = cb.engine.config.replace(on_nonfinite="skip")
    report = cb.update_masks(step=6)
    assert report.skipped and "fc2" in report.reason
    assert all(np.array_equal(masks[k], v) for k, v in cb.masks().items())


# -- bad input: a clear error, nothing changed -------------------------------------------------


def _unchanged(model, kernels):
    for layer, k in zip(model.layers, kernels):
        assert layer.kernel.constraint is None
        assert np.array_equal(host(layer.kernel), k)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, True])
def test_density_outside_range(density):
    with pytest.raises(sparsecore.SparseCoreError, match="density"):
        SparseCallback(density=density)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dense_first": "no"}, "dense_first must be True or False, got 'no'"),
        ({"embeddings": 1}, "embeddings must be True or False, got 1"),
        ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
        ({"update_every": True}, "update_every must be a positive integer or None, got True"),
    ],
)
def test_settings_that_cannot_work_are_refused(options, message):
    with pytest.raises(sparsecore.SparseCoreError, match=message):
        SparseCallback(**options)


def test_unknown_option_and_gradient_growth_are_refused():
    with pytest.raises(sparsecore.SparseCoreError, match="densty"):
        SparseCallback(densty=0.1)
    with pytest.raises(sparsecore.SparseCoreError, match="growth='momentum'"):
        SparseCallback(growth="gradient")


def test_dead_units_are_revived_with_the_engines_weights():
    """The default options: a layer with dead units gets weights grown into them at +-scale,
    exactly the NumPy reference's new weights."""
    x, y = data()
    model = mlp(optimizer=keras.optimizers.Adam(1e-2))
    cb = SparseCallback(update_every=None, density=0.1, seed=2)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0)
    layers = _snapshot(cb, model, "exp_avg")
    layers[1].momentum[:, :4] = 0  # fc2's first four units get no gradient: dead
    config = cb.engine.config.replace(prune_schedule="constant", prune_rate=0.3)
    ref = sparsecore.update(
        layers, prune_rate=0.3, update_index=1, seed=2, growth=config.growth,
        revive_dead_units=True,
    )  # fmt: skip
    assert ref.report.layers[1].dead_units >= 4 and ref.report.layers[1].revived > 0
    reader = cb._reader
    reader.read = lambda variable, name: next(  # the same momentum as the reference
        layer.momentum for layer, w in zip(layers, cb.weights) if w.variable is variable
    )
    cb.engine.config = config
    report = cb.update_masks(step=12)
    assert [r.revived for r in report.layers] == [r.revived for r in ref.report.layers]
    for new, w, c, mask in zip(
        sparsecore.new_weights(layers, ref), cb.weights, cb.constraints, ref.masks
    ):
        assert np.array_equal(c.mask_numpy(), mask)
        assert np.array_equal(host(w.variable).view(np.uint32), new.view(np.uint32)), w.name
    scale = np.float32(1 / math.sqrt(32))  # fc2 kernel (32, 16): 32 inputs per unit
    fc2 = host(cb.weights[1].variable)
    fresh = ref.masks[1] & ~layers[1].mask & (np.abs(fc2) == scale)
    assert fresh.sum() == ref.report.layers[1].revived


class _KernelRecorder(keras.callbacks.Callback):
    """The kernels after every batch (host copies)."""

    def __init__(self, sparse):
        super().__init__()
        self.sparse = sparse
        self.kernels = []

    def on_train_batch_end(self, batch, logs=None):
        sync_jax_state(self.model)
        self.kernels.append([host(w.variable).copy() for w in self.sparse.weights])


@pytest.mark.parametrize(
    "optimizer,source",
    [
        (lambda: keras.optimizers.Adam(1e-2), "Adam's m / (sqrt(v) + epsilon)"),
        (lambda: keras.optimizers.SGD(0.05, momentum=0.9), "SGD's momentum slot (momentums)"),
        (lambda: keras.optimizers.Lion(1e-3), "Lion's first moment (m)"),
        (lambda: keras.optimizers.Adamax(1e-2), "Adamax's first moment (m)"),
    ],
)
def test_default_momentum_is_adams_step_direction_and_others_as_they_are(optimizer, source):
    """adam_momentum="normalized" (the default) divides by sqrt(v) where the optimizer keeps a
    second moment, and reads every other optimizer's momentum as it is (nothing refused)."""
    x, y = data()
    model = mlp(optimizer=optimizer())
    cb = SparseCallback(density=0.3, update_every=4)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0)
    assert cb.engine.config.adam_momentum == "normalized"
    assert cb.momentum_source == source
    assert len(cb.history) >= 1 and all(layer.importance > 0 for layer in cb.history[0].layers)


@pytest.mark.parametrize(
    "optimizer,name",
    [
        (lambda: keras.optimizers.SGD(0.1), "SGD"),
        (lambda: keras.optimizers.Adagrad(0.1), "Adagrad"),
        (lambda: keras.optimizers.RMSprop(0.01), "RMSprop"),
    ],
)
def test_optimizer_without_momentum_uses_the_own_gradient_average(optimizer, name, caplog):
    x, y = data()
    model = mlp(optimizer=optimizer())
    cb = SparseCallback(density=0.3, update_every=4)
    with caplog.at_level("INFO", logger="sparsecore"):
        model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0)
    source = f"the library's own gradient average (beta 0.9): {name} keeps no momentum"
    assert cb.momentum_source == source
    assert [r.getMessage() for r in caplog.records].count(
        f"sparsecore: sparse momentum reads {source}"
    ) == 1
    assert len(cb.history) == 2 and all(r.total_nnz == cb.engine.target for r in cb.history)
    own = [host(cb._reader.read(w.variable, w.name)) for w in cb.weights]
    masks = cb.masks()
    # dense gradients: the average reaches inactive positions, where regrowth looks
    inactive = [(p, ~masks[w.name]) for p, w in zip(own, cb.weights) if not masks[w.name].all()]
    assert inactive and all(np.any(p[free] != 0) for p, free in inactive)


def test_own_average_is_the_gradient_ema_of_the_keras_steps():
    """With plain SGD, each step moves an active weight by -lr * gradient, so the own average at
    active positions can be rebuilt from the kernels: P = sum_t beta^(T-t) (1 - beta) g_t."""
    x, y = data()
    lr, beta = 0.1, 0.8
    model = mlp(optimizer=keras.optimizers.SGD(lr))
    cb = SparseCallback(density=0.5, update_every=1000, momentum_beta=beta)  # no update
    cb.attach(model)
    start = [host(w.variable).copy() for w in cb.weights]
    recorder = _KernelRecorder(cb)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, callbacks=[cb, recorder], verbose=0)
    assert len(recorder.kernels) == 3
    for i, w in enumerate(cb.weights):
        mask = cb.masks()[w.name]
        kernels = [start[i]] + [k[i] for k in recorder.kernels]
        expected = np.zeros_like(start[i], dtype=np.float64)
        for before, after in itertools.pairwise(kernels):
            expected = beta * expected + (1 - beta) * (before - after) / lr
        own = host(cb._reader.read(w.variable, w.name))
        np.testing.assert_allclose(own[mask], expected[mask], rtol=2e-3, atol=1e-6)


def test_model_without_prunable_layers():
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    with pytest.raises(sparsecore.SparseCoreError, match="no layer sparsecore can make sparse"):
        model.fit(
            np.zeros((8, 4)), np.zeros((8, 4)), epochs=1, callbacks=[SparseCallback()], verbose=0
        )


def test_model_not_built():
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(sparsecore.SparseCoreError, match="not built"):
        SparseCallback().attach(model)
    assert not model.built


def test_existing_constraint_and_exclude_everything():
    model = mlp()
    model.layers[1].kernel.constraint = keras.constraints.NonNeg()
    kernels = [host(layer.kernel).copy() for layer in model.layers]
    with pytest.raises(sparsecore.SparseCoreError, match="fc2"):
        SparseCallback().attach(model)
    assert model.layers[0].kernel.constraint is None
    assert np.array_equal(host(model.layers[0].kernel), kernels[0])
    with pytest.raises(sparsecore.SparseCoreError, match="no layer"):
        SparseCallback(exclude="Dense").attach(mlp())


def test_update_every_must_fit_steps_per_execution():
    x, y = data()
    model = mlp()
    if keras.backend.backend() != "tensorflow":  # Keras' torch trainer refuses spe > 1 itself
        model.steps_per_execution = 2
        kernels = [host(layer.kernel).copy() for layer in model.layers]
        with pytest.raises(sparsecore.SparseCoreError, match="steps_per_execution=2"):
            cb = SparseCallback(update_every=3, total_steps=100)
            cb.set_model(model)
            cb.on_train_begin()
        _unchanged(model, kernels)
        return
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=2,
    )
    kernels = [host(layer.kernel).copy() for layer in model.layers]
    with pytest.raises(sparsecore.SparseCoreError, match="steps_per_execution=2"):
        model.fit(
            x, y, batch_size=16, epochs=1, callbacks=[SparseCallback(update_every=3)], verbose=0
        )
    _unchanged(model, kernels)
    cb = SparseCallback(update_every=2)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert [r.step for r in cb.history] == [2, 4]


def test_mixed_precision_loss_scale_optimizer():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x, y = data()
        model = keras.Sequential(
            [
                keras.Input((12,)),
                keras.layers.Dense(32, activation="relu", name="fc1"),
                keras.layers.Dense(3, dtype="float32", name="out"),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    cb = SparseCallback(density=0.2, update_every=2)
    checker = BatchChecker(cb)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb, checker], verbose=0)
    assert len(cb.history) == 5 and set(checker.totals) == {cb.engine.target}
    # the momentum came from the wrapped optimizer's slots
    assert all(r.importance > 0 for r in cb.history[-1].layers)


def test_sparsifying_a_model_that_was_already_trained_dense():
    # The dense fit traced a train step without constraints; attaching must rebuild it.
    x, y = data()
    model = mlp()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    cb = SparseCallback(update_every=4)
    checker = BatchChecker(cb)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb, checker], verbose=0)
    assert checker.batches == 12 and set(checker.totals) == {cb.engine.target}
    # updates are counted from this fit's start (optimizer step 6): steps 8, 12, 16
    assert [r.step for r in cb.history] == [8, 12, 16]


def test_takes_exactly_the_sparse_config_options():
    defaults = sparsecore.SparseConfig().to_dict()
    assert set(defaults) | {"recipe"} == set(sparsecore.option_names())
    cb = SparseCallback(**defaults)
    assert cb.config == sparsecore.SparseConfig()
    custom = {"density": 0.3, "init": "ERK", "prune_rate": 0.4, "seed": 9, "max_density": 0.9}
    assert SparseCallback(**custom).config == sparsecore.SparseConfig(**custom)
    paper = SparseCallback(recipe="paper", density=0.3).config
    assert paper == sparsecore.SparseConfig(density=0.3, **sparsecore.config.RECIPES["paper"])
    with pytest.raises(sparsecore.SparseCoreError, match="recipe must be one of"):
        SparseCallback(recipe="papr")


@pytest.mark.parametrize(
    "options",
    [
        {"prune": "SET", "growth": "random", "redistribution": "none"},
        {"redistribution": "magnitude", "growth": "momentum_neuron", "init": "ER"},
        {"redistribution": "nonzero", "min_density": 0.05, "max_density": 0.6},
    ],
    ids=["set", "neuron", "nonzero-bounds"],
)
def test_other_modes_through_fit(options):
    x, y = data()
    model = mlp()
    cb = SparseCallback(density=0.2, update_every=2, **options)
    checker = BatchChecker(cb)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb, checker], verbose=0)
    assert len(cb.history) == 5 and set(checker.totals) == {cb.engine.target}
    for r in cb.history:
        for layer in r.layers:
            assert layer.nnz_after <= layer.size * cb.engine.config.max_density
            assert layer.nnz_after >= math.ceil(layer.size * cb.engine.config.min_density)
        if options.get("redistribution") == "none":
            assert all(layer.pruned == layer.grown for layer in r.layers)


class _BeginChecker(keras.callbacks.Callback):
    """Before every batch (after SparseCallback's hook): kernels are 0 outside the masks.

    Only a batch-begin hook, so Keras keeps its asynchronous batch-end dispatch on."""

    def __init__(self, sparse: SparseCallback) -> None:
        super().__init__()
        self.sparse = sparse
        self.totals: list[int] = []

    def on_train_batch_begin(self, batch, logs=None):
        sync_jax_state(self.model)
        total = 0
        for w, c in zip(self.sparse.weights, self.sparse.constraints):
            mask = c.mask_numpy()
            assert not np.any(host(w.variable)[~mask]), w.name
            total += int(mask.sum())
        self.totals.append(total)


def test_default_schedule_keeps_async_batch_dispatch_and_updates_at_epoch_ends():
    from keras.src.callbacks.callback_list import CallbackList

    x, y = data()
    model = mlp()
    cb = SparseCallback(update_every=3)
    # no per-batch host work: Keras may dispatch batch ends asynchronously
    assert keras.src.utils.python_utils.is_default(cb.on_train_batch_end)
    if keras.src.backend.IS_THREAD_SAFE:
        assert CallbackList([cb], model=model)._async_train
    checker = _BeginChecker(cb)
    hist = model.fit(x, y, batch_size=16, epochs=3, callbacks=[cb, checker], verbose=0)
    # 6 steps per epoch: the updates after steps 6 and 12 (an epoch's last step) run at that
    # epoch's end, so its logs count them, and are not repeated before the next batch
    assert [r.step for r in cb.history] == [3, 6, 9, 12, 15]
    assert hist.history["sparse_updates"] == [2.0, 4.0, 5.0]
    assert len(checker.totals) == 18 and set(checker.totals) == {cb.engine.target}
    assert sum(r.totals()["net_pruned"] for r in cb.history) > 0


def test_dead_units_are_readable_on_the_callback():
    x, y = data()
    model = mlp()
    cb = SparseCallback(density=0.05, update_every=3, recipe="paper")
    cb.attach(model)
    masks = cb.masks()
    assert cb.dead_units() == {
        name: (int((~m.any(axis=0)).sum()), m.shape[-1]) for name, m in masks.items()
    }
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    last = cb.history[-1]
    assert cb.dead_units() == {r.name: (r.dead_units, r.units) for r in last.layers}


@pytest.mark.parametrize("scale_init", [True, False])
def test_scale_init_puts_each_unit_at_its_dense_output_scale(scale_init):
    """With a zero learning rate and static masks the kernels after fit are the attached ones:
    each unit's initial weights times sqrt(fan_in / active fan_in) (the default), or masked."""
    x, y = data()
    model = mlp(optimizer=keras.optimizers.SGD(0.0))
    before = [host(layer.kernel).copy() for layer in model.layers]
    cb = SparseCallback(update_every=None, density=0.1, scale_init=scale_init)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert cb.engine.config.scale_init is scale_init
    for kernel, w, c in zip(before, cb.weights, cb.constraints):
        mask = c.mask_numpy()
        factor = sparsecore.init_scales(mask, w.axis) if scale_init else mask
        np.testing.assert_allclose(host(w.variable), kernel * factor, rtol=1e-6, atol=0)
