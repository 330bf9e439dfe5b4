"""attach(kernels='cpu'): the sparse-kernel router is driven by the adapter's masks and schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore.torch as st
from sparsecore import SparseCoreError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, 3),
    )


def test_kernels_follow_masks_and_dense_gradient_window():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)  # window round(1/0.5) = 2
    sparse = st.attach(model, opt, density=0.1, update_every=5, total_steps=16, kernels="cpu")
    router = sparse.kernel_router
    assert router is not None and sparse._window == 2
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    dense_flags = [router.dense_weight_grad]
    for _ in range(16):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        dense_flags.append(router.dense_weight_grad)
        for t in sparse.targets:
            assert (t.param.detach()[~sparse.mask(t.name)] == 0).all()
    # dense in the 2 steps before each update (after steps 3, 4 -> steps 4, 5; 8, 9; 13, 14)
    # and sparse after the last update (15 = stop at total_steps 16 has no update)
    expected = [s % 5 >= 3 and s < 15 for s in range(17)]
    assert dense_flags == expected
    assert [r.step for r in sparse.history] == [5, 10, 15]
    tel = router.telemetry()
    assert tel["sparse_layers"] >= 1 and tel["dense_grad_windows"] == 3
    sparse.detach()
    assert router.telemetry()["layers"]["3.weight"]["installed"] is False


def test_kernels_need_linear_or_conv2d():
    model = nn.Sequential(nn.Conv1d(2, 4, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SparseCoreError, match=r"kernels='cpu': none of the sparse parameters"):
        st.attach(model, density=0.5, total_steps=10, kernels="cpu")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
