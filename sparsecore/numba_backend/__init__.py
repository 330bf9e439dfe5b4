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

The package is split by concern: :mod:`.bits` (raw bits, rank keys, the hash, tuning constants),
:mod:`.threads` (the pool and how work is cut), :mod:`.passes` (full-layer passes),
:mod:`.selection` (the selection above), :mod:`.fused` (the engine's fused prune-and-regrow
kernels and their output buffers), :mod:`.backend` (the :class:`NumbaBackend` class) and
:mod:`.warm_up`.
"""

from .backend import NumbaBackend
from .bits import rank_params
from .fused import BufferPool
from .selection import select_flat
from .warm_up import warm_up

__all__ = ["BufferPool", "NumbaBackend", "rank_params", "select_flat", "warm_up"]
