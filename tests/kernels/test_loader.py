"""The kernel package: sources ship with it, importing it needs no CuPy, kernels are found."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import sparsecore.kernels as K


def test_import_pulls_in_no_gpu_framework() -> None:
    code = (
        "import sys, sparsecore, sparsecore.kernels, sparsecore.kernels.layout, "
        "sparsecore.kernels.launch, sparsecore.cupy\n"
        "bad = [m for m in ('cupy', 'torch', 'tensorflow', 'keras') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_source_is_found_and_every_kernel_named() -> None:
    files = {p.name for p in K.source_files()}
    assert files == {"gather.cu", "sddmm.cu", "tiled.cu", "common.cuh"}
    on_disk = {p.name for p in K.source_dir().iterdir() if p.suffix in (".cu", ".cuh")}
    assert on_disk == files, "a CUDA source on disk is not listed in KERNEL_SOURCES/HEADERS"
    names = {n for s in K.KERNEL_SOURCES for n in K.kernel_names(s)}
    for source in K.KERNEL_SOURCES:
        text = K.read_source(source)
        assert len(re.findall(r'extern\s+"C"\s+__global__', text)) == len(K.kernel_names(source))
    assert {
        "sc_gather_f32_v4",
        "sc_sddmm_f32_v16",
        "sc_reduce_partials_f32",
        "sc_conv_tiled_f32",
    } <= names


def test_unknown_kernel_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="no CUDA kernel named 'nope'"):
        K._source_of("nope")


def test_cuda_available_is_a_bool_and_false_without_a_gpu() -> None:
    available = K.cuda_available()
    assert isinstance(available, bool)
    try:
        import cupy

        expected = bool(cupy.cuda.is_available())
    except Exception:
        expected = False
    assert available == expected


def test_expanded_source_inlines_the_headers() -> None:
    for source in K.KERNEL_SOURCES:
        text = K.expanded_source(source)
        assert '#include "common.cuh"' not in text
        assert "struct ScEntry" in text  # defined in the header
        for kernel in K.kernel_names(source):
            assert kernel in text
