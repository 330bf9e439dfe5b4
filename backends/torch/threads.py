"""One thread count for PyTorch and Numba, so that their pools never add up to more than the cores.

Starting Numba's threading layer (its first ``numba.get_num_threads()``) resets the process-wide
OpenMP thread count, which is also PyTorch's intra-op count: a process that had called
``torch.set_num_threads(1)`` would find PyTorch on every core afterwards. Everything in the torch
adapter that runs Numba code (the sparse CPU kernels, mask updates through the Numba backend)
calls :func:`kernel_threads` first.
"""

from __future__ import annotations


def kernel_threads() -> int:
    """Thread count for Numba code: PyTorch's intra-op count, within Numba's pool.

    PyTorch's setting is read first and put back if starting Numba's pool changed it. Numba is
    imported here, on first use, so that importing the adapter does not load it.
    """
    import numba
    import torch

    want = torch.get_num_threads()
    n = max(1, min(want, int(getattr(numba.config, "NUMBA_NUM_THREADS", 1))))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return n
