"""PyTorch adapter and backend for sparsecore (imported as ``sparsecore.torch``)."""
