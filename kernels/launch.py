"""Launch geometry of the CUDA kernels: which variant, how many threads, which grid.

Plain Python, so it is tested without a GPU. The kernels assume (``common.cuh``) blocks of a
multiple of 32 threads and at most 256, and the weight-gradient kernel one block per
(row, chunk) with at most 65535 chunks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sparsecore.errors import SparseCoreError

from .layout import Geometry, Tiling

__all__ = [
    "MAX_GRID_Y",
    "MAX_THREADS",
    "Launch",
    "TiledLaunch",
    "plan_gather",
    "plan_reduce",
    "plan_sddmm",
    "plan_tiled",
]

MAX_THREADS = 256
MAX_GRID_Y = 65535
_REDUCE_THREADS = 256


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel's name, grid, block and positions covered per block."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    per_block: int = 0

    @property
    def chunks(self) -> int:
        """Blocks along y (position chunks) per row."""
        return self.grid[1]


def _round_warp(n: int) -> int:
    return max(32, min(MAX_THREADS, (n + 31) // 32 * 32))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=4096)
def plan_gather(geom: Geometry, aligned: bool) -> Launch:
    """Forward / input-gradient launch. ``aligned``: input and output pointers are 16-byte aligned.

    Quads of 4 consecutive outputs with float4 loads when the geometry allows it (linear layers);
    otherwise 4, 2 or 1 outputs per thread depending on how many positions a row has, so small
    problems (8x8 images, small batches) still fill whole warps.
    """
    if geom.rows < 1 or geom.positions < 1:
        raise SparseCoreError(f"nothing to launch: {geom.rows} rows, {geom.positions} positions")
    if aligned and geom.vector_ok():
        units = geom.positions // 4
        threads, kernel, vpt = _round_warp(units), "sc_gather_f32_q1", 1
        if units >= 4 * MAX_THREADS * 2:
            threads, kernel, vpt = MAX_THREADS, "sc_gather_f32_q2", 2
    else:
        units = geom.positions
        if units >= 4 * MAX_THREADS * 4:
            threads, kernel, vpt = MAX_THREADS, "sc_gather_f32_v4", 4
        elif units >= 2 * MAX_THREADS * 2:
            threads, kernel, vpt = MAX_THREADS, "sc_gather_f32_v2", 2
        else:
            threads, kernel, vpt = _round_warp(units), "sc_gather_f32_v1", 1
    per_block = threads * vpt
    chunks = min(_cdiv(units, per_block), MAX_GRID_Y)  # the kernel strides over the rest
    return Launch(kernel, (geom.rows, chunks, 1), (threads, 1, 1), per_block)


@functools.lru_cache(maxsize=4096)
def plan_sddmm(geom: Geometry, aligned: bool) -> Launch:
    """Weight-gradient launch: one block per (row, chunk of positions), one partial per chunk.

    Many positions per thread amortise the warp reduction per entry (16 when a row has enough
    positions). Raises if more than 65535 chunks would be needed.
    """
    if geom.rows < 1 or geom.positions < 1:
        raise SparseCoreError(f"nothing to launch: {geom.rows} rows, {geom.positions} positions")
    if aligned and geom.vector_ok():
        units = geom.positions // 4
        if units >= MAX_THREADS * 4:
            threads, kernel, vpt = MAX_THREADS, "sc_sddmm_f32_q4", 4
        else:
            threads, kernel, vpt = _round_warp(units), "sc_sddmm_f32_q1", 1
    else:
        units = geom.positions
        if units >= MAX_THREADS * 16:
            threads, kernel, vpt = MAX_THREADS, "sc_sddmm_f32_v16", 16
        else:
            threads, kernel, vpt = _round_warp(_cdiv(units, 4)), "sc_sddmm_f32_v4", 4
    per_block = threads * vpt
    chunks = _cdiv(units, per_block)
    if chunks > MAX_GRID_Y:
        raise SparseCoreError(
            f"weight gradient over {geom.positions} positions per row needs {chunks} chunks; "
            f"at most {MAX_GRID_Y} are supported (split the batch)"
        )
    return Launch(kernel, (geom.rows, chunks, 1), (threads, 1, 1), per_block)


@functools.lru_cache(maxsize=4096)
def plan_reduce(nnz: int) -> Launch:
    """Launch of the partial-sum reduction, one thread per stored entry."""
    if nnz < 1:
        raise SparseCoreError(f"nothing to launch: {nnz} entries")
    return Launch(
        "sc_reduce_partials_f32", (_cdiv(nnz, _REDUCE_THREADS), 1, 1), (_REDUCE_THREADS, 1, 1)
    )


#: Tiled convolution kernel (tiled.cu): rows per block, positions per block, shared floats.
TILE_ROWS = 16
TILE_POSITIONS = 512
TILE_SMEM_FLOATS = 12288


@dataclass(frozen=True)
class TiledLaunch(Launch):
    """A launch of ``sc_conv_tiled_f32`` with its tile: images, output rows, band rows,
    channels per shared-memory stage, and output-row tiles per image."""

    NB: int = 1
    PB: int = 1
    HB: int = 1
    CH: int = 1
    p_tiles: int = 1


@functools.lru_cache(maxsize=4096)
def plan_tiled(geom: Geometry, tiling: Tiling) -> TiledLaunch | None:
    """The tiled convolution launch, or None where the tiled kernel does not apply.

    Tiles hold up to 512 output positions: whole images (several when they are small) or bands
    of output rows of one image. A stage holds as many input channels as fit in 48 KiB.
    """
    if geom.rows < 1 or geom.positions < 1 or geom.rows_per_group != geom.rows:
        return None
    P, Q = geom.P, geom.Q
    if Q > TILE_POSITIONS:
        return None
    if P * Q <= TILE_POSITIONS:
        pb, nb = P, max(1, min(geom.n_batch, TILE_POSITIONS // (P * Q)))
    else:
        pb, nb = TILE_POSITIONS // Q, 1
    hb = (pb - 1) * tiling.sh + tiling.kernel_rows
    seg = hb * tiling.plane_w
    if seg > TILE_SMEM_FLOATS:
        return None
    nb = min(nb, TILE_SMEM_FLOATS // seg)
    ch = max(1, min(tiling.channels, TILE_SMEM_FLOATS // (nb * seg)))
    p_tiles = _cdiv(P, pb)
    tiles = _cdiv(geom.n_batch, nb) * p_tiles
    if tiles > MAX_GRID_Y:
        return None
    return TiledLaunch(
        "sc_conv_tiled_f32",
        (_cdiv(geom.rows, TILE_ROWS), tiles, 1),
        (MAX_THREADS, 1, 1),
        nb * pb * Q,
        NB=nb,
        PB=pb,
        HB=hb,
        CH=ch,
        p_tiles=p_tiles,
    )
