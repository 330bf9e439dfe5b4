"""torch.compile (inductor): a model compiled after attach trains, and mask updates never recompile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import sparsecore.torch as st

# inductor internals of this torch version emit deprecation notices about torch.jit
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_compiled_model_trains_without_recompiles():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(model, opt, density=0.2, update_every=3, total_steps=60)
    compiled = torch.compile(model, backend="inductor")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)

    def step() -> float:
        opt.zero_grad()
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    first = step()
    step()  # warm-up: forward and backward graphs compiled
    graphs = counters["stats"]["unique_graphs"]
    frames = counters["frames"]["total"]
    aot = counters["aot_autograd"]["total"]
    assert graphs >= 1 and aot >= 1
    masks_before = [m.clone() for m in sparse.masks]
    losses = [step() for _ in range(10)]  # steps 3..12: four mask updates
    assert len(sparse.history) == 4
    assert any(not torch.equal(a, b) for a, b in zip(masks_before, sparse.masks))
    # zero new compiles: no new graph, no new frame compiled, no new autograd graph
    assert counters["stats"]["unique_graphs"] == graphs
    assert counters["frames"]["total"] == frames
    assert counters["aot_autograd"]["total"] == aot
    assert losses[-1] < first
    # the compiled model sees the in-place masked weights: it equals the eager model
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    for t in sparse.targets:
        assert (t.param.detach()[~sparse.mask(t.name)] == 0).all()
