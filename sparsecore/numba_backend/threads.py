"""Running compiled passes on all cores: contiguous chunks per thread, whole layers per thread.

The kernels release the GIL, so a small thread pool runs them side by side (:func:`_run` says why
not ``prange``). A forked child starts its own pool.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba

from .bits import MIN_CHUNK

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
