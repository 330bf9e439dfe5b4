"""``detach()`` leaves a plain PyTorch model: pickled whole, it loads and predicts in a process
that cannot import sparsecore (the counterpart of ``sparsecore.keras.strip``)."""

from __future__ import annotations

import torch
from subprocesses import run_python
from torch import nn
from torch.nn import functional as F

import sparsecore.torch as st


def _trained_and_detached(kernels: str | None, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(
        model, optimizer, density=0.2, update_every=3, total_steps=12, kernels=kernels
    )
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    for step in range(12):
        optimizer.zero_grad()
        F.cross_entropy(model(x[step * 4 : step * 4 + 16]), y[step * 4 : step * 4 + 16]).backward()
        optimizer.step()
    assert len(sparse.history) == 3
    masks = {name: sparse.mask(name).clone() for name in sparse.names}
    plain = sparse.detach()
    params = dict(plain.named_parameters())
    for name, mask in masks.items():
        assert not params[name].detach()[~mask].any()
    return plain


def test_a_detached_model_pickles_and_loads_without_sparsecore(tmp_path):
    """Dense computation on masked weights, and the sparse CPU kernels (which replace the
    layers' forward while attached): either way nothing of sparsecore is left in the model."""
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    expected = {}
    for kernels in (None, "cpu"):
        plain = _trained_and_detached(kernels, x)
        with torch.no_grad():
            expected[str(kernels)] = plain(x)
        torch.save(plain, tmp_path / f"model-{kernels}.pt")  # the whole module, pickled
    torch.save(x, tmp_path / "x.pt")
    code = f"""
import importlib.util, json, sys, torch
assert importlib.util.find_spec("sparsecore") is None, "sparsecore is importable"
x = torch.load({str(tmp_path / "x.pt")!r})
out = {{}}
for kernels in ("None", "cpu"):
    model = torch.load({str(tmp_path)!r} + f"/model-{{kernels}}.pt", weights_only=False)
    with torch.no_grad():
        out[kernels] = model(x).tolist()
out["modules"] = [m for m in sys.modules if "sparsecore" in m]
print(json.dumps(out))
"""
    out = run_python(code, tmp_path, sparsecore=False)
    assert out.pop("modules") == []
    for kernels, y in out.items():
        assert torch.equal(torch.tensor(y, dtype=torch.float32), expected[kernels]), kernels
