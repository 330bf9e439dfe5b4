"""A mask update reads and writes the state training really uses, on every Keras backend.

On JAX, ``fit`` keeps weights, optimizer slots and the step counter outside the variables during
an epoch, and the compiled train step holds the masks it was traced with; these tests fail if an
update read stale values, if its assignments were lost, or if training went on with old masks.
Given identical inputs, an update gives the TensorFlow backend's masks bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers_keras import data, host, mlp
from subprocesses import run_python

from sparsecore.keras import SparseCallback, jax_step

HELPERS = str(Path(__file__).parent)


class _Recording(SparseCallback):
    """Keeps the masks before and after every update."""

    def __init__(self, **options):
        super().__init__(**options)
        self.changes: list[tuple[dict, dict]] = []

    def update_masks(self, step=None):
        before = self.masks()
        report = super().update_masks(step)
        self.changes.append((before, self.masks()))
        return report


@pytest.mark.parametrize("step", ["compiled", "recompiled", "eager"])
def test_training_continues_with_the_updated_masks(step, monkeypatch):
    """On JAX: ``compiled`` passes the masks to the compiled step, ``recompiled`` is the
    fallback that compiles the step again after each update, ``eager`` compiles nothing."""
    if step == "recompiled":
        monkeypatch.setattr(jax_step, "install", lambda model, constraints, own=None: False)
    x, y = data()
    model = mlp(seed=3)
    if step == "eager":
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            run_eagerly=True,
        )
    cb = _Recording(density=0.2, update_every=4, seed=1)  # mid-epoch updates: steps 4, 8, ...
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, callbacks=[cb], verbose=0)
    assert [r.step for r in cb.history] == [4, 8, 12, 16]
    if keras.backend.backend() == "jax":
        assert jax_step.is_installed(model, cb.constraints) == (step == "compiled")
        assert cb._recompile_after_update == (step == "recompiled")
    before, after = cb.changes[-1]
    grown_trained = 0
    for w in cb.weights:
        kernel, mask = host(w.variable), after[w.name]
        # the steps after the last update kept exactly the new mask: pruned positions stayed 0
        assert not kernel[~mask].any(), w.name
        grown_trained += int(np.count_nonzero(kernel[mask & ~before[w.name]]))
    assert grown_trained > 0  # ... and the regrown positions trained


def _duplicated(x, y):
    return np.concatenate([x, x]), np.concatenate([y, y])


def test_updates_inside_an_epoch_equal_updates_at_epoch_ends():
    """The same 24 steps on the same batches, with updates every 3 steps: with 3-step epochs they
    all run at epoch ends (where fit() has written its state back), with 6-step epochs every
    other one runs inside an epoch. Optimizer slots are reset where masks change, so a lost
    write shows in the weights."""
    x, y = data(n=48)
    options = {"density": 0.2, "update_every": 3, "seed": 2, "reset_optimizer_state": True}
    runs = []
    for xs, ys, epochs in ((x, y, 8), (*_duplicated(x, y), 4)):
        model = mlp(seed=5)
        cb = SparseCallback(**options)
        model.fit(xs, ys, batch_size=16, epochs=epochs, shuffle=False, callbacks=[cb], verbose=0)
        runs.append((model, cb))
    (a_model, a), (b_model, b) = runs
    assert [r.step for r in a.history] == [r.step for r in b.history] == [3, 6, 9, 12, 15, 18, 21]
    for name in a.masks():
        assert np.array_equal(a.masks()[name], b.masks()[name]), name
    for va, vb in zip(a_model.weights, b_model.weights):
        np.testing.assert_allclose(host(va), host(vb), rtol=1e-6, atol=1e-7, err_msg=va.path)


UPDATE_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {helpers!r})
import keras
from helpers_keras import mlp
from sparsecore.keras import SparseCallback, jax_step
from sparsecore.keras.momentum import optimizer_slots

inputs = np.load({inputs!r})
out = {{}}
for update_backend in ("numpy", "keras"):
    model = mlp(seed=0)
    cb = SparseCallback(density=0.2, update_every=None, total_steps=100, seed=1,
                        update_backend=update_backend)
    cb.attach(model)
    model.optimizer.build(model.trainable_variables)
    for i, w in enumerate(cb.weights):
        mask = cb.masks()[w.name]
        w.variable.assign(np.where(mask, inputs[f"w{{i}}"], 0).astype("float32"))
        optimizer_slots(model.optimizer, w.variable)[0].assign(inputs[f"m{{i}}"])
    cb.update_masks(step=50)
    out[update_backend] = {{k: np.packbits(v).tolist() for k, v in cb.masks().items()}}
print(json.dumps(out))
"""


def _run_here(code: str) -> dict:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(code, {"__name__": "update_script"})
    return json.loads(buffer.getvalue().strip().splitlines()[-1])


def test_identical_inputs_give_the_tensorflow_backends_masks(tmp_path):
    rng = np.random.default_rng(4)
    arrays = {}
    for i, shape in enumerate([(12, 32), (32, 16), (16, 3)]):
        # small integers: many ties, so the tie order (the position hash) decides
        arrays[f"w{i}"] = (rng.integers(-3, 4, shape) / 4).astype("float32")
        arrays[f"m{i}"] = (rng.integers(-2, 3, shape) / 8).astype("float32")
    np.savez(tmp_path / "inputs.npz", **arrays)
    code = UPDATE_SCRIPT.format(helpers=HELPERS, inputs=str(tmp_path / "inputs.npz"))
    here = _run_here(code)
    reference = run_python(code, tmp_path, env={"KERAS_BACKEND": "tensorflow"})
    # NumPy and keras.ops updates agree on each backend, and this backend agrees with TensorFlow
    assert here["numpy"] == here["keras"]
    assert reference["numpy"] == reference["keras"]
    assert here == reference, f"{keras.backend.backend()} gives other masks than tensorflow"
