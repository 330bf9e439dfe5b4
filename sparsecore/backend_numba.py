"""The Numba backend: the NumPy reference's results, computed in O(n) compiled passes.

Users choose it by name (``backend="numba"`` or ``get_backend("numba")``); it works on plain
``numpy.ndarray`` and gives masks bit for bit equal to
:class:`~sparsecore.backend_numpy.NumpyBackend`, and importance equal to rounding.

How selection works without sorting. Every score is mapped to an unsigned *rank key* whose integer
order is the selection order: the bit pattern of a non-negative float orders like its value, so
``|x|`` is the pattern with the sign bit cleared, a signed ``x`` is ``top + |x|`` or ``top - |x|``
(``top`` the sign bit; -0.0 and +0.0 share a key), unsigned integers (the random-growth hash) are
their own key, and "smallest first" is the complement. The key is computed without branches from a
few constants prepared on the host (:func:`rank_params`). Then:

1. A strided sample of about n/128 positions gives a key interval ``[lo, hi]`` that should hold
   the k-th best key. One pass over the layer (candidate filter, key and comparisons fused, no
   branch, so it vectorises) flags every candidate above ``hi`` as chosen and those inside the
   interval as undecided; a byte scan, eight flags at a time, then gathers the undecided ones.
2. If the counts show the k-th key is inside, the gathered candidates are narrowed by a radix
   select on their keys, 8 bits a round (leading bits they all share are skipped). If the sample
   missed, the guaranteed path runs instead: a 16-bit histogram of the keys names the bucket of
   the k-th key, a second pass marks the buckets above it and gathers that bucket, which is
   narrowed the same way. Massive ties (all-zero momentum) take either path in O(n).
3. Candidates whose keys tie at the boundary are ranked by the position hash (larger first), then
   by lower position (reachable only beyond 2**32 positions).

Kernels read raw bits (``uint16``/``uint32``/``uint64`` views), so float16, float32, float64 and
uint32 hashes share three specialisations per kernel, compiled lazily on first use. Compiled code
is cached on disk (``cache=True``) where a cache directory is writable, and silently not otherwise.
Large layers are cut into one chunk per thread, run on a small thread pool (the kernels release the
GIL); see :func:`_run` for why not ``prange``. The fused update also spreads whole layers over the
threads (:func:`_map_layers`): most layers of a real network are too small to cut, and their
per-layer steps would otherwise run one after another on one core.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

from .backend import FusedLayer, LayerScan, Sign
from .backend_numpy import NumpyBackend
from .hashing import MASK32, MUL1, MUL2, HashKey
from .layers import Layer

__all__ = ["BufferPool", "NumbaBackend", "rank_params", "select_flat", "warm_up"]

DIGIT_BITS = 16  # key bits counted by the full-layer histogram of the guaranteed path
MIN_CHUNK = 1 << 16  # a pass gets one thread per this many elements, at most the thread count
# A fused update of fewer weights than this runs on the calling thread alone: handing work to the
# pool and back costs more than it saves there (measured on 2 cores: 0.93 ms serial against
# 1.30 ms on two threads for LeNet-300-100's 266k weights; even at 2.1M weights; 2 threads
# win from about 3M).
PARALLEL_MIN = 1 << 21
SMALL_LAYER = 1 << 14  # layers up to this size are selected by one serial gather and narrowing
SAMPLE_SHIFT, MIN_SAMPLES, MAX_SAMPLES = 7, 2048, 65536  # sample n/128 positions, clipped
DECIDE_BLOCK = 2048  # fused pass 2 works in blocks that stay in L1 for their second look
DENSE_MIN, DENSE_RATE = 1 << 16, 32  # layers this large refine the intervals on n/32 samples
LANES = 8  # sample runs read side by side, so that their cache misses overlap
SPREAD = 3.5  # half-width of the sampled interval in standard deviations of the k-th rank

_U64_MASK32 = np.uint64(MASK32)
_U64_MUL1 = np.uint64(MUL1)
_U64_MUL2 = np.uint64(MUL2)
_REASSOC = {"reassoc", "contract", "nsz"}  # lets exact float64 sums vectorise (order is free)

# Indices into the rank-parameter tuple built by :func:`rank_params` (all uint64).
_AMONG, _ANY, _WANT_POS, _POS_SIGN, _MAG, _BASE, _SIGNED, _FLIP, _SIGN_SHIFT = range(9)


def _jit(**options: Any) -> Callable[[Any], Any]:
    """``numba.njit(cache=True, ...)``, without the cache where no cache directory is writable."""

    def decorate(fn: Any) -> Any:
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # Numba found no writable cache location for this file
            return numba.njit(cache=False, **options)(fn)

    return decorate


# -- scalar helpers (inlined into the kernels) --------------------------------------------------


@_jit(inline="always")
def _mix(x):  # pragma: no cover - jitted
    """hashing.mix32 on a uint64 holding a 32-bit value."""
    x ^= x >> np.uint64(16)
    x = (x * _U64_MUL1) & _U64_MASK32
    x ^= x >> np.uint64(15)
    x = (x * _U64_MUL2) & _U64_MASK32
    x ^= x >> np.uint64(16)
    return x


@_jit(inline="always")
def _hash(i, prefix):  # pragma: no cover - jitted
    return _mix((np.uint64(i) & _U64_MASK32) ^ prefix)


@_jit(inline="always")
def _key(b, p):  # pragma: no cover - jitted
    """Rank key of raw value ``b`` (uint64): a larger key comes earlier in the selection order.

    ``base + (+-magnitude)``, the sign taken from the sign bit when ranking signed floats
    (``(m ^ s) - s`` negates ``m`` when ``s`` is all ones), then complemented for "smallest first".
    """
    s = (np.uint64(0) - ((b >> p[_SIGN_SHIFT]) & np.uint64(1))) & p[_SIGNED]
    return (p[_BASE] + (((b & p[_MAG]) ^ s) - s)) ^ p[_FLIP]


@_jit(inline="always")
def _candidate(b, m, p):  # pragma: no cover - jitted
    """Is raw value ``b`` with mask bit ``m`` a candidate (mask side and sign filter)?"""
    positive = (b != np.uint64(0)) & ((b & p[_POS_SIGN]) == np.uint64(0))
    sign_ok = (p[_ANY] != np.uint64(0)) | (np.uint64(positive) == p[_WANT_POS])
    return (np.uint64(m) == p[_AMONG]) & sign_ok


@_jit(inline="always")
def _half_abs(b):  # pragma: no cover - jitted
    """``|x|`` of a float16 given by its bits, exactly, as float64 (Numba has no CPU float16)."""
    exponent = (b >> np.uint64(10)) & np.uint64(0x1F)
    mantissa = np.float64(b & np.uint64(0x3FF))
    if exponent == np.uint64(0):
        return mantissa * 2.0**-24
    return (1024.0 + mantissa) * 2.0 ** (np.float64(exponent) - 25.0)


# -- full-layer passes -------------------------------------------------------------------------
# Each works on the chunk [start, stop) of flat arrays through slices: with slices the compiler
# knows every index is in range, which is what lets it vectorise the simple passes.


@_jit(nogil=True)
def _chunk_threshold(bits, mask, p, lo, hi, out, start, stop):  # pragma: no cover - jitted
    """Byte ``out[i]``: 1 for a candidate with key above ``hi``, 2 for one in ``[lo, hi]``, else 0.

    Returns (above, in range). No branch and no data-dependent store, so it vectorises; the
    caller finds the few 2s afterwards with a byte scan.
    """
    b_ = bits[start:stop]
    m_ = mask[start:stop]
    o_ = out[start:stop]
    above = 0
    in_range = 0
    for i in range(b_.size):
        b = np.uint64(b_[i])
        cand = _candidate(b, m_[i], p)
        key = _key(b, p)
        chosen = cand & (key > hi)
        inside = cand & (key >= lo) & (key <= hi)
        o_[i] = np.uint8(chosen) | (np.uint8(inside) << np.uint8(1))
        above += chosen
        in_range += inside
    return above, in_range


@_jit(nogil=True)
def _chunk_flagged(flags, value, gathered, start, stop):  # pragma: no cover - jitted
    """Positions in ``[start, stop)`` (multiples of 8, but ``stop`` may be the end) whose byte is
    ``value`` (a single bit), into ``gathered``; eight bytes are tested at once."""
    words = flags[start : start + (stop - start) // 8 * 8].view(np.uint64)
    pattern = np.uint64(value) * np.uint64(0x0101010101010101)
    j = 0
    for w in range(words.size):
        if words[w] & pattern:
            base = start + 8 * w
            for i in range(base, base + 8):
                if flags[i] == value:
                    gathered[j] = i
                    j += 1
    for i in range(start + words.size * 8, stop):
        if flags[i] == value:
            gathered[j] = i
            j += 1
    return j


@_jit(nogil=True)
def _chunk_histogram(bits, mask, p, shift, hist, start, stop):  # pragma: no cover - jitted
    """Count the chunk's candidates into ``hist`` by the top ``DIGIT_BITS`` bits of their key."""
    b_ = bits[start:stop]
    m_ = mask[start:stop]
    hist[:] = 0
    for i in range(b_.size):
        b = np.uint64(b_[i])
        if _candidate(b, m_[i], p):
            hist[np.int64(_key(b, p) >> shift)] += 1
    return 0


@_jit(nogil=True)
def _chunk_mark_and_gather(
    bits, mask, p, shift, boundary, take_boundary, out, gathered, start, stop
):  # pragma: no cover - jitted
    """``out`` = candidates above the boundary digit (or at it, if ``take_boundary``); the others
    at the boundary go to ``gathered`` in ascending order. ``out`` is written everywhere."""
    b_ = bits[start:stop]
    m_ = mask[start:stop]
    o_ = out[start:stop]
    j = 0
    for i in range(b_.size):
        b = np.uint64(b_[i])
        chosen = False
        if _candidate(b, m_[i], p):
            d = np.int64(_key(b, p) >> shift)
            if d > boundary or (take_boundary and d == boundary):
                chosen = True
            elif d == boundary:
                gathered[j] = start + i
                j += 1
        o_[i] = chosen
    return j


@_jit(nogil=True)
def _chunk_candidates(bits, mask, p, out, start, stop):  # pragma: no cover - jitted
    """Count the candidates, and mark them in ``out`` unless it is empty."""
    b_ = bits[start:stop]
    m_ = mask[start:stop]
    total = 0
    if out.size:
        o_ = out[start:stop]
        for i in range(b_.size):
            c = _candidate(np.uint64(b_[i]), m_[i], p)
            o_[i] = c
            total += c
    else:
        for i in range(b_.size):
            total += _candidate(np.uint64(b_[i]), m_[i], p)
    return total


@_jit(nogil=True, fastmath=_REASSOC)
def _chunk_abs_sum(x, mask, use_mask, start, stop):  # pragma: no cover - jitted
    """float64 sum of ``|x|`` over ``mask`` (everywhere if not ``use_mask``); every term exact."""
    x_ = x[start:stop]
    total = 0.0
    if use_mask:
        m_ = mask[start:stop].view(np.uint8)
        for i in range(x_.size):
            total += abs(np.float64(x_[i])) * np.float64(m_[i] != 0)
    else:
        for i in range(x_.size):
            total += abs(np.float64(x_[i]))
    return total


@_jit(nogil=True, fastmath=_REASSOC)
def _chunk_abs_sum_half(bits, mask, use_mask, start, stop):  # pragma: no cover - jitted
    """:func:`_chunk_abs_sum` for float16 given as raw ``uint16`` bits."""
    b_ = bits[start:stop]
    total = 0.0
    if use_mask:
        m_ = mask[start:stop].view(np.uint8)
        for i in range(b_.size):
            total += _half_abs(np.uint64(b_[i])) * np.float64(m_[i] != 0)
    else:
        for i in range(b_.size):
            total += _half_abs(np.uint64(b_[i]))
    return total


@_jit(nogil=True)
def _chunk_max_magnitude(bits, sign_clear, start, stop):  # pragma: no cover - jitted
    """The largest bit pattern with the sign cleared: NaN or Inf iff it reaches the exponent."""
    b_ = bits[start:stop]
    largest = sign_clear ^ sign_clear  # zero of the bits' type
    for i in range(b_.size):
        largest = max(largest, b_[i] & sign_clear)
    return np.uint64(largest)


@_jit(nogil=True)
def _chunk_hash(prefix, out, start, stop):  # pragma: no cover - jitted
    o_ = out[start:stop]
    for i in range(o_.size):
        o_[i] = np.uint32(_hash(start + i, prefix))
    return 0


@_jit(nogil=True)
def _chunk_apply(bits, old_mask, new_mask, out, start, stop):  # pragma: no cover - jitted
    """Raw weight bits where active before and after, else all-zero bits (+0.0)."""
    b_ = bits[start:stop]
    a_ = old_mask[start:stop].view(np.uint8)
    n_ = new_mask[start:stop].view(np.uint8)
    o_ = out[start:stop]
    for i in range(b_.size):
        keep = np.uint64(0) - np.uint64((a_[i] != 0) & (n_[i] != 0))  # all ones or zero
        o_[i] = np.uint64(b_[i]) & keep
    return 0


@_jit(nogil=True)
def _chunk_and_not(a, b, out, start, stop):  # pragma: no cover - jitted
    a_ = a[start:stop].view(np.uint8)
    b_ = b[start:stop].view(np.uint8)
    o_ = out[start:stop].view(np.uint8)
    for i in range(a_.size):
        o_[i] = np.uint8((a_[i] != 0) & (b_[i] == 0))
    return 0


# -- selection helpers ----------------------------------------------------------------------------


@_jit(nogil=True)
def _sample_bounds(bits, mask, p, k, samples):  # pragma: no cover - jitted
    """Guess a key interval ``[lo, hi]`` holding the k-th best key, from a strided sample.

    A wrong guess costs only time: the caller checks the counts and falls back.
    """
    n = bits.size
    stride = max(1, (n // samples - 1) | 1)  # odd: no aliasing with power-of-two layouts
    keys = np.empty(samples, dtype=np.uint64)
    m = 0
    for t in range(samples):
        i = t * stride + stride // 2
        b = np.uint64(bits[i])
        if _candidate(b, mask[i], p):
            keys[m] = _key(b, p)
            m += 1
    rank = k * samples / n  # expected number of selected positions in the sample
    hi, hi_found, lo, lo_found = _rank_interval(keys, m, rank, _spread(rank, samples, SPREAD, 2.0))
    return (lo if lo_found else np.uint64(0)), (hi if hi_found else ~np.uint64(0))


@_jit(nogil=True)
def _kth_largest(keys, n, rank):  # pragma: no cover - jitted
    """The ``rank``-th largest (0 = largest) of ``keys[:n]``, by radix select; ``keys`` is kept."""
    work = keys[:n].copy()
    hist = np.zeros(256, dtype=np.int64)
    bits = np.uint64(0)
    for t in range(n):  # start at the highest set bit: float32 keys leave 32 leading zeros
        bits |= work[t]
    shift = 0
    while shift < 64 and (bits >> np.uint64(shift)) != np.uint64(0):
        shift += 8
    while shift > 0 and n > 1:
        shift -= 8
        hist[:] = 0
        for t in range(n):
            hist[np.int64(work[t] >> np.uint64(shift)) & 255] += 1
        above = 0
        boundary = 0
        for d in range(255, -1, -1):
            if above + hist[d] > rank:
                boundary = d
                break
            above += hist[d]
        j = 0
        for t in range(n):
            if np.int64(work[t] >> np.uint64(shift)) & 255 == boundary:
                work[j] = work[t]
                j += 1
        n = j
        rank -= above
    return work[0]


@_jit(nogil=True)
def _boundary(hist, k):  # pragma: no cover - jitted
    """From per-chunk histograms: the candidate count, the digit holding the k-th key, how many
    to take at it, its size, and each chunk's offset into the gathered boundary positions."""
    nchunks, bins = hist.shape
    totals = np.zeros(bins, dtype=np.int64)
    for c in range(nchunks):
        totals += hist[c]
    above = 0
    boundary = 0
    for d in range(bins - 1, -1, -1):
        if above + totals[d] >= k:
            boundary = d
            break
        above += totals[d]
    offsets = np.zeros(nchunks, dtype=np.int64)
    for c in range(1, nchunks):
        offsets[c] = offsets[c - 1] + hist[c - 1, boundary]
    return totals.sum(), boundary, k - above, totals[boundary], offsets


@_jit(nogil=True)
def _narrow(keys, pos, n, need, nbits, out):  # pragma: no cover - jitted
    """Select the ``need`` largest of ``keys[:n]`` by their low ``nbits`` bits, 8 bits a round.

    Candidates above each round's boundary digit are marked in ``out``; those at it are kept,
    compacted in place in their order. Returns ``(n, need)`` of the group still tied.
    """
    if 0 < need < n:  # skip the leading key bits every candidate shares
        differ = np.uint64(0)
        for t in range(1, n):
            differ |= keys[t] ^ keys[0]
        used = 0
        while used < nbits and (differ >> np.uint64(used)) != np.uint64(0):
            used += 1
        nbits = used
    hist = np.zeros(256, dtype=np.int64)
    while nbits > 0 and 0 < need < n:
        shift = max(nbits - 8, 0)
        digit_mask = (1 << (nbits - shift)) - 1
        hist[:] = 0
        for t in range(n):
            hist[np.int64(keys[t] >> np.uint64(shift)) & digit_mask] += 1
        above = 0
        boundary = 0
        for d in range(digit_mask, -1, -1):
            if above + hist[d] >= need:
                boundary = d
                break
            above += hist[d]
        j = 0
        for t in range(n):
            d = np.int64(keys[t] >> np.uint64(shift)) & digit_mask
            if d > boundary:
                out[pos[t]] = True
            elif d == boundary:
                keys[j] = keys[t]
                pos[j] = pos[t]
                j += 1
        need -= above
        n = j
        nbits = shift
    return n, need


@_jit(inline="always")
def _finish_ties(keys, pos, n, need, prefix, out):  # pragma: no cover - jitted
    """``pos[:n]`` tie on the score: take ``need`` by hash (larger first), then lower position."""
    if need >= n:
        for t in range(n):
            out[pos[t]] = True
        return
    if need <= 0:
        return
    for t in range(n):
        keys[t] = _hash(pos[t], prefix)
    n, need = _narrow(keys, pos, n, need, 32, out)
    for t in range(min(need, n)):  # equal hashes: only beyond 2**32 positions
        out[pos[t]] = True


@_jit(nogil=True)
def _resolve(bits, gathered, need, p, nbits, prefix, out):  # pragma: no cover - jitted
    """Choose ``need`` of the ``gathered`` positions, whose keys differ in the low ``nbits``."""
    n = gathered.size
    pos = gathered.copy()
    keys = np.empty(n, dtype=np.uint64)
    for t in range(n):
        keys[t] = _key(np.uint64(bits[pos[t]]), p)
    n, need = _narrow(keys, pos, n, need, nbits, out)
    _finish_ties(keys, pos, n, need, prefix, out)


@_jit(nogil=True)
def _select_small(bits, mask, p, k, width, prefix):  # pragma: no cover - jitted
    """Serial selection for small layers: gather every candidate, then narrow."""
    n = bits.size
    out = np.zeros(n, dtype=np.bool_)
    pos = np.empty(n, dtype=np.int64)
    keys = np.empty(n, dtype=np.uint64)
    m = 0
    for i in range(n):
        b = np.uint64(bits[i])
        if _candidate(b, mask[i], p):
            pos[m] = i
            keys[m] = _key(b, p)
            m += 1
    m, need = _narrow(keys, pos, m, k, width, out)
    _finish_ties(keys, pos, m, need, prefix, out)
    return out


@_jit(nogil=True)
def _select_units(bits, mask, p, ks, outer, inner, width, prefix, out):  # pragma: no cover
    """With the array viewed as ``(outer, units, inner)``, select ``ks[j]`` positions of unit j."""
    units = ks.size
    per_unit = outer * inner
    pos = np.empty(per_unit, dtype=np.int64)
    keys = np.empty(per_unit, dtype=np.uint64)
    for j in range(units):
        need = ks[j]
        if need <= 0:
            continue
        n = 0
        for o in range(outer):
            base = (o * units + j) * inner
            for i in range(base, base + inner):
                b = np.uint64(bits[i])
                if _candidate(b, mask[i], p):
                    pos[n] = i
                    keys[n] = _key(b, p)
                    n += 1
        n, need = _narrow(keys, pos, n, need, width, out)
        _finish_ties(keys, pos, n, need, prefix, out)
    return 0


# -- the fused update (engine capability) ------------------------------------------------------
# Pass 1 (:func:`_chunk_scan`): nnz and the |x| sums of the importance source in one read.
# Pass 2 (:func:`_chunk_decide`): with magnitude intervals from a sample, decide pruning
# and growth together for every position, write the new mask and the new weights, and flag the
# few positions whose fate depends on the exact k-th value; :func:`_fused_resolve` settles those.
# Intervals are half-open bit-pattern ranges of |x| (sign bit cleared): pruning takes |w| < plo
# for sure and leaves [plo, phi) open; growth takes |p| >= ghi for sure and leaves [glo, ghi).
_BYTE_INDEX = np.uint64(0x0001020304050607)  # (1 << 8k) * this >> 56 == k (little-endian bytes)
_TOP = 1 << 63  # above every magnitude pattern: an interval bound meaning "everything"


@_jit(nogil=True, fastmath=_REASSOC)
def _chunk_scan(x, mask, start, stop):  # pragma: no cover - jitted
    """(nnz, sum |x| over active, sum |x| over all, 0) for float32/float64 ``x``; a NaN or Inf
    makes the total non-finite (a float64 sum of float32 magnitudes cannot overflow)."""
    x_ = x[start:stop]
    m_ = mask[start:stop].view(np.uint8)
    nnz = 0
    active = 0.0
    total = 0.0
    for i in range(x_.size):
        a = abs(np.float64(x_[i]))
        m = m_[i] != 0
        nnz += m
        active += a * np.float64(m)
        total += a
    return nnz, active, total, 0


@_jit(nogil=True, fastmath=_REASSOC)
def _chunk_scan_half(bits, mask, start, stop):  # pragma: no cover - jitted
    """:func:`_chunk_scan` for float16 raw bits; the last value counts NaN/Inf entries."""
    b_ = bits[start:stop]
    m_ = mask[start:stop].view(np.uint8)
    nnz = 0
    active = 0.0
    total = 0.0
    bad = 0
    for i in range(b_.size):
        b = np.uint64(b_[i])
        a = _half_abs(b)
        m = m_[i] != 0
        nnz += m
        active += a * np.float64(m)
        total += a
        bad += (b & np.uint64(0x7C00)) == np.uint64(0x7C00)
    return nnz, active, total, bad


@_jit(nogil=True)
def _decide_block(w_, p_, m_, f_, o_, bounds, counts):  # pragma: no cover - jitted
    """The branch-free body of :func:`_chunk_decide` over one block (it vectorises)."""
    plo, phi, glo, ghi, wmask, pmask = bounds
    one = np.uint64(1)
    n_pdef = n_pund = n_gdef = n_gund = n_lost = n_new = np.uint64(0)
    wmax = np.uint64(0)
    for i in range(w_.size):
        wb = np.uint64(w_[i])
        wmag = wb & wmask
        pmag = np.uint64(p_[i]) & pmask
        m = np.uint64(m_[i] != 0)
        pdef = m & np.uint64(wmag < plo)
        pund = m & np.uint64(wmag >= plo) & np.uint64(wmag < phi)
        cand = (m ^ one) | pdef  # inactive after pruning, for sure
        gdef = cand & np.uint64(pmag >= ghi)
        gund = cand & np.uint64(pmag >= glo) & np.uint64(pmag < ghi)
        und = pund | gund
        new = (m & (one ^ pdef)) | gdef  # undecided: kept if active, else not grown, for now
        f_[i] = np.uint8(new | (und << one))
        decided = one ^ und
        o_[i] = wb & (np.uint64(0) - (m & new))
        n_pdef += pdef
        n_pund += pund
        n_gdef += gdef
        n_gund += gund
        n_lost += m & (one ^ new) & decided
        n_new += (m ^ one) & new & decided
        wmax = max(wmax, wmag)
    counts[0] += n_pdef
    counts[1] += n_pund
    counts[2] += n_gdef
    counts[3] += n_gund
    counts[4] += n_lost
    counts[5] += n_new
    counts[6] = max(counts[6], wmax)


@_jit(nogil=True)
def _chunk_decide(
    wbits, pbits, mask, bounds, flags, wout, records, start, stop
):  # pragma: no cover
    """Pass 2 over one chunk. ``flags`` gets the new mask, ``wout`` the weight bits where active
    before and after, +0.0 elsewhere; at undecided positions both hold a provisional value (a
    prune-undecided weight kept, a growth-undecided position not grown) that the resolution
    corrects where it must. Blocks of ``DECIDE_BLOCK`` are computed without branches
    (that vectorises); then the block's undecided positions, still in cache, are appended to
    ``records`` as (position, weight bits, |p| bits with the old mask bit on top), so the
    resolution never goes back to the layer. Returns the counts (definitely pruned, prune-
    undecided, definitely grown, grow-undecided, lost, gained: the last two among decided
    positions), the largest weight magnitude pattern (NaN/Inf check) and the record count."""
    counts = np.zeros(7, dtype=np.uint64)
    pmask = bounds[5]
    pattern = np.uint64(0x0202020202020202)
    j = 0
    for b0 in range(start, stop, DECIDE_BLOCK):
        b1 = min(b0 + DECIDE_BLOCK, stop)
        f_ = flags[b0:b1]
        _decide_block(wbits[b0:b1], pbits[b0:b1], mask[b0:b1].view(np.uint8), f_, wout[b0:b1],
                      bounds, counts)  # fmt: skip
        words = f_[: f_.size // 8 * 8].view(np.uint64)
        for q in range(words.size):
            bits = words[q] & pattern
            while bits:  # one set bit 8k+1 per undecided byte k
                low = bits & (~bits + np.uint64(1))
                at = b0 + 8 * q + np.int64(((low >> np.uint64(1)) * _BYTE_INDEX) >> np.uint64(56))
                records[j, 0] = at
                records[j, 1] = np.uint64(wbits[at])
                records[j, 2] = (np.uint64(pbits[at]) & pmask) | (
                    np.uint64(mask[at]) << np.uint64(63)
                )
                flags[at] &= np.uint8(1)  # leave the provisional mask value
                j += 1
                bits ^= low
        for i in range(b0 + words.size * 8, b1):
            if flags[i] & np.uint8(2):
                records[j, 0] = i
                records[j, 1] = np.uint64(wbits[i])
                records[j, 2] = (np.uint64(pbits[i]) & pmask) | (
                    np.uint64(mask[i]) << np.uint64(63)
                )
                flags[i] &= np.uint8(1)
                j += 1
    return counts[0], counts[1], counts[2], counts[3], counts[4], counts[5], counts[6], j


@_jit(nogil=True)
def _spread(rank, population, sigmas, slack):  # pragma: no cover - jitted
    """Half-width of a sampled rank interval: ``sigmas`` standard deviations of the binomial count
    of selected positions among ``population`` sampled ones (expected ``rank``), plus ``slack``."""
    return sigmas * np.sqrt(rank * max(0.0, 1.0 - rank / population)) + slack


@_jit(nogil=True)
def _rank_interval(keys, n, rank, spread):  # pragma: no cover - jitted
    """Keys at ranks ``floor(rank - spread)`` and ``ceil(rank + spread)`` of ``keys[:n]`` (0 =
    largest); a rank out of range gives ``-1`` in the found-flags."""
    hi_rank = np.int64(np.floor(rank - spread))
    lo_rank = np.int64(np.ceil(rank + spread))
    hi_found = 0 <= hi_rank < n
    lo_found = 0 <= lo_rank < n
    hi = _kth_largest(keys, n, hi_rank) if hi_found else np.uint64(0)
    lo = _kth_largest(keys, n, lo_rank) if lo_found else np.uint64(0)
    return hi, hi_found, lo, lo_found


@_jit(nogil=True)
def _fused_bounds(
    wbits, pbits, mask, nnz, r, g, samples, wmask, pmask, sigmas, slack, dense_min
):  # pragma: no cover - jitted
    """The prune and growth intervals ``(plo, phi, glo, ghi)`` from a sample of about
    ``samples`` positions in runs of 16 (a cache line of float32), spread over the layer.

    A wrong guess costs only time (the counts of pass 2 detect it). Growth candidates of the
    sample are its inactive positions and the active ones below the estimated prune cut.
    Layers of at least ``dense_min`` positions then narrow both intervals
    (:func:`_refine_bounds`).
    """
    n = wbits.size
    top = np.uint64(_TOP)
    run = min(16, n)
    runs = max(1, samples // run)
    gap = max(run, (n // runs - 1) | 1)  # odd: no aliasing with power-of-two layouts
    samples = runs * run
    wkey = np.empty(samples, dtype=np.uint64)  # ~|w| of active samples: largest = smallest |w|
    wmag = np.empty(samples, dtype=np.uint64)
    pmag = np.empty(samples, dtype=np.uint64)
    active = np.empty(samples, dtype=np.bool_)
    na = 0
    for t in range(samples):
        i = min((t // run) * gap + (gap - run) // 2, n - run) + t % run
        wmag[t] = np.uint64(wbits[i]) & wmask
        pmag[t] = np.uint64(pbits[i]) & pmask
        active[t] = mask[i]
        if mask[i]:
            wkey[na] = ~wmag[t]
            na += 1
    if r == 0:
        plo, phi, cut = np.uint64(0), np.uint64(0), np.uint64(0)
    elif r == nnz:
        plo, phi, cut = top, top, top
    else:
        rank = r * samples / n
        spread = _spread(rank, samples, sigmas, slack)
        low, low_found, high, high_found = _rank_interval(wkey, na, rank, spread)
        plo = ~low if low_found else np.uint64(0)
        phi = (~high) + np.uint64(1) if high_found else top
        mid, mid_found, _, _ = _rank_interval(wkey, na, rank, 0.0)
        cut = (~mid) + np.uint64(1) if mid_found else top
    gkey = np.empty(samples, dtype=np.uint64)
    nc = 0
    for t in range(samples):
        if not active[t] or wmag[t] < cut:
            gkey[nc] = pmag[t]
            nc += 1
    if g == 0:
        glo, ghi = top, top
    elif g == n - (nnz - r):
        glo, ghi = np.uint64(0), np.uint64(0)
    else:
        rank = g * samples / n
        spread = _spread(rank, samples, sigmas, slack)
        high, high_found, low, low_found = _rank_interval(gkey, nc, rank, spread)
        ghi = high + np.uint64(1) if high_found else top
        glo = low if low_found else np.uint64(0)
    if n >= dense_min and (0 < r < nnz or 0 < g < n - (nnz - r)):
        plo, phi, glo, ghi = _refine_bounds(
            wbits, pbits, mask, nnz, r, g, wmask, pmask, sigmas, slack, cut, plo, phi, glo, ghi
        )
    return plo, phi, glo, ghi


@_jit(nogil=True)
def _refine_bounds(
    wbits, pbits, mask, nnz, r, g, wmask, pmask, sigmas, slack, cut, plo, phi, glo, ghi
):  # pragma: no cover - jitted
    """Narrow the sampled intervals with a 16 times denser sample (n/32 positions in runs of 64,
    whole cache lines): only its values inside the first intervals are kept and ranked,
    counting those below (prune) or above (growth) them. A side whose refined rank falls outside
    the kept values keeps its first bound."""
    n = wbits.size
    run = min(64, n)
    gap = max(run, min(run * DENSE_RATE, n // 8))  # small layers (tests): denser still
    room = (n // gap + 1) * run + 1  # every sample, and one more for the branch-free writes
    kept_w = np.empty(room, dtype=np.uint64)
    kept_p = np.empty(room, dtype=np.uint64)
    active = below = nw = cands = above = npk = np.uint64(0)
    one = np.uint64(1)
    first = (gap - run) // 2
    runs = (n - run - first) // gap + 1 if n - run >= first else 0
    for r0 in range(0, runs, LANES):
        lanes = min(LANES, runs - r0)
        for j in range(run):
            # LANES runs in lockstep: their cache misses overlap instead of queueing
            for q in range(lanes):
                i = first + (r0 + q) * gap + j
                wm = np.uint64(wbits[i]) & wmask
                pm = np.uint64(pbits[i]) & pmask
                m = np.uint64(mask[i])
                active += m
                below += m & np.uint64(wm < plo)
                kept_w[nw] = ~wm  # largest key = smallest |w|; written always, kept if counted
                nw += m & np.uint64(wm >= plo) & np.uint64(wm < phi)
                c = (m ^ one) | np.uint64(wm < cut)
                cands += c
                above += c & np.uint64(pm >= ghi)
                kept_p[npk] = pm
                npk += c & np.uint64(pm >= glo) & np.uint64(pm < ghi)
    if 0 < r < nnz and active > 0:
        rank = r * active / nnz
        spread = _spread(rank, active, sigmas, slack)
        low, low_found, high, high_found = _rank_interval(
            kept_w, np.int64(nw), rank - below, spread
        )
        if low_found:
            plo = ~low
        if high_found:
            phi = (~high) + np.uint64(1)
    free = n - (nnz - r)
    if 0 < g < free and cands > 0:
        rank = g * cands / free
        spread = _spread(rank, cands, sigmas, slack)
        high, high_found, low, low_found = _rank_interval(
            kept_p, np.int64(npk), rank - above, spread
        )
        if high_found:
            ghi = high + np.uint64(1)
        if low_found:
            glo = low
    return plo, phi, glo, ghi


@_jit(nogil=True)
def _finish_ties_at(keys, idx, n, need, prefix, positions, out):  # pragma: no cover - jitted
    """:func:`_finish_ties` for candidates given by indices ``idx`` into ``positions``."""
    if need >= n:
        for t in range(n):
            out[idx[t]] = True
        return
    if need <= 0:
        return
    for t in range(n):
        keys[t] = _hash(positions[idx[t]], prefix)
    n, need = _narrow(keys, idx, n, need, 32, out)
    for t in range(min(need, n)):  # equal hashes: only beyond 2**32 positions
        out[idx[t]] = True


@_jit(nogil=True)
def _fused_resolve(
    records, prune_need, grow_need, bounds, wwidth, pwidth, prefix, out, wout
):  # pragma: no cover - jitted
    """Settle the undecided positions of one layer (``records`` from :func:`_chunk_decide`):
    first the ``prune_need`` smallest |w| among the prune-undecided, then, with those known, the
    ``grow_need`` largest |p| among the growth candidates left open. Corrects ``out`` (new mask)
    and ``wout`` where pass 2's provisional value was wrong.

    Returns (status, lost, gained) over these positions; status -1 / -2: the prune / growth
    interval missed the boundary (the caller then selects this layer exactly).
    """
    plo, _, glo, ghi, wmask, pmask = bounds  # prune-undecided: the active ones >= plo
    u = records.shape[0]
    positions = records[:, 0].copy()
    idx = np.empty(u, dtype=np.int64)
    keys = np.empty(u, dtype=np.uint64)
    chosen = np.zeros(u, dtype=np.bool_)
    top = np.uint64(63)
    flip = (np.uint64(1) << np.uint64(wwidth)) - np.uint64(1) if wwidth < 64 else ~np.uint64(0)
    n = 0
    for t in range(u):
        if (records[t, 2] >> top) and (records[t, 1] & wmask) >= plo:
            idx[n] = t
            keys[n] = (records[t, 1] & wmask) ^ flip  # smallest |w| first
            n += 1
    if not 0 <= prune_need <= n:
        return -1, 0, 0
    n, need = _narrow(keys, idx, n, prune_need, wwidth, chosen)
    _finish_ties_at(keys, idx, n, need, prefix, positions, chosen)  # chosen: the pruned
    state = np.empty(u, dtype=np.uint8)  # 0 inactive, 1 active, 2 growth still open
    n = 0
    for t in range(u):
        m = (records[t, 2] >> top) != np.uint64(0)
        candidate = (not m) or (records[t, 1] & wmask) < plo or chosen[t]
        chosen[t] = False
        state[t] = 0
        if not candidate:
            state[t] = 1
        else:
            pm = records[t, 2] & pmask
            if pm >= ghi:
                state[t] = 1
                grow_need -= 1
            elif pm >= glo:
                state[t] = 2
                idx[n] = t
                keys[n] = pm
                n += 1
    if not 0 <= grow_need <= n:
        return -2, 0, 0
    n, need = _narrow(keys, idx, n, grow_need, pwidth, chosen)
    _finish_ties_at(keys, idx, n, need, prefix, positions, chosen)
    lost = 0
    gained = 0
    for t in range(u):
        i = np.int64(positions[t])
        m = (records[t, 2] >> top) != np.uint64(0)
        now = state[t] == 1 or (state[t] == 2 and chosen[t])
        provisional = m and (records[t, 1] & wmask) >= plo  # pass 2 kept it for now
        if now != provisional:  # touch the layer only where the provisional value was wrong
            out[i] = now
            if m:
                wout[i] = records[t, 1] & (np.uint64(0) - np.uint64(now))
        lost += m and not now
        gained += now and not m
    return 0, lost, gained


# -- host side ------------------------------------------------------------------------------------

_UINT_OF_SIZE = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_EXPONENT_MASK = {2: 0x7C00, 4: 0x7F800000, 8: 0x7FF0000000000000}
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _forget_pool() -> None:
    """A forked child inherits the pool object but not its threads: start a new one there."""
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _spans(n: int, min_chunk: int = MIN_CHUNK) -> list[tuple[int, int]]:
    """Contiguous chunks of ``range(n)``: one per ``min_chunk`` elements, at most one per thread."""
    parts = max(1, min(numba.get_num_threads(), n // max(1, min_chunk)))
    cuts = [0, *(c * n // parts // 64 * 64 for c in range(1, parts)), n]  # 64-byte aligned
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a] or [(0, n)]


def _run(
    kernel: Callable[..., Any],
    spans: list[tuple[int, int]],
    *args: Any,
    per_span: list[Any] | None = None,
) -> list[Any]:
    """``kernel(*args, [per_span[c],] start, stop)`` for every span ``c``, in parallel if several.

    A plain thread pool rather than ``prange``: the kernels release the GIL, a pool hands out a
    pass for tens of microseconds, and the kernels stay simple loops the compiler vectorises. On
    the shared 2-core machine this was measured against ``prange`` under Numba's default OpenMP
    layer, whose parallel regions cost milliseconds each while other processes held the cores.
    The pool has as many workers as chunks, at most ``numba.get_num_threads()``.
    """
    calls = [
        (*args, *(() if per_span is None else (per_span[c],)), start, stop)
        for c, (start, stop) in enumerate(spans)
    ]
    if len(calls) == 1:
        return [kernel(*calls[0])]
    pool = _pool_for(len(calls))
    futures = [pool.submit(kernel, *call) for call in calls]
    return [f.result() for f in futures]


def _pool_for(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size < workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sparsecore")
        _pool_size = workers
    return _pool


def _bins(sizes: Sequence[int], threads: int) -> list[list[int]]:
    """Indices of ``sizes`` split into at most ``threads`` groups of about equal total size
    (largest first, each to the lightest group so far), each group in ascending index order."""
    loads = [0] * max(1, threads)
    groups: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        lightest = loads.index(min(loads))
        loads[lightest] += sizes[i]
        groups[lightest].append(i)
    return [sorted(g) for g in groups if g]


def _map_layers(work: Callable[[int], Any], sizes: Sequence[int]) -> list[Any]:
    """``[work(i) for i in range(len(sizes))]``, whole layers spread over the threads.

    For the per-layer steps that run on one thread (the sampled bounds, the resolution, and
    every pass of a small layer): most of ResNet-50's layers are too small to split, so on
    their own these steps would leave the other cores idle. One task per thread, each a group
    of layers of about equal total size; ``work`` must not use the pool itself.
    """
    groups = _bins(sizes, numba.get_num_threads())
    if len(groups) <= 1:
        return [work(i) for i in range(len(sizes))]
    pool = _pool_for(len(groups))
    futures = [pool.submit(lambda g: [(i, work(i)) for i in g], g) for g in groups]
    out: list[Any] = [None] * len(sizes)
    for f in futures:
        for i, result in f.result():
            out[i] = result
    return out


def _flat(x: Any) -> np.ndarray:
    """``x`` as a flat C-order array the kernels can read as raw bits.

    Strided, Fortran-order and 0-d inputs are copied to C order (``ascontiguousarray``), floats
    in the other byte order are converted to the native one (the kernels read raw bits, which
    would be byte-swapped otherwise), and read-only arrays are copied, so that one compiled
    specialisation per dtype serves every input. Boolean masks need nothing: the kernels read
    any nonzero byte as True, as NumPy does.
    """
    a = np.ascontiguousarray(x)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    elif not a.flags.writeable:
        a = a.copy()
    return a.reshape(-1)


def rank_params(
    dtype: np.dtype, *, among_active: bool, largest: bool, magnitude: bool, sign: Sign
) -> tuple[np.uint64, ...] | None:
    """The constants of the branch-free rank key and candidate test, or None if unsupported.

    Floats and unsigned integers are supported; other dtypes use the NumPy reference.
    """
    if dtype.kind not in "fu" or dtype.itemsize not in _UINT_OF_SIZE:
        return None
    width = 8 * dtype.itemsize
    top = 1 << (width - 1)
    full = (1 << width) - 1
    is_float = dtype.kind == "f"
    signed = is_float and not magnitude
    values = {
        _AMONG: int(bool(among_active)),
        _ANY: int(sign == "any"),
        _WANT_POS: int(sign == "positive"),
        _POS_SIGN: top if is_float else 0,  # unsigned values are positive when non-zero
        _MAG: top - 1 if is_float else full,
        _BASE: top if signed else 0,
        _SIGNED: (1 << 64) - 1 if signed else 0,
        _FLIP: 0 if largest else full,
        _SIGN_SHIFT: width - 1,
    }
    return tuple(np.uint64(values[i]) for i in range(len(values)))


def select_flat(
    x: np.ndarray,
    mask: np.ndarray,
    k: int,
    *,
    among_active: bool,
    largest: bool,
    magnitude: bool,
    key: HashKey,
    sign: Sign = "any",
    sampled: bool = True,
    small_layer: int = SMALL_LAYER,
    min_chunk: int = MIN_CHUNK,
) -> np.ndarray:
    """Flat boolean selection: :meth:`NumbaBackend.select` before reshaping.

    ``sampled=False`` goes straight to the guaranteed histogram path, which is otherwise taken
    only when the sampled interval misses; layers of at most ``small_layer`` elements are
    gathered whole; ``min_chunk`` is the least work per thread. Tests vary all three to reach
    every path on small arrays.
    """
    flat = _flat(x)
    flat_mask = _flat(mask)
    n = flat.size
    p = rank_params(
        flat.dtype, among_active=among_active, largest=largest, magnitude=magnitude, sign=sign
    )
    if p is None:
        chosen = NumpyBackend().select(
            flat, flat_mask, k, among_active=among_active, largest=largest,
            magnitude=magnitude, key=key, sign=sign,
        )  # fmt: skip
        return np.asarray(chosen)
    bits = flat.view(_UINT_OF_SIZE[flat.dtype.itemsize])
    width = 8 * flat.dtype.itemsize
    prefix = np.uint64(key.prefix())
    if k <= 0:
        return np.zeros(n, dtype=bool)
    if n <= small_layer and sampled:
        return _select_small(bits, flat_mask, p, k, width, prefix)
    out = np.empty(n, dtype=bool)
    spans = _spans(n, min_chunk)
    if sampled:
        samples = min(max(n >> SAMPLE_SHIFT, MIN_SAMPLES), MAX_SAMPLES, n)
        lo, hi = _sample_bounds(bits, flat_mask, p, k, samples)
        flags = out.view(np.uint8)
        counts = _run(
            _chunk_threshold, spans, bits, flat_mask, p, np.uint64(lo), np.uint64(hi), flags
        )
        above = sum(int(c[0]) for c in counts)
        in_range = sum(int(c[1]) for c in counts)
        if above <= k <= above + in_range:
            window = _gather_flagged(flags, 2, in_range, counts, spans)
            out[window] = False
            _resolve(bits, window, k - above, p, width, prefix, out)
            return out
    return _select_by_histogram(bits, flat_mask, p, k, width, prefix, spans, out)


def _gather_flagged(
    flags: np.ndarray,
    value: int,
    total: int,
    counts: list[Any],
    spans: list[tuple[int, int]],
) -> np.ndarray:
    """Ascending positions whose flag byte is ``value``; ``counts[c][1]`` of them in span c."""
    window = np.empty(total, dtype=np.int64)
    offsets = np.cumsum([0] + [int(c[1]) for c in counts])
    views = [window[offsets[c] : offsets[c + 1]] for c in range(len(spans))]
    _run(_chunk_flagged, spans, flags, np.uint8(value), per_span=views)
    return window


def _select_by_histogram(
    bits: np.ndarray,
    mask: np.ndarray,
    p: tuple[np.uint64, ...],
    k: int,
    width: int,
    prefix: np.uint64,
    spans: list[tuple[int, int]],
    out: np.ndarray,
) -> np.ndarray:
    """The guaranteed path (two full passes): used when the sampled interval missed."""
    shift = np.uint64(width - DIGIT_BITS)
    hist = np.empty((len(spans), 1 << DIGIT_BITS), dtype=np.int64)
    _run(_chunk_histogram, spans, bits, mask, p, shift, per_span=list(hist))
    candidates, boundary, need, at_boundary, offsets = _boundary(hist, k)
    if k >= candidates:
        _run(_chunk_candidates, spans, bits, mask, p, out)
        return out
    take_all = bool(need == at_boundary)
    gathered = np.empty(0 if take_all else at_boundary, dtype=np.int64)
    views = [
        gathered[offsets[c] : offsets[c] + (0 if take_all else hist[c, boundary])]
        for c in range(len(spans))
    ]
    _run(
        _chunk_mark_and_gather, spans, bits, mask, p, shift, boundary, take_all, out,
        per_span=views,
    )  # fmt: skip
    if not take_all:
        _resolve(bits, gathered, need, p, int(shift), prefix, out)
    return out


class BufferPool:
    """Output arrays of the fused update, reused once nothing outside the pool refers to them.

    Every update returns new masks and weights. Fresh memory is expensive (the first touch of
    each page faults, which cost a fused update about as much as its two passes), and a
    training loop drops the previous update's arrays when it takes the new ones; so the pool
    keeps them and hands one back out only when its reference count shows that the pool alone
    holds it (the caller's arrays are views of it, which keep it referenced while alive). It
    holds at most what the last two updates returned. Safe under threads (a lock).
    """

    def __init__(self) -> None:
        self._arrays: dict[tuple[int, str], list[np.ndarray]] = {}
        self._taken: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()

    def take(self, size: int, dtype: np.dtype) -> np.ndarray:
        """A flat array of ``size`` elements of ``dtype`` that nobody else holds."""
        key = (size, dtype.str)
        with self._lock:
            self._taken[key] = self._taken.get(key, 0) + 1
            arrays = self._arrays.setdefault(key, [])
            for i in range(len(arrays)):
                if sys.getrefcount(arrays[i]) <= 2:  # the list's and getrefcount's own
                    array = arrays.pop(i)
                    arrays.append(array)  # most recently taken last
                    return array
            array = np.empty(size, dtype=dtype)
            arrays.append(array)
            return array

    @contextlib.contextmanager
    def update(self) -> Iterator[None]:
        """Around one update: afterwards, keep per kind at most twice what it took."""
        with self._lock:
            self._taken.clear()
        try:
            yield
        finally:
            with self._lock:
                for key, arrays in list(self._arrays.items()):
                    keep = 2 * self._taken.get(key, 0)
                    if keep == 0:
                        del self._arrays[key]
                    elif len(arrays) > keep:
                        del arrays[: len(arrays) - keep]  # the least recently taken go


def _fused_dtype(layer: Layer) -> bool:
    """Do the fused kernels take this layer (float16/32/64 weight and momentum; :func:`_flat`
    brings either byte order to the native one)?"""
    return all(
        isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.dtype.itemsize in _EXPONENT_MASK
        for x in (layer.weight, layer.momentum)
    )


@_jit()
def _units_nonzero(x, out):  # pragma: no cover - jitted
    """``out[u]``: does ``x[:, u, :]`` (a C-contiguous (pre, units, post) array) hold a non-zero
    entry? Each unit's scan stops at its first one, and the whole scan once every unit has one."""
    pre, units, post = x.shape
    left = units
    for p in range(pre):
        for u in range(units):
            if out[u]:
                continue
            for q in range(post):
                if x[p, u, q] != 0:
                    out[u] = True
                    left -= 1
                    break
        if left == 0:
            return


class NumbaBackend(NumpyBackend):
    """NumPy arrays, with every full-layer pass compiled, fused and run on all cores.

    It inherits the NumPy reference for the cheap operations (shapes, counts, per-unit sums) and
    replaces the passes that dominate an update: selection, masked sums, finiteness checks,
    hashing and applying masks. ``owns`` still answers for plain arrays (the engine checks layers
    with it), but :func:`~sparsecore.backend.backend_for` gives NumPy arrays to the NumPy backend:
    this one is chosen by name.
    """

    name = "numba"

    def __init__(
        self,
        *,
        sampled: bool = True,
        small_layer: int = SMALL_LAYER,
        min_chunk: int = MIN_CHUNK,
        fused: bool = True,
        spread: tuple[float, float] = (SPREAD, 2.0),
        dense_min: int = DENSE_MIN,
        parallel_min: int = PARALLEL_MIN,
    ) -> None:
        """The defaults are the fast choices; the options exist to test every path.

        ``fused=False`` withdraws the fused-update capability (the engine then runs the generic
        update on this backend's operations); ``spread`` is the half-width of the fused path's
        sampled intervals, (standard deviations, extra ranks): a narrow one forces its fallback;
        layers of at least ``dense_min`` weights refine the intervals on a denser sample.
        ``sampled=False`` makes the fused path leave every candidate undecided. A fused update
        of fewer than ``parallel_min`` weights in all runs on the calling thread alone.
        """
        super().__init__()
        self.sampled = sampled
        self.small_layer = small_layer
        self.min_chunk = min_chunk
        self.parallel_min = parallel_min
        self.supports_fused_update = fused
        self._buffers = BufferPool()
        self._scratch = threading.local()
        self.spread = spread
        self.dense_min = dense_min
        # How often each way through the fused update ran: tests use it to see every branch.
        self.fused_paths: dict[str, int] = dict.fromkeys(
            ("decided", "resolved", "prune_miss", "grow_miss"), 0
        )

    # -- the fused update -------------------------------------------------------------------
    def fused_scan(self, layers: Sequence[Layer], *, source: str | None) -> list[LayerScan] | None:
        if not all(_fused_dtype(layer) for layer in layers):
            return None

        def scan(i: int, split: bool) -> LayerScan:
            layer = layers[i]
            mask = _flat(layer.mask)
            nnz, active, total, finite = self._scan(_flat(layer.momentum), mask, split)
            if source == "weight":
                nnz, active, total, weight_finite = self._scan(_flat(layer.weight), mask, split)
                finite = finite and weight_finite
            elif source is None:
                active = total = 0.0
            return LayerScan(nnz, active, total, finite)

        return self._per_layer(scan, layers)

    def _per_layer(self, work: Callable[[int, bool], Any], layers: Sequence[Layer]) -> list[Any]:
        """``[work(i, split) for each layer i]``: a layer holding more than a 2 * threads-th
        of all weights is split into chunks run on every thread (``split=True``), one after
        another; the others go whole, grouped, to the threads at once (:func:`_map_layers`).
        Fewer than ``parallel_min`` weights in all: every layer whole, on this thread."""
        sizes = [int(np.size(layer.mask)) for layer in layers]
        if sum(sizes) < self.parallel_min:
            return [work(i, False) for i in range(len(layers))]
        big = sum(sizes) // (2 * numba.get_num_threads())
        out: list[Any] = [None] * len(layers)
        small = [i for i, n in enumerate(sizes) if n <= big]
        for i, n in enumerate(sizes):
            if n > big:
                out[i] = work(i, True)
        for i, result in zip(
            small, _map_layers(lambda j: work(small[j], False), [sizes[i] for i in small])
        ):
            out[i] = result
        return out

    def _scan(
        self, x: np.ndarray, mask: np.ndarray, split: bool = True
    ) -> tuple[int, float, float, bool]:
        """Pass 1 over one array: nnz, the two float64 |x| sums, and whether all are finite."""
        spans = _spans(x.size, self.min_chunk) if split else [(0, x.size)]
        if x.dtype == np.float16:
            parts = _run(_chunk_scan_half, spans, x.view(np.uint16), mask)
        else:
            parts = _run(_chunk_scan, spans, x, mask)
        nnz = sum(int(c[0]) for c in parts)
        active = float(sum(c[1] for c in parts))
        total = float(sum(c[2] for c in parts))
        finite = all(int(c[3]) == 0 for c in parts) and bool(np.isfinite(total))
        return nnz, active, total, finite

    def fused_prune_regrow(
        self,
        layers: Sequence[Layer],
        nnz: Sequence[int],
        prune_counts: Sequence[int],
        grow_counts: Sequence[int],
        keys: Sequence[HashKey],
    ) -> list[FusedLayer] | None:
        with self._buffers.update():

            def decide(i: int, split: bool) -> tuple[Any, ...] | None:
                return self._fused_layer(
                    layers[i], int(nnz[i]), int(prune_counts[i]), int(grow_counts[i]), keys[i],
                    split,
                )  # fmt: skip

            decided = self._per_layer(decide, layers)
            if any(d is None for d in decided):
                return None
            out = []
            # The counters and the exact fallback (which uses every thread) run here, after.
            for layer, d, r, g, key in zip(layers, decided, prune_counts, grow_counts, keys):
                assert d is not None
                path, lost, gained, new_mask, new_weight = d
                self.fused_paths[path] += 1
                if path in ("prune_miss", "grow_miss"):  # select this layer exactly
                    w, p, mask = _flat(layer.weight), _flat(layer.momentum), _flat(layer.mask)
                    lost, gained = self._select_layer(
                        w, p, mask, int(r), int(g), key, new_mask, new_weight
                    )
                shape = np.shape(layer.mask)
                out.append(
                    FusedLayer(new_mask.reshape(shape), new_weight.reshape(shape), lost, gained)
                )
        return out

    def _fused_layer(
        self, layer: Layer, nnz: int, r: int, g: int, key: HashKey, split: bool = True
    ) -> tuple[Any, ...] | None:
        """Pass 2 and the resolution for one layer: (path, lost, gained, new mask, new weights);
        None if a weight is NaN or Inf.
        Path: ``fused_paths``' name for the way taken; on ``prune_miss`` / ``grow_miss`` the
        sampled interval missed and the caller selects the layer exactly. ``split``: pass 2 in
        chunks on every thread (else this thread alone: it may be a pool thread)."""
        w, p, mask = _flat(layer.weight), _flat(layer.momentum), _flat(layer.mask)
        n = w.size
        wbits = w.view(_UINT_OF_SIZE[w.dtype.itemsize])
        pbits = p.view(_UINT_OF_SIZE[p.dtype.itemsize])
        wmask = np.uint64((1 << (8 * w.dtype.itemsize - 1)) - 1)
        pmask = np.uint64((1 << (8 * p.dtype.itemsize - 1)) - 1)
        if self.sampled:
            # a layer that refines its intervals needs only a rough first guess
            shift = SAMPLE_SHIFT + (2 if n >= self.dense_min else 0)
            samples = min(max(n >> shift, MIN_SAMPLES), MAX_SAMPLES, n)
            sigmas, slack = self.spread
            intervals = _fused_bounds(
                wbits, pbits, mask, nnz, r, g, samples, wmask, pmask, float(sigmas),
                float(slack), self.dense_min,
            )  # fmt: skip
        else:  # everything open: the resolution decides every candidate
            intervals = (np.uint64(0), np.uint64(_TOP), np.uint64(0), np.uint64(_TOP))
        bounds = (*(np.uint64(b) for b in intervals), wmask, pmask)
        new_mask = self._buffers.take(n, np.dtype(bool))
        new_weight = self._buffers.take(n, w.dtype)
        new_bits = new_weight.view(wbits.dtype)
        spans = _spans(n, self.min_chunk) if split else [(0, n)]
        records = self._records(n)
        parts = [records[start:stop] for start, stop in spans]
        counts = _run(
            _chunk_decide, spans, wbits, pbits, mask, bounds, new_mask.view(np.uint8),
            new_bits, per_span=parts,
        )  # fmt: skip
        if max(int(c[6]) for c in counts) >= _EXPONENT_MASK[w.dtype.itemsize]:
            return None
        pdef, pund, gdef, gund, lost, gained = (sum(int(c[j]) for c in counts) for j in range(6))
        status = 0 if pdef <= r <= pdef + pund else -1
        if status == 0 and pund + gund:
            used = [part[: int(c[7])] for part, c in zip(parts, counts)]
            undecided = used[0] if len(used) == 1 else np.concatenate(used)
            status, more_lost, more_gained = _fused_resolve(
                undecided, r - pdef, g - gdef, bounds, 8 * w.dtype.itemsize,
                8 * p.dtype.itemsize, np.uint64(key.prefix()), new_mask, new_bits,
            )  # fmt: skip
            lost += int(more_lost)
            gained += int(more_gained)
            path = "resolved"
        else:  # nothing left open: the sure counts must be exact
            path = "decided"
            if status == 0 and gdef != g:
                status = -2
        if status != 0:
            path = "prune_miss" if status == -1 else "grow_miss"
        return path, lost, gained, new_mask, new_weight

    def _records(self, n: int) -> np.ndarray:
        """Scratch room for ``n`` undecided positions, kept per thread between layers and
        updates: only its first pages are ever touched, and touching fresh pages is slow."""
        scratch = getattr(self._scratch, "records", None)
        if scratch is None or scratch.shape[0] < n:
            scratch = np.empty((n, 3), dtype=np.uint64)
            self._scratch.records = scratch
        return scratch[:n]

    def _select_layer(
        self,
        w: np.ndarray,
        p: np.ndarray,
        mask: np.ndarray,
        r: int,
        g: int,
        key: HashKey,
        new_mask: np.ndarray,
        new_weight: np.ndarray,
    ) -> tuple[int, int]:
        """The fused path's fallback: prune, then regrow, by two exact selections."""
        options: dict[str, Any] = dict(
            magnitude=True, key=key, sampled=self.sampled, small_layer=self.small_layer,
            min_chunk=self.min_chunk,
        )  # fmt: skip
        pruned = select_flat(w, mask, r, among_active=True, largest=False, **options)
        kept = mask & ~pruned
        grown = select_flat(p, kept, g, among_active=False, largest=True, **options)
        np.logical_or(kept, grown, out=new_mask)
        new_weight[...] = self.apply(w, mask, new_mask)
        return int(np.count_nonzero(mask & ~new_mask)), int(np.count_nonzero(new_mask & ~mask))

    def all_finite(self, x: Any) -> bool:
        flat = _flat(x)
        if flat.dtype.kind != "f" or flat.dtype.itemsize not in _EXPONENT_MASK:
            return bool(super().all_finite(x))
        if flat.size == 0:
            return True
        size = flat.dtype.itemsize
        bits = flat.view(_UINT_OF_SIZE[size])
        sign_clear = _UINT_OF_SIZE[size]((1 << (8 * size - 1)) - 1)
        largest = max(
            _run(_chunk_max_magnitude, _spans(bits.size, self.min_chunk), bits, sign_clear)
        )
        return int(largest) < _EXPONENT_MASK[size]

    def count_positive(self, x: Any, mask: Any) -> int:
        flat = _flat(x)
        p = rank_params(
            flat.dtype, among_active=True, largest=True, magnitude=False, sign="positive"
        )
        if p is None:
            return super().count_positive(x, mask)
        bits = flat.view(_UINT_OF_SIZE[flat.dtype.itemsize])
        none = np.empty(0, dtype=bool)
        counts = _run(
            _chunk_candidates, _spans(bits.size, self.min_chunk), bits, _flat(mask), p, none
        )
        return sum(int(c) for c in counts)

    def abs_sum(self, x: Any, mask: Any | None) -> float:
        flat = _flat(x)
        flat_mask = np.empty(0, dtype=bool) if mask is None else _flat(mask)
        spans = _spans(flat.size, self.min_chunk)
        use_mask = mask is not None
        if flat.dtype == np.float16:
            parts = _run(_chunk_abs_sum_half, spans, flat.view(np.uint16), flat_mask, use_mask)
        elif flat.dtype in (np.float32, np.float64):
            parts = _run(_chunk_abs_sum, spans, flat, flat_mask, use_mask)
        else:
            return super().abs_sum(x, mask)
        return float(sum(parts))

    def select(
        self,
        x: Any,
        mask: Any,
        k: int,
        *,
        among_active: bool,
        largest: bool,
        magnitude: bool,
        key: HashKey,
        sign: Sign = "any",
    ) -> Any:
        out = select_flat(
            x,
            mask,
            int(k),
            among_active=bool(among_active),
            largest=bool(largest),
            magnitude=bool(magnitude),
            key=key,
            sign=sign,
            sampled=self.sampled,
            small_layer=self.small_layer,
            min_chunk=self.min_chunk,
        )
        return out.reshape(np.shape(x))

    def select_per_unit(
        self,
        x: Any,
        mask: Any,
        ks: np.ndarray,
        *,
        axis: int,
        among_active: bool,
        largest: bool,
        magnitude: bool,
        key: HashKey,
    ) -> Any:
        flat = _flat(x)
        p = rank_params(
            flat.dtype, among_active=among_active, largest=largest, magnitude=magnitude, sign="any"
        )
        if p is None:
            return super().select_per_unit(
                x, mask, ks, axis=axis, among_active=among_active, largest=largest,
                magnitude=magnitude, key=key,
            )  # fmt: skip
        shape = tuple(np.shape(x))
        axis = axis % len(shape)
        outer = int(np.prod(shape[:axis], dtype=np.int64))
        inner = int(np.prod(shape[axis + 1 :], dtype=np.int64))
        out = np.zeros(flat.size, dtype=bool)
        _select_units(  # one thread: per-unit growth is a rarely used mode
            flat.view(_UINT_OF_SIZE[flat.dtype.itemsize]),
            _flat(mask),
            p,
            np.asarray(ks, dtype=np.int64),
            outer,
            inner,
            8 * flat.dtype.itemsize,
            np.uint64(key.prefix()),
            out,
        )
        return out.reshape(shape)

    def unit_nonzero(self, x: Any, axis: int) -> np.ndarray:
        if not (
            isinstance(x, np.ndarray)
            and x.flags.c_contiguous
            and x.dtype.isnative
            and (x.dtype == np.bool_ or (x.dtype.kind == "f" and x.dtype.itemsize in (2, 4, 8)))
        ):
            return super().unit_nonzero(x, axis)
        shape = x.shape
        axis %= len(shape)
        pre = int(np.prod(shape[:axis], dtype=np.int64))
        post = int(np.prod(shape[axis + 1 :], dtype=np.int64))
        values = x.view(np.uint8) if x.dtype == np.bool_ else x
        if values.dtype.kind == "f" and values.dtype.itemsize == 2:  # float16: compare the bits
            values = values.view(np.uint16) & np.uint16(0x7FFF)  # -0.0 is zero too
        out = np.zeros(shape[axis], dtype=bool)
        _units_nonzero(values.reshape(pre, shape[axis], post), out)
        return out

    def position_hash(self, key: HashKey, like: Any) -> Any:
        shape = tuple(np.shape(like))
        out = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=np.uint32)
        _run(_chunk_hash, _spans(out.size, self.min_chunk), np.uint64(key.prefix()), out)
        return out.reshape(shape)

    def and_not(self, a: Any, b: Any) -> Any:
        out = np.empty(np.shape(a), dtype=bool)
        _run(_chunk_and_not, _spans(out.size, self.min_chunk), _flat(a), _flat(b), out.reshape(-1))
        return out

    def apply(self, weight: Any, old_mask: Any, new_mask: Any) -> Any:
        flat = _flat(weight)
        if flat.dtype.itemsize not in _UINT_OF_SIZE or flat.dtype.kind != "f":
            return super().apply(weight, old_mask, new_mask)
        out = np.empty_like(flat)
        uint = _UINT_OF_SIZE[flat.dtype.itemsize]
        spans = _spans(flat.size, self.min_chunk)
        _run(_chunk_apply, spans, flat.view(uint), _flat(old_mask), _flat(new_mask), out.view(uint))
        return out.reshape(np.shape(weight))


def warm_up() -> None:
    """Compile (or load from the cache) the float32 kernels, e.g. before timing a first update."""
    backend = NumbaBackend()
    rng = np.random.default_rng(0)
    key = HashKey(0, 1, 0)
    for n in (64, SMALL_LAYER + 1):
        x = rng.standard_normal(n).astype(np.float32)
        mask = x > 0.5
        for largest in (False, True):
            backend.select(
                x, mask, 3, among_active=largest, largest=largest, magnitude=True, key=key
            )
        select_flat(
            x, mask, 3, among_active=True, largest=False, magnitude=True, key=key, sampled=False
        )
    backend.abs_sum(x, mask)
    backend.all_finite(x)
    backend.apply(x, mask, mask)
    backend.and_not(mask, mask)
    from .engine import update  # the fused update's kernels (the engine imports this module lazily)

    layer = Layer("warm_up", x * mask, mask, x[::-1].copy())
    update([layer], prune_rate=0.5, backend=backend)
