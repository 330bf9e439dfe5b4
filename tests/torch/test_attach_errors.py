"""Bad input to attach() raises a clear error naming the value, and leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsecore.torch as st
from sparsecore import SparseCoreError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"density": 0}, r"density must lie in \(0, 1\], got 0"),
        ({"density": 1.5}, r"density must lie in \(0, 1\], got 1.5"),
        ({"density": -0.1}, r"got -0.1"),
        ({"prune_rate": 2.0}, r"prune_rate must lie in \[0, 1\], got 2.0"),
        ({"growth": "sideways"}, r"growth must be one of .* got 'sideways'"),
        ({"update_every": 0}, r"update_every must be a positive integer or None, got 0"),
        ({"stop_at": 0.5}, r"needs total_steps"),
        ({"not_an_option": 1}, r"unknown attach option\(s\) \['not_an_option'\]"),
        ({"kernels": "tpu"}, r"kernels must be one of .* got 'tpu'"),
        ({"include": [3]}, r"include takes .* got 3"),
        # booleans are not numbers; 64 weights at density 0.005 keep round(0.32) = 0 of them
        ({"density": True}, r"density must lie in \(0, 1\], got True"),
        ({"prune_rate": True}, r"prune_rate must lie in \[0, 1\], got True"),
        ({"seed": True}, r"seed must be an integer >= 0, got True"),
        ({"seed": 1.5}, r"seed must be an integer >= 0, got 1.5"),
        ({"update_every": True}, r"update_every must be a positive integer or None, got True"),
        ({"density": 0.005}, r"keeps round\(0.005 \* 64\) = 0 active weights"),
        ({"dense_first": "no"}, r"dense_first must be True or False, got 'no'"),
        ({"dense_last": 1}, r"dense_last must be True or False, got 1"),
    ],
)
def test_bad_options(kwargs, message):
    model = _model()
    snap = _snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(SparseCoreError, match=message):
        st.attach(model, opt, total_steps=10, **kwargs) if "stop_at" not in kwargs else st.attach(
            model, opt, **kwargs
        )
    assert _unchanged(model, snap)
    assert not opt._optimizer_step_post_hooks
    # the model is still attachable afterwards: nothing was registered
    st.attach(model, opt, total_steps=10).detach()


def test_model_without_prunable_parameters():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Embedding(3, 4))
    snap = _snapshot(model)
    with pytest.raises(SparseCoreError, match="model Sequential has no parameter to make sparse"):
        st.attach(model)
    assert _unchanged(model, snap)
    frozen = _model().requires_grad_(False)
    with pytest.raises(SparseCoreError, match="no parameter to make sparse"):
        st.attach(frozen)


def test_optimizer_must_hold_the_sparse_parameters():
    model = _model()
    snap = _snapshot(model)
    other = torch.optim.SGD(nn.Linear(6, 8).parameters(), lr=0.1)
    with pytest.raises(SparseCoreError, match=r"\['0.weight', '2.weight'\]"):
        st.attach(model, other)
    partial = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(SparseCoreError, match=r"\['2.weight'\]"):
        st.attach(model, partial)
    with pytest.raises(SparseCoreError, match="torch.optim.Optimizer, got dict"):
        st.attach(model, {"lr": 0.1})
    assert _unchanged(model, snap)
    assert not other._optimizer_step_post_hooks and not partial._optimizer_step_post_hooks


def test_attaching_twice():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = st.attach(model, opt, total_steps=10, density=0.5)
    snap = _snapshot(model)
    with pytest.raises(SparseCoreError, match="already attached"):
        st.attach(model, opt, total_steps=10)
    with pytest.raises(
        SparseCoreError, match=r"parameter 'weight' is already sparse \(as '0.weight'"
    ):
        st.attach(model[0], total_steps=10)  # a submodule of an attached model
    assert _unchanged(model, snap) and len(opt._optimizer_step_post_hooks) == 1
    sparse.detach()
    assert not opt._optimizer_step_post_hooks
    with pytest.raises(SparseCoreError, match="detached"):
        sparse.end_epoch()
    st.attach(model, opt, total_steps=10).detach()


def test_missing_total_steps_is_said_clearly():
    model = _model()
    with pytest.warns(UserWarning, match=r"total_steps is not set.*prune_rate=0.5"):
        sparse = st.attach(model, update_every=1)
    sparse.detach()
    with pytest.raises(SparseCoreError, match="stop_at=0.9 is a fraction of training"):
        st.attach(model, stop_at=0.9)


def test_nonfinite_update_raises_by_default_and_changes_nothing():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(model, opt, total_steps=10, density=0.5, update_every=2)
    x = torch.randn(4, 6)
    model(x).sum().backward()
    opt.step()
    masks = [m.clone() for m in sparse.masks]
    opt.zero_grad()
    model(x).sum().backward()
    model[2].weight.grad[0, 0] = float("nan")
    from sparsecore import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"layer '2.weight': (weight|momentum) contains NaN"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(masks, sparse.masks))
    assert sparse.history == []
    for t in sparse.targets:  # the failed update still leaves exact zeros outside the masks
        assert (t.param.detach()[~sparse.mask(t.name)] == 0).all()


def test_load_state_dict_rejects_foreign_state():
    model = _model()
    sparse = st.attach(model, total_steps=10, density=0.5)
    other = st.attach(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), total_steps=10, density=0.5
    )
    masks = [m.clone() for m in sparse.masks]
    with pytest.raises(
        SparseCoreError, match=r"field .masks\[1\]. must be a torch.bool tensor of shape \(2, 8\)"
    ):
        sparse.load_state_dict(other.state_dict())
    with pytest.raises(SparseCoreError, match="not a sparsecore.torch state"):
        sparse.load_state_dict({"masks": []})
    assert all(torch.equal(a, b) for a, b in zip(masks, sparse.masks))


def test_a_layer_left_without_weights_is_refused_and_numpy_numbers_work():
    layer = nn.Linear(3, 3)
    snap = _snapshot(layer)
    with pytest.raises(SparseCoreError, match=r"round\(0.01 \* 9\) = 0 active weights"):
        st.attach(layer, density=0.01)
    assert _unchanged(layer, snap)
    import numpy as np

    sparse = st.attach(
        nn.Linear(20, 10), density=np.float32(0.25), seed=np.int64(2), prune_schedule="constant"
    )
    assert sparse.config.density == float(np.float32(0.25)) and sparse.config.seed == 2
    assert type(sparse.config.density) is float and type(sparse.config.seed) is int
    assert sum(int(m.sum()) for m in sparse.masks) == 50
