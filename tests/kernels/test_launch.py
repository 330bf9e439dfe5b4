"""Launch geometry: every position is covered once, blocks are whole warps, limits hold."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsecore.errors import SparseCoreError
from sparsecore.kernels import kernel_names
from sparsecore.kernels.launch import (
    MAX_GRID_Y,
    MAX_THREADS,
    plan_gather,
    plan_reduce,
    plan_sddmm,
)
from sparsecore.kernels.layout import Geometry


def _geom(n_batch, rows, P, Q, off_scale=1, col_step=1, row_step=None) -> Geometry:
    return Geometry(
        n_batch=n_batch,
        rows=rows,
        rows_per_group=rows,
        in_batch_stride=4 * P * Q * 8,
        in_group_stride=0,
        P=P,
        Q=Q,
        row_step=Q if row_step is None else row_step,
        col_step=col_step,
        off_scale=off_scale,
    )


KNOWN = set(kernel_names("gather.cu")) | set(kernel_names("sddmm.cu"))

shapes = st.tuples(st.integers(1, 300), st.integers(1, 50), st.integers(1, 40), st.integers(1, 40))


@given(shapes, st.booleans(), st.sampled_from([1, 4, 128]))
def test_gather_plan_covers_all_positions(shape, aligned, off_scale) -> None:
    n, rows, p, q = shape
    geom = _geom(n, rows, p, q, off_scale=off_scale)
    plan = plan_gather(geom, aligned)
    assert plan.kernel in KNOWN
    threads = plan.block[0]
    assert threads % 32 == 0 and 32 <= threads <= MAX_THREADS
    assert plan.grid[0] == rows
    vector = plan.kernel.startswith("sc_gather_f32_q")
    assert vector == (aligned and geom.vector_ok())
    units = geom.positions // 4 if vector else geom.positions
    # The kernel walks chunks blockIdx.y, blockIdx.y + gridDim.y, ...: all chunks are reached.
    assert 1 <= plan.grid[1] <= MAX_GRID_Y
    assert plan.grid[1] * plan.per_block >= units or plan.grid[1] == MAX_GRID_Y
    assert (plan.grid[1] - 1) * plan.per_block < units  # no block is entirely idle


@given(shapes, st.booleans())
def test_sddmm_plan_has_one_block_per_chunk(shape, aligned) -> None:
    n, rows, p, q = shape
    geom = _geom(n, rows, p, q, off_scale=4)
    plan = plan_sddmm(geom, aligned)
    assert plan.kernel in KNOWN
    vector = plan.kernel.startswith("sc_sddmm_f32_q")
    assert vector == (aligned and geom.vector_ok())
    units = geom.positions // 4 if vector else geom.positions
    assert plan.grid[1] * plan.per_block >= units
    assert (plan.grid[1] - 1) * plan.per_block < units
    assert plan.block[0] % 32 == 0 and plan.block[0] <= MAX_THREADS


def test_large_problems_use_more_outputs_per_thread() -> None:
    big = _geom(128, 160, 32, 32)  # WRN-16-10 first group, batch 128
    assert plan_gather(big, aligned=True).kernel == "sc_gather_f32_v4"
    assert plan_sddmm(big, aligned=True).kernel == "sc_sddmm_f32_v16"
    linear = _geom(1, 1024, 1, 128, off_scale=128, row_step=0)
    assert plan_gather(linear, aligned=True).kernel == "sc_gather_f32_q1"
    assert plan_gather(linear, aligned=False).kernel == "sc_gather_f32_v1"


def test_too_many_weight_gradient_chunks_is_an_error() -> None:
    huge = _geom(70000, 1, 64, 64)
    with pytest.raises(SparseCoreError, match="chunks"):
        plan_sddmm(huge, aligned=False)
    # The gather kernel strides over chunks instead.
    assert plan_gather(huge, aligned=False).grid[1] == MAX_GRID_Y


def test_empty_launches_are_rejected() -> None:
    with pytest.raises(SparseCoreError):
        plan_gather(_geom(0, 3, 4, 4), aligned=False)
    with pytest.raises(SparseCoreError):
        plan_reduce(0)
    plan = plan_reduce(1000)
    assert plan.grid[0] * plan.block[0] >= 1000
