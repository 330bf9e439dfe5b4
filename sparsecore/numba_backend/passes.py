"""Compiled full-layer passes: thresholds, histograms, sums, finiteness, hashing, applying masks.

Each works on the chunk ``[start, stop)`` of flat arrays (:func:`.threads._run` hands out the
chunks).
"""

from __future__ import annotations

import numpy as np

from .bits import _REASSOC, _candidate, _half_abs, _hash, _jit, _key

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
