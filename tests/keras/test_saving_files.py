"""What a saved sparse Keras model holds, and where it loads: fresh processes with and without
``import sparsecore.keras``, a file written by an earlier sparsecore, and ``strip()``'s plain model
in a process that cannot import sparsecore at all.

``data/sparse_mlp_dd18010.keras`` was written by sparsecore at commit dd18010 (masks and engine
state in the layer config, base64), on TensorFlow: ``helpers_keras.mlp(seed=11)`` fitted 2 epochs
(batch 16, no shuffling) with ``SparseCallback(density=0.15, update_every=3, seed=3)``;
``sparse_mlp_dd18010.npz`` holds its masks, kernels and update steps as that run ended.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers_keras import data, host, mlp
from subprocesses import run_python

from sparsecore.keras import SparseCallback, SparseMask, strip

DATA = Path(__file__).parent / "data"
OLD_FILE = DATA / "sparse_mlp_dd18010.keras"
OLD_EXPECTED = DATA / "sparse_mlp_dd18010.npz"
OPTIONS = {"density": 0.15, "update_every": 3, "seed": 3}


def _fit(model, cb, epochs=2, initial_epoch=0):
    x, y = data()
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        callbacks=[cb],
        verbose=0,
    )


def _config(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))


def _mask_configs(config: object) -> list[dict]:
    found = []
    if isinstance(config, dict):
        if config.get("registered_name") == "sparsecore>SparseMask":
            found.append(config["config"])
        for value in config.values():
            found += _mask_configs(value)
    elif isinstance(config, list):
        for value in config:
            found += _mask_configs(value)
    return found


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two sparse models (one 16 times wider) trained and saved; their masks and kernels."""
    folder = tmp_path_factory.mktemp("saved")
    out = {}
    for tag, width in (("narrow", 1), ("wide", 16)):
        keras.utils.set_random_seed(11)
        model = keras.Sequential(
            [
                keras.Input((12,)),
                keras.layers.Dense(32 * width, activation="relu", name="fc1"),
                keras.layers.Dense(16 * width, activation="relu", name="fc2"),
                keras.layers.Dense(3, name="out"),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        cb = SparseCallback(**OPTIONS)
        _fit(model, cb)
        path = folder / f"{tag}.keras"
        model.save(path)
        np.savez(
            folder / f"{tag}.npz",
            **{f"mask/{k}": v for k, v in cb.masks().items()},
            **{f"kernel/{w.name}": host(w.variable) for w in cb.weights},
        )
        out[tag] = (path, cb)
    return folder, out


def test_the_config_holds_small_metadata_and_the_weights_file_the_masks(saved):
    _, runs = saved
    sizes = {}
    for tag, (path, cb) in runs.items():
        configs = _mask_configs(_config(path))
        assert [c["name"] for c in configs] == [w.name for w in cb.weights]
        for c in configs:
            assert set(c) == {"shape", "name", "index", "axis", "dtype"}
        sizes[tag] = len(json.dumps(_config(path)))
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        assert "model.weights.h5" in names
    # 16 times the weights, the same config but for a few digits of the shapes
    assert abs(sizes["wide"] - sizes["narrow"]) < 50


def test_a_fresh_process_fails_briefly_without_the_import_and_loads_with_it(saved):
    folder, runs = saved
    path, cb = runs["narrow"]
    code = f"""
import json, sys, keras
out = {{}}
for tag in ("narrow", "wide"):
    try:
        keras.models.load_model({str(folder)!r} + "/" + tag + ".keras")
        out[tag] = None
    except Exception as err:
        out[tag] = str(err)
out["modules"] = sorted(m for m in sys.modules if m.startswith("sparsecore"))
import sparsecore.keras  # now the same file loads
model = keras.models.load_model({str(path)!r})
masks, kernels = {{}}, {{}}
for layer in model.layers:
    c = layer.kernel.constraint
    assert isinstance(c, sparsecore.keras.SparseMask), type(c)
    masks[c.name] = c.mask_numpy().tolist()
    kernels[c.name] = keras.ops.convert_to_numpy(layer.kernel).tolist()
state, ever = model.layers[0].kernel.constraint.snapshot()
out.update(masks=masks, kernels=kernels, updates=state["updates"],
           steps=[r["step"] for r in state["history"]], ever=ever.tolist())
print(json.dumps(out))
"""
    out = run_python(code, folder)
    assert out["modules"] == []  # nothing imported sparsecore behind the test's back
    narrow, wide = out["narrow"], out["wide"]
    assert narrow is not None and wide is not None, "loaded without sparsecore.keras?"
    # The innermost reason is Keras' own sentence about our constraint: short, and it names
    # the module to import. The whole message repeats the model's config, which no longer grows
    # with the number of weights.
    reason = narrow.split("Exception encountered:")[-1]
    assert "sparsecore.keras" in reason and len(reason) < 400, reason
    assert abs(len(wide) - len(narrow)) < 100
    # with the import: the masks, kernels, engine state and ever-active positions of the run
    expected = np.load(folder / "narrow.npz")
    for name, mask in out["masks"].items():
        assert np.array_equal(np.array(mask), expected[f"mask/{name}"]), name
        assert np.array_equal(np.array(out["kernels"][name]), expected[f"kernel/{name}"]), name
    assert out["updates"] == cb.engine.updates == 3
    assert out["steps"] == [r.step for r in cb.history]
    assert np.array_equal(np.array(out["ever"]), host(cb.engine.ever_active[0]))


def test_a_file_saved_by_the_earlier_layout_loads_and_resumes(tmp_path):
    expected = np.load(OLD_EXPECTED)
    assert _mask_configs(_config(OLD_FILE))[0].get("mask"), "fixture is not in the old layout"
    model = keras.models.load_model(OLD_FILE)
    constraints = [layer.kernel.constraint for layer in model.layers]
    assert all(isinstance(c, SparseMask) for c in constraints)
    for layer, c in zip(model.layers, constraints):
        assert np.array_equal(c.mask_numpy(), expected[f"mask/{c.name}"])
        np.testing.assert_array_equal(host(layer.kernel), expected[f"kernel/{c.name}"])
    resumed = SparseCallback()  # the saved run's options
    _fit(model, resumed, epochs=3, initial_epoch=2)
    steps = [int(s) for s in expected["steps"]]
    assert [r.step for r in resumed.history] == [*steps, 12, 15]  # none at the last step
    assert resumed.engine.config.density == 0.15
    # saved again, it is in the new layout and loads with the same masks
    model.save(tmp_path / "again.keras")
    assert set(_mask_configs(_config(tmp_path / "again.keras"))[0]) == {
        "shape", "name", "index", "axis", "dtype",
    }  # fmt: skip
    again = keras.models.load_model(tmp_path / "again.keras")
    for a, b in zip(again.layers, model.layers):
        assert np.array_equal(a.kernel.constraint.mask_numpy(), b.kernel.constraint.mask_numpy())


# the fresh model's optimizer has taken no step yet, so Keras leaves the saved slots aside
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_save_weights_into_an_attached_model_continues_the_saved_run(tmp_path):
    model = mlp(seed=4)
    cb = SparseCallback(**OPTIONS)
    _fit(model, cb)
    model.save_weights(tmp_path / "run.weights.h5")
    other = mlp(seed=5)
    follower = SparseCallback()
    follower.attach(other)  # fresh masks and a fresh run...
    other.load_weights(tmp_path / "run.weights.h5")  # ...replaced by the saved ones
    for name, mask in cb.masks().items():
        assert np.array_equal(follower.masks()[name], mask), name
    assert follower.engine.updates == cb.engine.updates
    assert [r.step for r in follower.history] == [r.step for r in cb.history]
    assert follower.engine.config == cb.engine.config.replace(
        total_steps=follower.engine.config.total_steps
    )
    for a, b in zip(follower.engine.ever_active, cb.engine.ever_active):
        assert np.array_equal(host(a), host(b))


def test_strip_gives_a_plain_model_that_loads_without_sparsecore(saved, tmp_path):
    folder, runs = saved
    model = keras.models.load_model(runs["narrow"][0])
    x, _ = data()
    plain = strip(model)
    assert plain is not model
    assert all(getattr(v, "constraint", None) is None for v in plain.weights)
    assert "sparsecore" not in json.dumps(keras.saving.serialize_keras_object(plain))
    expected = np.load(folder / "narrow.npz")
    for layer in plain.layers:
        kernel = host(layer.kernel)
        assert not kernel[~expected[f"mask/{layer.name}/kernel"]].any()
    np.testing.assert_array_equal(host(plain(x)), host(model(x)))
    # the original keeps its masks (a run can go on)
    assert all(isinstance(layer.kernel.constraint, SparseMask) for layer in model.layers)
    plain.save(tmp_path / "plain.keras")
    np.save(tmp_path / "x.npy", x)
    code = f"""
import importlib.util, json, sys, numpy as np, keras
assert importlib.util.find_spec("sparsecore") is None, "sparsecore is importable"
model = keras.models.load_model({str(tmp_path / "plain.keras")!r})
y = keras.ops.convert_to_numpy(model(np.load({str(tmp_path / "x.npy")!r})))
print(json.dumps({{"y": y.tolist(), "compiled": model.compiled,
                  "modules": [m for m in sys.modules if m.startswith("sparsecore")]}}))
"""
    out = run_python(code, tmp_path, sparsecore=False)
    assert out["modules"] == [] and out["compiled"]
    np.testing.assert_allclose(np.array(out["y"]), host(plain(x)), rtol=1e-6, atol=1e-6)


class CustomNet(keras.Model):
    """A subclassed model, not registered: strip() rebuilds it from its own class."""

    def __init__(self, width=8, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.hidden = keras.layers.Dense(width, activation="relu", name="hidden")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.hidden(x))

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def test_strip_subclassed_models_rebuilt_or_in_place():
    x, _ = data()
    model = CustomNet(width=10)
    model(x[:2])
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    cb = SparseCallback(density=0.3, update_every=3)
    _fit(model, cb, epochs=1)
    plain = strip(model)
    assert isinstance(plain, CustomNet) and plain.width == 10
    assert all(getattr(v, "constraint", None) is None for v in plain.weights)
    np.testing.assert_array_equal(host(plain(x)), host(model(x)))
    same = strip(model, in_place=True)
    assert same is model
    assert all(getattr(v, "constraint", None) is None for v in model.weights)
    assert model.hidden.kernel_constraint is None and model.head.kernel_constraint is None
    for name, mask in cb.masks().items():
        layer = {"hidden": model.hidden, "head": model.head}[name.split("/")[0]]
        assert not host(layer.kernel)[~mask].any()
    np.testing.assert_array_equal(host(plain(x)), host(model(x)))
