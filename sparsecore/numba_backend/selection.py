"""Selection without sorting: a sampled key interval, one flagging pass, a radix narrowing of
the few undecided candidates, and the position hash for ties (the package docstring explains it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Sign
from ..backend_numpy import NumpyBackend
from ..hashing import HashKey
from .bits import (
    _UINT_OF_SIZE,
    DIGIT_BITS,
    MAX_SAMPLES,
    MIN_CHUNK,
    MIN_SAMPLES,
    SAMPLE_SHIFT,
    SMALL_LAYER,
    SPREAD,
    _candidate,
    _flat,
    _hash,
    _jit,
    _key,
    rank_params,
)
from .passes import (
    _chunk_candidates,
    _chunk_flagged,
    _chunk_histogram,
    _chunk_mark_and_gather,
    _chunk_threshold,
)
from .threads import _run, _spans

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
