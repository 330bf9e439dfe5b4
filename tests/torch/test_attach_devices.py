"""The adapter and TorchBackend on every device: CPU here, CUDA where a GPU is present.

On CUDA the selection runs with torch ops on the device (topk/kthvalue, nonzero, the hash in
int64), so these tests check that the masks still equal the NumPy reference bit for bit, that
half-precision parameters train and stay masked, and that a GradScaler-skipped float16 step
changes no mask.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore.torch as st
from sparsecore import Layer, update
from sparsecore.torch.backend import TorchBackend

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
MODES = [
    (prune, growth, red)
    for prune in ("magnitude", "SET")
    for growth in ("momentum", "random", "gradient", "momentum_neuron")
    for red in ("momentum", "magnitude", "nonzero", "none")
]


def _layers(seed: int, dtype):
    rng = np.random.default_rng(seed)
    layers = []
    for i, shape in enumerate([(64, 40), (16, 8, 3, 3), (10, 64)]):
        mask = rng.random(shape) < 0.1
        weight = (rng.integers(-3, 4, size=shape) * mask).astype(dtype)
        momentum = (
            rng.integers(0, 3, size=shape) if seed % 2 else rng.standard_normal(shape)
        ).astype(dtype)
        grad = rng.standard_normal(shape).astype(dtype)
        layers.append(Layer(f"l{i}", weight, mask, momentum, grad))
    return layers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_every_mode_equals_reference_on_device(device, dtype):
    for seed in range(2):
        layers = _layers(seed, dtype)
        on_device = [
            Layer(
                layer.name,
                *(torch.from_numpy(a).to(device) for a in (layer.weight, layer.mask)),
                *(torch.from_numpy(a).to(device) for a in (layer.momentum, layer.grad)),
            )
            for layer in layers
        ]
        for prune, growth, red in MODES:
            kw = dict(prune_rate=0.3, update_index=seed + 1, seed=11, prune=prune, growth=growth)
            ref = update(layers, redistribution=red, backend="numpy", **kw)
            out = update(on_device, redistribution=red, backend=TorchBackend(), **kw)
            for a, b in zip(ref.masks, out.masks):
                assert b.device.type == device
                np.testing.assert_array_equal(a, b.cpu().numpy(), err_msg=f"{prune}/{growth}/{red}")
            for ra, rb in zip(ref.report.layers, out.report.layers):
                assert math.isclose(ra.importance, rb.importance, rel_tol=1e-12)


def _model(device, dtype):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    ).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_training_on_device_keeps_masks(device, dtype):
    model = _model(device, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    sparse = st.attach(model, opt, density=0.2, update_every=3, total_steps=30)
    g = torch.Generator().manual_seed(0)
    for _ in range(9):
        x = torch.randn(16, 1, 8, 8, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, 4, (16,), generator=g).to(device)
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
        for t in sparse.targets:
            assert sparse.mask(t.name).device.type == device
            assert not bool((t.param.detach()[~sparse.mask(t.name)] != 0).any())
    assert [r.step for r in sparse.history] == [3, 6, 9]
    assert not any(r.skipped for r in sparse.history)
    assert sum(int(m.sum()) for m in sparse.masks) == sparse.engine.target


@pytest.mark.parametrize("device", DEVICES)
def test_gradscaler_skipped_step_on_device(device):
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    model = _model(device, torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(model, opt, density=0.2, update_every=2, total_steps=30)
    scaler = torch.amp.GradScaler(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 8, 8, generator=g).to(device)
    y = torch.randint(0, 4, (16,), generator=g).to(device)
    for i in range(5):
        opt.zero_grad()
        with torch.autocast(device, dtype=amp_dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if i == 1:
            model[3].weight.grad[0, 0] = float("inf")
            masks = [m.clone() for m in sparse.masks]
        scaler.step(opt)
        scaler.update()
        if i == 1:
            assert sparse.steps == 1 and sparse.history == []
            assert all(torch.equal(a, b) for a, b in zip(masks, sparse.masks))
    assert sparse.steps == 4 and [r.step for r in sparse.history] == [2, 4]
    for t in sparse.targets:
        assert torch.isfinite(t.param).all()
