"""Keras test settings: pick the Keras backend before Keras is imported (tox sets KERAS_BACKEND;
``tensorflow`` otherwise) and import torch before TensorFlow when both are used."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ["KERAS_BACKEND"] == "torch":
    import torch  # noqa: F401  (before TensorFlow: the other order has crashed)

import sys

# helpers_keras.py sits beside the tests (pytest runs with --import-mode=importlib).
sys.path.insert(0, os.path.dirname(__file__))
