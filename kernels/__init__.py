"""CUDA C kernels of sparsecore and their CuPy loader (imported as ``sparsecore.kernels``)."""
