"""SparseMask zeroes weights outside the mask exactly (+0, whatever the value) and keeps the rest
bit for bit, for every floating dtype; its two forms of the mask stay in step."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers_keras import host
from keras import ops

import sparsecore
from sparsecore.keras import SparseMask
from sparsecore.keras.backend import wide_scope
from sparsecore.keras.constraint import pack_mask

DTYPES = ["float16", "float32", "float64"]


@pytest.fixture(autouse=True)
def _float64_on_jax():
    # float64 weights on JAX need its 64-bit mode, as a float64 model would
    with wide_scope():
        yield


def _weights(dtype: str, shape=(7, 5), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(dtype)
    flat = w.reshape(-1)
    flat[:4] = [np.nan, -np.inf, np.inf, -0.0]
    flat[-3:] = [-1.5, np.nan, -0.0]
    return w


@pytest.mark.parametrize("dtype", DTYPES)
def test_outside_is_plus_zero_inside_is_bit_identical(dtype):
    rng = np.random.default_rng(1)
    mask = rng.random((7, 5)) < 0.4
    mask.reshape(-1)[:2] = [False, True]  # a NaN outside, -inf inside
    w = _weights(dtype)
    c = SparseMask(w.shape, mask=mask, dtype=dtype)
    assert c.keep is not None  # the bitwise form is used for this dtype
    out = host(c(ops.convert_to_tensor(w)))
    assert out.dtype == np.dtype(dtype)
    assert not np.any(out[~mask]) and not np.any(np.signbit(out[~mask]))
    bits = {"float16": np.uint16, "float32": np.uint32, "float64": np.uint64}[dtype]
    assert np.array_equal(out[mask].view(bits), w[mask].view(bits))


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "tensor"])
def test_assign_updates_both_forms(as_tensor):
    rng = np.random.default_rng(2)
    c = SparseMask((6, 4), mask=rng.random((6, 4)) < 0.5)
    new = rng.random((6, 4)) < 0.5
    c.assign(ops.convert_to_tensor(new) if as_tensor else new)
    assert np.array_equal(c.mask_numpy(), new)
    assert c.keep is not None and np.array_equal(host(c.keep), np.where(new, -1, 0))
    w = _weights("float32", (6, 4))
    out = host(c(ops.convert_to_tensor(w)))
    assert np.array_equal(out != 0, new & (w != 0))


def test_config_holds_metadata_only_and_the_saved_entry_restores_the_rest():
    rng = np.random.default_rng(3)
    mask = rng.random((9, 3)) < 0.3
    ever = mask | (rng.random((9, 3)) < 0.2)
    state = {"updates": 4, "history": [{"update": 1}]}
    c = SparseMask(
        (9, 3), name="fc/kernel", index=2, axis=-1, mask=mask, dtype="float64", state=state
    )
    c.ever_active = ever
    config = c.get_config()
    assert config == {
        "shape": [9, 3], "name": "fc/kernel", "index": 2, "axis": -1, "dtype": "float64",
    }  # fmt: skip
    again = SparseMask.from_config(config)
    assert again.dtype == "float64" and again.index == 2 and again.name == "fc/kernel"
    assert again.mask_numpy().all() and again.state is None  # until its entry is loaded
    store: dict = {}
    c.save_own_variables(store)
    assert store["mask"].dtype == np.uint8 and store["mask"].size == (27 + 7) // 8
    again.load_own_variables(store)
    assert np.array_equal(again.mask_numpy(), mask)
    assert again.keep is not None and np.array_equal(host(again.keep), np.where(mask, -1, 0))
    assert keras.backend.standardize_dtype(again.keep.dtype) == "int64"
    assert np.array_equal(again.ever_active, ever) and again.state == state


def test_an_empty_entry_keeps_the_config_values_of_an_old_file():
    # Files written before the mask left the config carry it there, packed; their weights file
    # has no entry for the constraint.
    mask = np.random.default_rng(5).random((6, 4)) < 0.5
    old = {"shape": [6, 4], "name": "fc/kernel", "index": 0, "axis": -1, "dtype": "float32",
           "mask": pack_mask(mask), "ever_active": pack_mask(mask), "state": '{"updates": 2}'}  # fmt: skip
    c = SparseMask.from_config(old)
    c.load_own_variables({})
    assert np.array_equal(c.mask_numpy(), mask) and c.state == {"updates": 2}
    assert np.array_equal(c.ever_active, mask)


def test_a_bad_entry_is_refused_naming_the_weight_and_changes_nothing():
    mask = np.random.default_rng(6).random((6, 4)) < 0.5
    c = SparseMask((6, 4), name="fc/kernel", mask=mask)
    store: dict = {}
    SparseMask((4, 6), name="fc/kernel").save_own_variables(store)
    with pytest.raises(sparsecore.SparseCoreError, match=r"'fc/kernel'.*shape \(4, 6\)"):
        c.load_own_variables(store)
    c.save_own_variables(store)
    store["mask"] = store["mask"][:-1]
    with pytest.raises(sparsecore.SparseCoreError, match="'fc/kernel'.*damaged"):
        c.load_own_variables(store)
    store["version"] = np.array([99])
    with pytest.raises(sparsecore.SparseCoreError, match="version 99"):
        c.load_own_variables(store)
    assert np.array_equal(c.mask_numpy(), mask)


def test_a_copy_is_a_constraint_with_the_same_mask():
    import copy

    mask = np.random.default_rng(7).random((5, 3)) < 0.5
    c = SparseMask((5, 3), name="w", index=1, mask=mask, state={"updates": 1})
    dup = copy.deepcopy(c)
    assert dup is not c and dup.mask is not c.mask
    assert np.array_equal(dup.mask_numpy(), mask) and dup.index == 1 and dup.state == c.state


def test_other_weight_dtype_falls_back_to_where():
    # A mask built for float32 still masks a float64 tensor exactly (select, not bits).
    rng = np.random.default_rng(4)
    mask = rng.random((5, 5)) < 0.5
    c = SparseMask((5, 5), mask=mask)
    w = _weights("float64", (5, 5))
    out = host(c(ops.convert_to_tensor(w)))
    assert not np.any(out[~mask]) and not np.any(np.signbit(out[~mask]))
    assert np.array_equal(out[mask].view(np.uint64), w[mask].view(np.uint64))
