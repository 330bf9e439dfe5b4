"""SparseMask zeroes weights outside the mask exactly (+0, whatever the value) and keeps the rest
bit for bit, for every floating dtype; its two forms of the mask stay in step."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers_keras import host
from keras import ops

from sparsecore.keras import SparseMask

DTYPES = ["float16", "float32", "float64"]


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


def test_config_round_trip_rebuilds_the_bitwise_mask():
    rng = np.random.default_rng(3)
    mask = rng.random((9, 3)) < 0.3
    c = SparseMask((9, 3), name="fc/kernel", index=2, axis=-1, mask=mask, dtype="float64")
    again = SparseMask.from_config(c.get_config())
    assert again.dtype == "float64" and again.index == 2 and again.name == "fc/kernel"
    assert np.array_equal(again.mask_numpy(), mask)
    assert again.keep is not None and np.array_equal(host(again.keep), np.where(mask, -1, 0))
    assert keras.backend.standardize_dtype(again.keep.dtype) == "int64"


def test_other_weight_dtype_falls_back_to_where():
    # A mask built for float32 still masks a float64 tensor exactly (select, not bits).
    rng = np.random.default_rng(4)
    mask = rng.random((5, 5)) < 0.5
    c = SparseMask((5, 5), mask=mask)
    w = _weights("float64", (5, 5))
    out = host(c(ops.convert_to_tensor(w)))
    assert not np.any(out[~mask]) and not np.any(np.signbit(out[~mask]))
    assert np.array_equal(out[mask].view(np.uint64), w[mask].view(np.uint64))
