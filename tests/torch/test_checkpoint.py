"""Checkpoint and resume, CSR export, mixed precision with skipped steps."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore.torch as st
from sparsecore import SparseCoreError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 20),
        nn.ReLU(),
        nn.Linear(20, 4),
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def _run(model, opt, sparse, first: int, last: int) -> None:
    for step in range(first, last):
        x, y = _batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % 5 == 4:
            sparse.end_epoch()


def _make(opt_name: str):
    model = _model()
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    elif opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    else:  # no momentum in the optimizer: the library's own EMA is part of the state
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sparse = st.attach(
        model, opt, density=0.2, update_every=3, update_at_epoch_end=True, total_steps=24
    )
    return model, opt, sparse


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "own"])
def test_resume_equals_uninterrupted(opt_name):
    model, opt, sparse = _make(opt_name)
    _run(model, opt, sparse, 0, 20)
    reference = (
        [p.detach().clone() for p in model.parameters()],
        [m.clone() for m in sparse.masks],
    )
    ref_history = [r.to_dict() for r in sparse.history]

    model, opt, sparse = _make(opt_name)
    _run(model, opt, sparse, 0, 8)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sparse": sparse.state_dict()},
        buffer,
    )
    sparse.detach()
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)  # plain tensors and containers only

    model, opt, sparse = _make(opt_name)  # fresh objects
    sparse.load_state_dict(ckpt["sparse"])
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert sparse.steps == 8 and len(sparse.history) == 3
    _run(model, opt, sparse, 8, 20)
    assert len(sparse.history) >= 8  # several updates after the resume
    for a, b in zip(reference[0], model.parameters()):
        assert torch.equal(a, b.detach())
    for a, b in zip(reference[1], sparse.masks):
        assert torch.equal(a, b)
    assert [r.to_dict() for r in sparse.history] == ref_history


def test_export_to_csr_and_load_back():
    model, opt, sparse = _make("sgd")
    _run(model, opt, sparse, 0, 7)
    exported = sparse.export()
    for name in sparse.names:
        csr = exported["state"][name]
        assert csr.layout == torch.sparse_csr
        assert csr.values().numel() == int(sparse.mask(name).sum())  # explicit zeros kept
    buffer = io.BytesIO()
    torch.save(exported, buffer)
    buffer.seek(0)
    fresh = _model()
    masks = st.load_sparse(fresh, torch.load(buffer, weights_only=True))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    for name in sparse.names:
        assert torch.equal(masks[name], sparse.mask(name))


def _amp_setup():
    model, opt, _ = None, None, None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt


def test_amp_skipped_step_changes_no_mask():
    """GradScaler skips a step with inf gradients: no step, no update, masks intact."""
    model, opt = _amp_setup()
    sparse = st.attach(model, opt, density=0.25, update_every=3, total_steps=30)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
    updates_at = []
    for i in range(9):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if i == 2:  # the step that would trigger the first mask update
            model[0].weight.grad[0, 0] = float("inf")
            masks = [m.clone() for m in sparse.masks]
            weights = [t.param.detach().clone() for t in sparse.targets]
        scaler.step(opt)
        scaler.update()
        if i == 2:
            assert sparse.steps == 2 and sparse.history == []
            assert all(torch.equal(a, b) for a, b in zip(masks, sparse.masks))
            assert all(torch.equal(a, t.param) for a, t in zip(weights, sparse.targets))
        updates_at.append(len(sparse.history))
        for t in sparse.targets:
            assert torch.isfinite(t.param).all()
            assert (t.param.detach()[~sparse.mask(t.name)] == 0).all()
    assert sparse.steps == 8 and [r.step for r in sparse.history] == [3, 6]
    assert updates_at == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_nonfinite_momentum_update_is_skipped_and_said_so():
    """An update that would read inf momentum is skipped: warning, report, masks intact."""
    model, opt = _amp_setup()
    sparse = st.attach(
        model, opt, density=0.25, update_every=2, total_steps=30, on_nonfinite="skip"
    )
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    masks = [m.clone() for m in sparse.masks]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[2].weight.grad[1, 1] = float("inf")  # no scaler: the inf reaches the momentum
    with pytest.warns(
        RuntimeWarning,
        match=r"step 2 skipped: layer '2.weight': (weight|momentum) contains NaN or Inf",
    ):
        opt.step()
    report = sparse.last_report
    assert report is not None and report.skipped and "NaN or Inf" in report.reason
    assert report.to_dict()["skipped"] is True
    assert all(torch.equal(a, b) for a, b in zip(masks, sparse.masks))
    for t in sparse.targets:  # weights outside the mask are still exactly zero
        assert (t.param.detach()[~sparse.mask(t.name)] == 0).all()


def test_manual_step_skips_nonfinite_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    sparse = st.attach(model, density=0.25, update_every=2, total_steps=30, on_nonfinite="skip")
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    for i in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if i == 1:
            model[0].weight.grad[0, 0] = float("nan")
            own = [o.clone() for o in sparse._own]
            with pytest.warns(RuntimeWarning, match="gradient contains NaN"):
                sparse.step()
            assert all(torch.equal(a, b) for a, b in zip(own, sparse._own))
            assert sparse.steps == 1 and sparse.last_report.skipped
            continue
        sparse.step()
    assert sparse.steps == 2 and not sparse.last_report.skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse.detach()


def test_load_sparse_checks_everything_before_changing_the_model():
    model, opt, sparse = _make("sgd")
    _run(model, opt, sparse, 0, 4)
    exported = sparse.export()
    other = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 20), nn.ReLU(),
        nn.Linear(20, 5),
    )  # fmt: skip
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(SparseCoreError, match=r"'5.weight': the export holds shape \(4, 20\)"):
        st.load_sparse(other, exported)
    bad = dict(exported, state=dict(exported["state"]))
    csr = exported["state"]["3.weight"]
    cols = csr.col_indices().clone()
    cols[0] = 10_000  # a column outside the matrix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bad["state"]["3.weight"] = torch.sparse_csr_tensor(
            csr.crow_indices(), cols, csr.values(), size=csr.shape, check_invariants=False
        )
    fresh = _model()
    with pytest.raises(SparseCoreError, match="'3.weight': not a valid CSR tensor"):
        st.load_sparse(fresh, bad)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert all(
        torch.equal(v, w)
        for v, w in zip(fresh.state_dict().values(), _model().state_dict().values())
    )
