"""CuPy backend for the sparsecore engine (imported as ``sparsecore.cupy``)."""
