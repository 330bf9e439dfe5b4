"""attach(kernels='compact+cuda') on a GPU: the CUDA kernels run on each layer's gathered block
and training matches training without kernels (every step in the dense-gradient window)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytestmark = pytest.mark.gpu


def _train(kernels: str | None, steps: int = 12):
    import sparsecore.torch as st

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    ).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # window 10
    sparse = st.attach(
        model,
        opt,
        density=0.1,
        update_every=5,
        total_steps=steps,
        kernels=kernels,
        seed=3,
        init="uniform",
        redistribution="none",
        cover_units=False,
        revive_dead_units=False,
    )
    if kernels is not None:
        sparse.kernel_router.min_sparsity = 0.0  # the CUDA kernels on every block
        sparse.kernel_router.refresh()
    gen = torch.Generator(device="cpu").manual_seed(1)
    for _ in range(steps):
        x = torch.randn((32, 3, 16, 16), generator=gen).cuda()
        y = torch.randint(0, 10, (32,), generator=gen).cuda()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, sparse


@pytest.mark.parametrize("kernels", ["compact", "compact+cuda"])
def test_compact_training_on_gpu_matches_dense_training(kernels: str) -> None:
    ref_model, ref = _train(None)
    model, sparse = _train(kernels)
    for name in ref.names:
        assert torch.equal(sparse.mask(name), ref.mask(name)), name
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    layers = sparse.kernel_router.telemetry()["layers"]
    block = "block_sparse" if kernels == "compact+cuda" else "block_dense"
    assert all(layer["calls"][block] > 0 for layer in layers.values())
