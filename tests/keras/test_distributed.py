"""Under tf.distribute.MirroredStrategy (2 logical CPU devices) every replica ends with the same
masks and the same sparse kernels after mask updates.

TensorFlow must be told about the logical devices before it initialises, and the strategy needs
the TensorFlow backend of Keras, so the check runs in a fresh process whatever backend this test
session uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import warnings

    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    import keras
    from sparsecore.keras import SparseCallback

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((10,)),
                keras.layers.Dense(24, activation="relu", name="fc1"),
                keras.layers.Dense(3, name="out"),
            ]
        )
        model.compile(
            optimizer=OPTIMIZER,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 10)).astype("float32")
    y = rng.integers(0, 3, 128).astype("int32")
    cb = SparseCallback(density=0.2, update_every=2)
    model.fit(x, y, batch_size=32, epochs=2, callbacks=[cb], verbose=0)

    def replicas(variable):
        value = variable.value
        parts = getattr(value, "values", None) or (value,)
        return [np.asarray(p.numpy()) for p in parts], [p.device for p in parts]

    out = {"updates": len(cb.history), "num_replicas": strategy.num_replicas_in_sync, "layers": {}}
    for w, c in zip(cb.weights, cb.constraints):
        masks, mask_devices = replicas(c.mask)
        kernels, devices = replicas(w.variable)
        out["layers"][w.name] = {
            "mask_replicas": len(masks),
            "kernel_devices": sorted(set(devices)),
            "masks_equal": all(np.array_equal(masks[0], m) for m in masks),
            "kernels_equal": all(np.array_equal(kernels[0], k) for k in kernels),
            "zero_outside": all(not np.any(k[~masks[0]]) for k in kernels),
            "count": int(masks[0].sum()),
        }
    out["target"] = cb.engine.target
    out["momentum_source"] = cb.momentum_source
    own = cb._reader.own
    out["own_replicas_equal"] = own is None or all(
        all(np.array_equal(parts[0], q) for q in parts)
        for parts in (replicas(b)[0] for b in own.buffers)
    )
    out["own_nonzero"] = own is not None and all(
        np.any(replicas(b)[0][0] != 0) for b in own.buffers
    )

    # on_nonfinite='skip': a NaN in fc1's momentum at step 2, before the update due after it. The
    # update runs once, in cross-replica context, so its decision holds for every replica.
    from sparsecore.keras.momentum import optimizer_slots

    class PoisonMomentum(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 1:  # after step 1, before step 2
                layer = self.model.get_layer("fc1")
                slot = optimizer_slots(self.model.optimizer, layer.kernel)[0]
                slot.assign(np.full(slot.shape, np.nan, dtype="float32"))

    with strategy.scope():
        keras.utils.set_random_seed(1)
        model2 = keras.Sequential(
            [
                keras.Input((10,)),
                keras.layers.Dense(24, activation="relu", name="fc1"),
                keras.layers.Dense(3, name="out"),
            ]
        )
        model2.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    cb2 = SparseCallback(density=0.2, update_every=2, on_nonfinite="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model2.fit(x, y, batch_size=32, epochs=1, callbacks=[PoisonMomentum(), cb2], verbose=0)
    skip = {"reasons": [r.reason for r in cb2.history if r.skipped], "layers": {}}
    skip["updates"] = cb2.engine.updates
    for w, c in zip(cb2.weights, cb2.constraints):
        masks, _ = replicas(c.mask)
        kernels, _ = replicas(w.variable)
        skip["layers"][w.name] = {
            "masks_equal": all(np.array_equal(masks[0], m) for m in masks),
            "zero_outside": all(
                not np.any(k.view(np.uint32)[~masks[0]]) for k in kernels
            ),
            "count": int(masks[0].sum()),
        }
    skip["target"] = cb2.engine.target
    out["skip"] = skip
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.parametrize(
    "optimizer", ["keras.optimizers.SGD(0.05, momentum=0.9)", "keras.optimizers.SGD(0.05)"]
)
def test_mirrored_strategy_replicas_share_masks(optimizer):
    """With momentum from the optimizer, and with the library's own gradient average (SGD
    without momentum), whose buffers must agree across replicas too."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    script = SCRIPT.replace("OPTIMIZER", optimizer)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["num_replicas"] == 2
    assert result["updates"] >= 2  # 4 steps per epoch, 8 in all: updates at 2, 4, 6
    total = 0
    for name, layer in result["layers"].items():
        assert layer["mask_replicas"] == 2, name
        assert len(layer["kernel_devices"]) == 2, name
        assert layer["masks_equal"] and layer["kernels_equal"] and layer["zero_outside"], name
        total += layer["count"]
    assert total == result["target"]
    assert result["own_replicas_equal"]
    if "momentum=0.9" not in optimizer:
        assert result["momentum_source"].startswith("the library's own gradient average")
        assert result["own_nonzero"]

    # NaN momentum with on_nonfinite='skip': the update is decided once for all replicas
    skip = result["skip"]
    assert skip["updates"] == 0 and len(skip["reasons"]) == 1  # due after step 2 (of 4)
    assert "layer 'fc1/kernel':" in skip["reasons"][0] and "NaN or Inf" in skip["reasons"][0]
    assert sum(layer["count"] for layer in skip["layers"].values()) == skip["target"]
    for name, layer in skip["layers"].items():
        assert layer["masks_equal"] and layer["zero_outside"], name
