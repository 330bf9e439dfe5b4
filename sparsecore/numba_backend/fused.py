"""The engine's fused update in compiled code: two passes per layer and a resolution.

Pass 1 (:func:`_chunk_scan`): nnz and the |x| sums of the importance source in one read.
Pass 2 (:func:`_chunk_decide`): with magnitude intervals from a sample, decide pruning and growth
together for every position, write the new mask and the new weights, and flag the few positions
whose fate depends on the exact k-th value; :func:`_fused_resolve` settles those. Intervals are
half-open bit-pattern ranges of |x| (sign bit cleared): pruning takes |w| < plo for sure and leaves
[plo, phi) open; growth takes |p| >= ghi for sure and leaves [glo, ghi). :class:`BufferPool` keeps
the output arrays between updates.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

import numpy as np

from ..layers import Layer
from .bits import (
    _EXPONENT_MASK,
    _REASSOC,
    DECIDE_BLOCK,
    DENSE_RATE,
    LANES,
    _half_abs,
    _hash,
    _jit,
)
from .selection import _narrow, _rank_interval, _spread

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
