"""Exact importance sums: integer buckets on the device, one correctly rounded float on the host.

The sums of :mod:`sparsecore.torch.exact_sum` must be the exact sum correctly rounded (equal to
``math.fsum``), the same integers in any order and any split (what lets a sharded update agree
with one process bit for bit), with NaN/Inf counted apart; the packed update's importance is
then the exact mean, whatever the packing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sample_layers import spread_layers

import sparsecore as sc
from sparsecore.torch import TorchBackend
from sparsecore.torch import exact_sum as es
from sparsecore.torch import packed_update as pu

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def float_arrays(draw, dtype: torch.dtype) -> np.ndarray:
    """Values of ``dtype`` (as float64): normal, wide-ranging, subnormal, zeros, the largest."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(0, 3000))
    kind = draw(st.sampled_from(["normal", "wide", "subnormal", "zeros", "largest"]))
    info = torch.finfo(dtype)
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "wide":
        top = min(60, int(math.log2(float(info.max))) - 4)  # no overflow to inf
        x = rng.standard_normal(n) * 2.0 ** rng.integers(-top, top, n)
    elif kind == "subnormal":
        x = rng.integers(-7, 8, n) * float(info.smallest_normal) * 2.0 ** -rng.integers(1, 8, n)
    elif kind == "zeros":
        x = np.where(rng.random(n) < 0.5, 0.0, -0.0)
    else:
        x = rng.choice([float(info.max), -float(info.max), 1.0, float(info.tiny)], n)
    return torch.from_numpy(x).to(dtype).double().numpy()  # the values dtype can hold


def buckets_of(x: np.ndarray, dtype: torch.dtype, active: np.ndarray, chunk: int):
    """:func:`es.bucket_sums` of ``x`` laid out in rows of ``chunk`` (one layer)."""
    t = torch.from_numpy(x).to(dtype)
    rows = -(-len(x) // chunk)
    bits = torch.zeros(rows * chunk, dtype=pu.magnitude_bits(t).dtype)
    bits[: len(x)] = pu.magnitude_bits(t)
    act = torch.zeros(rows * chunk, dtype=torch.bool)
    act[: len(x)] = torch.from_numpy(active)
    return es.bucket_sums(
        bits.view(rows, chunk), dtype, act.view(rows, chunk), torch.zeros(rows, dtype=torch.long), 1
    )


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), chunk=st.sampled_from([1, 7, 4096]))
def test_exact_sums_are_the_correctly_rounded_sum_in_any_order(dtype, data, chunk):
    x = data.draw(float_arrays(dtype))
    active = np.random.default_rng(len(x)).random(len(x)) < 0.6
    table, bad = buckets_of(x, dtype, active, chunk)
    assert int(bad[0]) == 0
    b = es.FORMATS[dtype].buckets
    total = es.to_float((table[0, :b] + table[0, b:]).numpy(), dtype)
    with np.errstate(over="ignore"):
        overflow = not math.isfinite(float(np.abs(x).sum()))
    want = math.inf if overflow else math.fsum(np.abs(x))
    assert total == want or (overflow and total == math.inf)
    if not overflow:
        assert es.to_float(table[0, b:].numpy(), dtype) == math.fsum(np.abs(x[active]))
    # another order, another split: the same integers
    perm = np.random.default_rng(1).permutation(len(x))
    cut = len(x) // 3
    parts = [buckets_of(x[perm][s], dtype, active[perm][s], 3)[0] for s in
             (slice(0, cut), slice(cut, None))]  # fmt: skip
    assert torch.equal(parts[0] + parts[1], table)


def test_exact_sums_count_nan_and_inf_apart():
    x = np.array([1.0, np.nan, 2.0, np.inf, -np.inf, 0.5])
    for dtype in DTYPES:
        table, bad = buckets_of(x, dtype, np.ones(6, bool), 4)
        assert int(bad[0]) == 3
        assert not table[0, : es.FORMATS[dtype].buckets].any()  # all in the active half
        assert es.to_float(table[0, es.FORMATS[dtype].buckets :].numpy(), dtype) == 3.5


def test_bucket_units_cover_every_value():
    for dtype, fmt in es.FORMATS.items():
        info = torch.finfo(dtype)
        for value in (float(info.max), float(info.tiny), float(info.smallest_normal) / 4, 1.0):
            table, _ = buckets_of(np.array([value]), dtype, np.array([True]), 1)
            assert es.to_float(table[0, fmt.buckets :].numpy(), dtype) == value
        assert fmt.buckets == table.shape[1] // 2


# -- the packed update's importance is exact -----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("redistribution", ["momentum", "magnitude"])
def test_packed_importance_is_the_exact_mean_whatever_the_packing(dtype, redistribution):
    layers = spread_layers(np.random.default_rng(7), dtype)
    reports = [
        sc.update(layers, prune_rate=0.3, redistribution=redistribution,
                  backend=TorchBackend(fused=True, max_chunk=c)).report
        for c in (1, 16, 4096)
    ]  # fmt: skip
    assert reports[0] == reports[1] == reports[2]
    for layer, report in zip(layers, reports[0].layers):
        x = layer.momentum if redistribution == "momentum" else layer.weight
        active = x.double().abs().numpy()[layer.mask.numpy()]
        assert report.importance == math.fsum(active) / len(active)
