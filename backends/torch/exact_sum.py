"""Exact sums of ``|x|`` per layer: integers on the device, one correctly rounded float on the host.

Why: a float64 sum depends on the order of its additions. The packed update sums a layer row by
row; a sharded update (:mod:`sparsecore.torch.sharded_update`) sums each rank's rows, then adds
the ranks' partial sums: another order, so the importance of a layer, hence a budget, could
differ in the last bit between one process and several. An exact sum has no order: every
process, any sharding, any packing, gets the same bits, which is what lets a sharded update
reproduce a single-process one bit for bit.

How. A finite float ``|x|`` is ``M * 2**(e - bias - frac)`` with an integer mantissa ``M``
(``frac + 1`` bits, the implicit bit included; subnormal values have ``e = 0`` and are read as
``e = 1`` without the implicit bit). Exponents are grouped ``2**group`` at a time; inside a
group, ``M`` shifted left by the exponent's place in the group is an integer below ``2**31``, and
the sum of every such integer of a bucket (at most ``2**31`` positions per layer) stays below
``2**62``: int64 sums never overflow and never round, whatever their order. float64's 53-bit
mantissa is split into 16-bit limbs first, each limb a bucket of its own. Buckets per layer:

=========  ===========  ======================  =======
dtype      frac, exp    group, limb bits        buckets
=========  ===========  ======================  =======
float16    10, 5        16 exponents, 11 bits   2
bfloat16   7, 8         16 exponents, 8 bits    16
float32    23, 8        8 exponents, 24 bits    32
float64    52, 11       16 exponents, 16 bits   512 (128 groups x 4 limbs)
=========  ===========  ======================  =======

On the device: one scatter-add of integers per block of rows (``scatter_add_`` into a per-row
bucket table, then the rows of each layer added by ``index_add_``), whose integer additions are
exact in any order, so atomics are harmless. Active and inactive positions go to two halves of
the table in the same pass: the active sum is one half, the total both. NaN and Inf (an all-ones
exponent) are counted apart and left out of the sums.

On the host: :func:`to_float` adds a layer's buckets as one Python integer (each bucket shifted
to the smallest unit present) and divides by a power of two once: Python's integer true division
rounds correctly (to nearest, ties to even), so the result is the exact sum correctly rounded to
float64: the same as ``math.fsum`` of the values, within half an ulp of any float64 summation
order's result (NumPy's included, to 1e-16 relative for non-negative values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ROWS_BLOCK = 1 << 24  # positions per block on a GPU: few launches, scratch below 0.5 GB
CPU_BLOCK = 1 << 16  # positions per block on a CPU: the scratch stays in cache


@dataclass(frozen=True)
class Format:
    """How the bits of one float type map to integer buckets (module docstring)."""

    frac: int  # fraction bits (the mantissa without its implicit bit)
    exp: int  # exponent bits
    group: int  # log2 of the exponents sharing a bucket
    limb: int  # mantissa bits per limb

    @property
    def limbs(self) -> int:
        return -(-(self.frac + 1) // self.limb)

    @property
    def groups(self) -> int:
        return (1 << self.exp) >> self.group

    @property
    def buckets(self) -> int:
        return self.groups * self.limbs

    @property
    def top_exponent(self) -> int:
        """The all-ones exponent field: Inf and NaN."""
        return (1 << self.exp) - 1

    def unit(self, bucket: int) -> int:
        """The power of two one count of ``bucket`` is worth."""
        group, limb = divmod(bucket, self.limbs)
        bias = (1 << (self.exp - 1)) - 1
        return (group << self.group) - bias - self.frac + self.limb * limb


FORMATS = {
    torch.float16: Format(frac=10, exp=5, group=4, limb=11),
    torch.bfloat16: Format(frac=7, exp=8, group=4, limb=8),
    torch.float32: Format(frac=23, exp=8, group=3, limb=24),
    torch.float64: Format(frac=52, exp=11, group=4, limb=16),
}
# Each shifted limb is below 2**31 and a layer has fewer than 2**31 positions: sums < 2**62.
assert all(f.limb + (1 << f.group) - 1 <= 31 for f in FORMATS.values())


def bucket_sums(
    bits: torch.Tensor,
    dtype: torch.dtype,
    active: torch.Tensor,
    row_layer: torch.Tensor,
    layers: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the integer buckets of ``|x|`` over inactive positions and over active ones,
    and the number of NaN/Inf positions.

    ``bits``: the ``(rows, chunk)`` packed ``|x|`` bit patterns of a float of ``dtype`` (sign
    cleared, as :func:`sparsecore.torch.packed_update.magnitude_bits` gives: int32, or int64 for
    float64; padding is 0), ``active`` the packed mask, ``row_layer`` the layer of each row.
    Returns ``(layers, 2 * buckets)`` int64 (inactive half first) and ``(layers,)`` int64.
    """
    fmt = FORMATS[dtype]
    width = 2 * fmt.buckets
    device = bits.device
    table = torch.zeros((layers, width), dtype=torch.int64, device=device)
    bad = torch.zeros(layers, dtype=torch.int64, device=device)
    rows, chunk = bits.shape
    # Blocks that stay in cache on a CPU (fresh large buffers cost page faults there); few
    # launches on a GPU.
    block = ROWS_BLOCK if device.type != "cpu" else CPU_BLOCK
    step = max(1, block // max(chunk, 1))
    for first in range(0, rows, step):
        word = bits[first : first + step]
        # t = (effective exponent) - 1: subnormal values read as exponent 1
        t = (word >> fmt.frac).sub_(1).clamp_(min=0)
        finite = t < fmt.top_exponent - 1
        # the mantissa with its implicit bit: word - ((e - 1) << frac), for e >= 1 and e = 0
        mantissa = (t << fmt.frac).neg_().add_(word).mul_(finite)  # NaN/Inf add nothing
        t.add_(1)
        shift = t & ((1 << fmt.group) - 1)
        index = t.bitwise_right_shift_(fmt.group)
        if fmt.limbs > 1:
            index.mul_(fmt.limbs)
        index.add_(active[first : first + step].to(index.dtype).mul_(fmt.buckets))
        index = index.to(torch.int64)
        per_row = torch.zeros((word.shape[0], width), dtype=torch.int64, device=device)
        for limb in range(fmt.limbs):
            part = (
                mantissa
                if fmt.limbs == 1
                else (mantissa >> (fmt.limb * limb)) & ((1 << fmt.limb) - 1)
            )
            # below 2**31: exact in the word's type, then widened for the int64 sums
            part = part.bitwise_left_shift(shift).to(torch.int64)
            per_row.scatter_add_(1, index if limb == 0 else index + limb, part)
        block_layer = row_layer[first : first + step]
        table.index_add_(0, block_layer, per_row)
        bad.index_add_(0, block_layer, (~finite).sum(dim=1))
    return table, bad


def to_float(buckets: np.ndarray | list[int], dtype: torch.dtype) -> float:
    """The exact sum that integer ``buckets`` of ``dtype`` (as :func:`bucket_sums`) stand for,
    correctly rounded to float64 (``inf`` beyond float64's range)."""
    fmt = FORMATS[dtype]
    counts = [(int(c), fmt.unit(i)) for i, c in enumerate(buckets) if c]
    if not counts:
        return 0.0
    low = min(unit for _, unit in counts)
    total = sum(c << (unit - low) for c, unit in counts)
    try:
        return float(total << low) if low >= 0 else total / (1 << -low)
    except OverflowError:
        return math.inf
