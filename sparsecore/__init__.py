"""sparsecore: train neural networks that stay sparse from the first step to the last."""

__version__ = "0.1.0"
