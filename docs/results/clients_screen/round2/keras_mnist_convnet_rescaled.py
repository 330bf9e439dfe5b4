"""Client 2: the keras-io ``mnist_convnet`` example, on Fashion-MNIST read offline.

Our own version of the public example: Conv2D(32, 3, relu), MaxPooling2D(2), Conv2D(64, 3, relu),
MaxPooling2D(2), Flatten, Dropout(0.5), Dense(10, softmax); Adam, categorical cross-entropy,
batch 128, 15 epochs, 10% of the training data held out for validation. The only sparsecore line
is the ``SparseCallback`` in ``fit``. Runs on the Keras backend named by ``--backend``
(TensorFlow or PyTorch).

    python benchmarks/clients/keras_mnist_convnet.py --backend tensorflow --epochs 1 --out r.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
RESCALE = os.environ.get("RESCALE", "0") == "1"

import common
import numpy as np

EPOCHS = 15  # the example's own


def build(keras: object, width: float) -> object:
    """The example's network; ``width`` scales the two convolutions."""
    L = keras.layers  # type: ignore[attr-defined]
    c1, c2 = (max(1, round(n * width)) for n in (32, 64))
    return keras.Sequential(  # type: ignore[attr-defined]
        [
            keras.Input(shape=(28, 28, 1)),  # type: ignore[attr-defined]
            L.Conv2D(c1, kernel_size=(3, 3), activation="relu", name="conv1"),
            L.MaxPooling2D(pool_size=(2, 2)),
            L.Conv2D(c2, kernel_size=(3, 3), activation="relu", name="conv2"),
            L.MaxPooling2D(pool_size=(2, 2)),
            L.Flatten(),
            L.Dropout(0.5),
            L.Dense(10, activation="softmax", name="dense"),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, density=0.1)
    parser.add_argument("--backend", choices=("tensorflow", "torch", "jax"), default="tensorflow")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit-train", type=int, default=None)
    args = parser.parse_args()
    epochs = args.epochs or EPOCHS
    started = time.perf_counter()
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    elif args.backend == "jax":  # XLA's CPU thread pool is set before jax is imported
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if args.threads == 1:
            os.environ.setdefault(
                "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            )
    else:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_test, y_test = common.load_images(args.limit_train, args.data)
    x_train, x_test = x_train[..., None], x_test[..., None]
    y_train_1h = keras.utils.to_categorical(y_train, 10)
    y_test_1h = keras.utils.to_categorical(y_test, 10)

    model = build(keras, args.width)
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    callbacks = []
    sparse = None
    if not args.dense:
        import sparsecore.keras

        sparse = sparsecore.keras.SparseCallback(**common.sparse_options(args))
        callbacks.append(sparse)
        if RESCALE:
            class Rescale(keras.callbacks.Callback):
                def on_train_begin(self, logs=None):
                    for w, v in zip(sparse.weights, sparse.weights):
                        var = w.variable
                        k = np.asarray(var.numpy() if hasattr(var, "numpy") else keras.ops.convert_to_numpy(var))
                        ax = w.axis
                        m = np.moveaxis(k != 0, ax, 0).reshape(k.shape[ax], -1)
                        fan = m.shape[1]
                        nnz = np.maximum(m.sum(1), 1)
                        sc = np.sqrt(fan / nnz)
                        shape = [1] * k.ndim; shape[ax] = -1
                        var.assign(k * sc.reshape(shape))
                        print("rescale", w.name, float(sc.mean()))
            callbacks.append(Rescale())
    fit = model.fit(
        x_train,
        y_train_1h,
        batch_size=args.batch_size,
        epochs=epochs,
        validation_split=0.1,
        callbacks=callbacks,
        verbose=2,
    )
    test_loss, test_acc = model.evaluate(x_test, y_test_1h, verbose=0)
    history = [
        {"epoch": i + 1, **{k: float(v[i]) for k, v in fit.history.items() if len(v) > i}}
        for i in range(epochs)
    ]
    weights = sum(
        int(np.prod(layer.kernel.shape)) for layer in model.layers if hasattr(layer, "kernel")
    )
    result: dict = {
        "client": f"keras_mnist_convnet[{args.backend}]",
        "epochs": history,
        "final": {"test_acc": 100.0 * float(test_acc), "test_loss": float(test_loss)},
        "weights": weights,
        "dead_units": dead_units(keras, model, x_test[:1000]),
    }
    if sparse is not None:
        result["density"] = sparse.density()
        result["layer_densities"] = sparse.layer_densities()
        result["config"] = sparse.engine.config.to_dict() if sparse.engine else None
        result["momentum_source"] = getattr(sparse, "momentum_source", None)
        if sparse.history:
            result["last_update"] = sparse.history[-1].to_dict()
    common.write_result(args, result, started)


def dead_units(keras: object, model: object, x: np.ndarray) -> dict[str, int]:
    """Per convolution, filters whose ReLU output is 0 everywhere on the probe images."""
    out = {}
    for name in ("conv1", "conv2"):
        layer = model.get_layer(name)  # type: ignore[attr-defined]
        probe = keras.Model(model.inputs, layer.output)  # type: ignore[attr-defined]
        acts = np.asarray(probe.predict(x, verbose=0))
        out[name] = common.count_dead(acts.max(axis=(0, 1, 2)))
    return out


if __name__ == "__main__":
    main()
