"""``detach()`` leaves a plain PyTorch model: pickled whole, it loads and predicts in a process
that cannot import sparsecore (the counterpart of ``sparsecore.keras.strip``)."""

from __future__ import annotations

import pytest
import torch
from subprocesses import run_python
from torch import nn
from torch.nn import functional as F

import sparsecore.torch as st


@pytest.mark.parametrize("kernels", [None, "cpu"])
def test_a_detached_model_pickles_and_loads_without_sparsecore(tmp_path, kernels):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(
        model, optimizer, density=0.2, update_every=3, total_steps=12, kernels=kernels
    )
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    for step in range(12):
        optimizer.zero_grad()
        F.cross_entropy(model(x[step * 5 : step * 5 + 16]), y[step * 5 : step * 5 + 16]).backward()
        optimizer.step()
    assert len(sparse.history) == 3
    masks = {name: sparse.mask(name).clone() for name in sparse.names}
    plain = sparse.detach()
    params = dict(plain.named_parameters())
    for name, mask in masks.items():
        assert not params[name].detach()[~mask].any()
    with torch.no_grad():
        expected = plain(x)
    torch.save(plain, tmp_path / "model.pt")  # the whole module, pickled
    torch.save(x, tmp_path / "x.pt")
    code = f"""
import importlib.util, json, sys, torch
assert importlib.util.find_spec("sparsecore") is None, "sparsecore is importable"
model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
with torch.no_grad():
    y = model(torch.load({str(tmp_path / "x.pt")!r}))
print(json.dumps({{"y": y.tolist(), "modules": [m for m in sys.modules if "sparsecore" in m]}}))
"""
    out = run_python(code, tmp_path, sparsecore=False)
    assert out["modules"] == []
    assert torch.equal(torch.tensor(out["y"], dtype=expected.dtype), expected)
