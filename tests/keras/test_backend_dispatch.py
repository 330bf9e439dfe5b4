"""`sparsecore.backend_for` sends each framework's tensors to that framework's own backend."""

from __future__ import annotations

import keras
import numpy as np

import sparsecore as sc
import sparsecore.keras  # registers the Keras backend


def test_tensors_go_to_their_own_backend() -> None:
    sc.get_backend("keras")  # loaded before any lookup, as in a Keras training run
    tensor = keras.ops.convert_to_tensor(np.ones((2, 2), np.float32))
    expected = "torch" if keras.backend.backend() == "torch" else "keras"
    assert sc.backend_for(tensor).name == expected
    assert sc.backend_for(np.ones(2)).name == "numpy"
