"""``attach(update_backend=...)`` takes the placements every adapter shares (sparsecore.placement):
``'host'`` runs the update through the Numba backend on NumPy views, ``'device'`` through the
torch backend; ``'numba'`` and ``'torch'``, the earlier names, are aliases. Same masks either way.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore.torch as st
from sparsecore import SparseCoreError
from sparsecore.torch.host_update import UPDATE_BACKENDS


def _run(word: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(model, opt, density=0.3, update_every=2, total_steps=20, update_backend=word)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        opt.zero_grad()
        x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return sparse


def test_the_accepted_values_are_the_shared_placements_then_the_earlier_names():
    assert UPDATE_BACKENDS == ("auto", "host", "device", "numba", "torch")


def test_host_and_device_and_their_earlier_names():
    runs = {word: _run(word) for word in ("host", "numba", "device", "torch", "auto")}
    assert {w: s.last_update_backend for w, s in runs.items()} == {
        "host": "numba",
        "numba": "numba",
        "device": "torch",
        "torch": "torch",
        "auto": "numba",
    }
    masks = [[m.clone() for m in s.masks] for s in runs.values()]
    assert len(runs["host"].history) == 3
    for other in masks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(masks[0], other))


def test_a_keras_word_is_refused_before_the_model_changes():
    model = nn.Linear(4, 4)
    before = model.weight.detach().clone()
    with pytest.raises(SparseCoreError, match=r"'numba' for 'host'.*got 'keras'"):
        st.attach(model, update_backend="keras")
    assert torch.equal(model.weight.detach(), before)
