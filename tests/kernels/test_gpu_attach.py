"""attach(kernels='cuda') on a GPU: the router runs the CUDA kernels and training matches.

With a dense-gradient window at least as long as the update interval, every step computes dense
weight gradients, so training with the kernels must match training without them (masks equal,
weights equal to float32 tolerance). With a short window, steps outside it use the SDDMM weight
gradient and the masks still hold.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytestmark = pytest.mark.gpu


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    ).cuda()


def _train(kernels: str | None, momentum: float, steps: int):
    import sparsecore.torch as st

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    sparse = st.attach(
        model, opt, density=0.2, update_every=5, total_steps=steps, kernels=kernels, seed=3
    )
    if kernels is not None:
        # Route every layer whatever its density (the default threshold, 0.85 sparsity, would
        # leave these 20%-dense layers on the dense path and test nothing).
        sparse.kernel_router.min_sparsity = 0.0
        sparse.kernel_router.refresh()
    gen = torch.Generator(device="cpu").manual_seed(1)
    for _ in range(steps):
        x = torch.randn((32, 3, 16, 16), generator=gen).cuda()
        y = torch.randint(0, 10, (32,), generator=gen).cuda()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for t in sparse.targets:
            assert not bool((t.param.detach() != 0)[~sparse.mask(t.name)].any()), t.name
    return model, sparse


def test_training_with_cuda_kernels_matches_dense_training() -> None:
    ref_model, ref = _train(None, momentum=0.9, steps=12)  # window 10 >= update_every 5
    model, sparse = _train("cuda", momentum=0.9, steps=12)
    router = sparse.kernel_router
    tel = router.telemetry()
    assert tel["sparse_layers"] >= 2, tel
    for name, layer in tel["layers"].items():
        calls = layer["calls"]
        assert calls.get("forward", 0) > 0, (name, layer)
        grads = calls.get("weight_grad_dense", 0) + calls.get("weight_grad_sparse", 0)
        assert grads == calls["forward"], (name, layer)
    assert tel["dense_grad_steps"] >= 10  # every step up to the last update is in the window
    assert [r.step for r in sparse.history] == [r.step for r in ref.history] == [5, 10]
    for t_ref, t in zip(ref.targets, sparse.targets):
        assert torch.equal(ref.mask(t_ref.name), sparse.mask(t.name)), t.name
    for (name, p_ref), (_, p) in zip(ref_model.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-3, atol=1e-4, msg=name)


def test_short_window_uses_sparse_weight_gradients_between_updates() -> None:
    _, sparse = _train("cuda", momentum=0.5, steps=12)  # window round(1/0.5) = 2
    tel = sparse.kernel_router.telemetry()
    assert tel["sparse_grad_steps"] > 0 and tel["dense_grad_steps"] > 0, tel
    assert tel["dense_grad_windows"] >= 2
    sparse.detach()
