"""The sparse layer kernels of sparsecore (imported as ``sparsecore.kernels``): CPU and CUDA.

- :mod:`~sparsecore.kernels.structures`: the sparse index structures (CSR per output unit or
  channel) that every kernel consumes, built on the host from a mask;
- :mod:`~sparsecore.kernels.cpu`: the CPU kernels (Numba, parallel over cores);
- the CUDA C sources (``*.cu``, ``*.cuh``) with this module, their CuPy loader, and their
  host-side layouts (:mod:`~sparsecore.kernels.layout`, :mod:`~sparsecore.kernels.launch`;
  :mod:`~sparsecore.kernels.emulate` runs the same launches in NumPy for tests without a GPU).

The framework bindings live in the adapters (``sparsecore.torch.sparse_functions`` for the CPU kernels,
``sparsecore.torch.cuda_kernels`` for the CUDA ones).

The sources (``*.cu``, ``*.cuh``) ship inside the package and are compiled at first use with
CuPy's ``RawModule`` (NVRTC), once per device; compiled modules are cached. Kernels launch on a
caller-given stream (PyTorch's current stream in :mod:`sparsecore.torch.cuda_kernels`) and take
arrays exchanged by DLPack, so no data is copied.

Importing this package imports neither Numba (:mod:`~sparsecore.kernels.cpu` does) nor CuPy:
CuPy is imported on the first compile or launch, and :func:`cuda_available` answers False when
CuPy or a GPU is missing.
"""

from __future__ import annotations

import functools
import importlib.resources
import threading
from pathlib import Path
from typing import Any

from .launch import Launch

__all__ = [
    "KERNEL_SOURCES",
    "as_cupy",
    "cuda_available",
    "expanded_source",
    "external_stream",
    "get_function",
    "kernel_names",
    "launch",
    "launch_path",
    "pointer",
    "read_source",
    "source_dir",
    "source_files",
]

#: The translation units, each compiled into one module; headers are included from them.
KERNEL_SOURCES: tuple[str, ...] = ("gather.cu", "sddmm.cu", "tiled.cu")
HEADERS: tuple[str, ...] = ("common.cuh",)

_COMPILE_OPTIONS: tuple[str, ...] = ()
_lock = threading.Lock()
_modules: dict[tuple[int, str], Any] = {}


def source_dir() -> Path:
    """Directory holding the installed kernel sources."""
    root = importlib.resources.files(__name__)
    return Path(str(root))


def source_files() -> list[Path]:
    """Every shipped ``.cu`` and ``.cuh`` file (raises if one is missing from the install)."""
    files = []
    for name in (*KERNEL_SOURCES, *HEADERS):
        path = source_dir() / name
        if not path.is_file():
            raise FileNotFoundError(
                f"CUDA source {name!r} is missing from the installed package at {source_dir()}"
            )
        files.append(path)
    return files


def read_source(name: str) -> str:
    """Text of one shipped source file."""
    return importlib.resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


@functools.cache
def kernel_names(source: str) -> tuple[str, ...]:
    """Names of the ``extern "C" __global__`` kernels a source defines."""
    import re

    text = read_source(source)
    pattern = r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)'
    return tuple(re.findall(pattern, text))


def _source_of(kernel: str) -> str:
    for source in KERNEL_SOURCES:
        if kernel in kernel_names(source):
            return source
    raise KeyError(f"no CUDA kernel named {kernel!r} in {KERNEL_SOURCES}")


@functools.cache
def cuda_available() -> bool:
    """True if CuPy imports and sees at least one CUDA device (asked once per process)."""
    try:
        import cupy
    except Exception:  # ImportError, or a CuPy build that cannot load its CUDA libraries
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def expanded_source(source: str) -> str:
    """Source text with the package's own ``#include "x.cuh"`` lines replaced by the headers.

    CuPy's on-disk compile cache is keyed by the code string, so a header edit must change it.
    """
    lines = []
    for line in read_source(source).splitlines():
        stripped = line.strip()
        if stripped.startswith("#include"):
            name = stripped.split(None, 1)[1].strip().strip('"<>')
            if name in HEADERS:
                header = read_source(name).replace("#pragma once", "")
                lines.append(f"// ---- {name} ----")
                lines.extend(header.splitlines())
                continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def _module(source: str) -> Any:
    import cupy

    device = int(cupy.cuda.runtime.getDevice())
    key = (device, source)
    with _lock:
        module = _modules.get(key)
        if module is None:
            module = cupy.RawModule(code=expanded_source(source), options=_COMPILE_OPTIONS)
            module.compile()
            _modules[key] = module
    return module


_functions: dict[tuple[int, str], Any] = {}
_low_level: dict[tuple[int, str], Any] = {}
_fast_launch = True


def get_function(kernel: str, device: int | None = None) -> Any:
    """The compiled kernel ``kernel`` (a ``cupy.RawKernel``) on ``device`` (default: current)."""
    import cupy

    if device is None:
        device = int(cupy.cuda.runtime.getDevice())
    key = (device, kernel)
    function = _functions.get(key)
    if function is None:
        with cupy.cuda.Device(device):
            function = _module(_source_of(kernel)).get_function(kernel)
        _functions[key] = function
    return function


def as_cupy(array: Any) -> Any:
    """A CuPy view of a DLPack-capable GPU array (a CUDA ``torch.Tensor``, say); no copy."""
    import cupy

    if isinstance(array, cupy.ndarray):
        return array
    return cupy.from_dlpack(array)


def pointer(address: int) -> Any:
    """A raw device address as a kernel argument (passed by value as a 64-bit pointer)."""
    import numpy as np

    return np.uint64(address)


@functools.cache
def _stream(ptr: int, device: int) -> Any:
    import warnings

    import cupy

    with warnings.catch_warnings():
        # CuPy 14 prefers Stream.from_external(obj with __cuda_stream__); a raw handle is what
        # PyTorch gives on every version, and ExternalStream still takes it.
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device)


def external_stream(ptr: int, device: int | None = None) -> Any:
    """A cached CuPy stream object wrapping the raw CUDA stream handle ``ptr`` of ``device``."""
    import cupy

    if device is None:
        device = int(cupy.cuda.runtime.getDevice())
    return _stream(int(ptr), int(device))


def launch(
    plan: Launch, args: tuple[Any, ...], stream: Any = None, device: int | None = None
) -> None:
    """Launch ``plan.kernel`` with ``args`` on ``stream`` (a CuPy stream; None: CuPy's current).

    ``args`` are CuPy arrays, :func:`pointer` values or NumPy scalars, in the kernel's order.
    With a stream, the kernel's low-level function is called with it directly (no stream
    context switch); CuPy versions without that entry point get the context-manager path.
    """
    global _fast_launch
    import cupy

    if device is None:
        device = int(cupy.cuda.runtime.getDevice())
    function = get_function(plan.kernel, device)
    if stream is None:
        function(plan.grid, plan.block, args)
        return
    if _fast_launch:
        key = (device, plan.kernel)
        low = _low_level.get(key)
        try:
            if low is None:
                with cupy.cuda.Device(device):
                    low = function.kernel
                _low_level[key] = low
            low(plan.grid, plan.block, args, 0, stream)
            return
        except (AttributeError, TypeError):
            _fast_launch = False
    with stream:
        function(plan.grid, plan.block, args)


def launch_path() -> str:
    """Which launch path is in use: ``"direct"`` (stream passed to the function) or ``"context"``."""
    return "direct" if _fast_launch else "context"
