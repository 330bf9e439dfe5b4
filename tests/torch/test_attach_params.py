"""Which parameters attach() makes sparse, and the optimizers, dtypes and loops it works with."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore.torch as st
from sparsecore import DeadUnitsWarning, SparseCoreError


class Zoo(nn.Module):
    """Every kind of parameter the default selection must sort."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.rnn = nn.LSTM(6, 5, batch_first=True)
        self.conv1d = nn.Conv1d(5, 4, 3)
        self.conv2d = nn.Conv2d(1, 4, 3)
        self.pointwise = nn.Conv2d(4, 6, 1)
        self.depthwise = nn.Conv2d(6, 6, 3, groups=6)
        self.grouped = nn.Conv2d(6, 4, 3, groups=2)
        self.conv3d = nn.Conv3d(1, 2, 2)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(8, 3)


def _names(sparse) -> list[str]:
    names = list(sparse.names)
    sparse.detach()
    return names


def test_default_selection():
    names = _names(st.attach(Zoo(), density=0.5, prune_schedule="constant"))
    assert names == [
        "conv1d.weight",
        "conv2d.weight",
        "pointwise.weight",
        "depthwise.weight",
        "grouped.weight",
        "conv3d.weight",
        "fc.weight",
    ]


def test_include_exclude_dense_first_last():
    model = Zoo()
    kw = dict(density=0.5, prune_schedule="constant")
    names = _names(st.attach(model, include=[nn.Embedding, "rnn.weight_hh_*"], **kw))
    assert names[:2] == ["emb.weight", "rnn.weight_hh_l0"] and "rnn.weight_ih_l0" not in names
    names = _names(
        st.attach(model, include=nn.LSTM, exclude=[nn.Conv1d, nn.Conv2d, nn.Conv3d, "fc.*"], **kw)
    )
    assert names == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    names = _names(st.attach(model, dense_first=True, dense_last=True, **kw))
    assert names[0] == "conv2d.weight" and names[-1] == "conv3d.weight"
    with pytest.raises(SparseCoreError, match=r"'nothing\*' matches no parameter"):
        st.attach(model, include="nothing*", **kw)


def test_tied_and_frozen_parameters():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.frozen = nn.Linear(8, 8)
            self.frozen.weight.requires_grad_(False)

        def forward(self, x):
            return self.frozen(self.b(torch.relu(self.a(x))))

    model = Tied()
    frozen_before = model.frozen.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(model, opt, density=0.25, update_every=2, total_steps=20)
    assert sparse.names == ["a.weight"] and sparse.targets[0].aliases == ("a.weight", "b.weight")
    x = torch.randn(16, 8)
    for _ in range(6):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert len(sparse.history) == 3
    assert torch.equal(model.frozen.weight, frozen_before)
    assert int((model.b.weight != 0).sum()) <= 16 and model.a.weight is model.b.weight


def _steps(model, opt, n, x, y, accumulate=1, clip=None, scaler=None):
    for _ in range(n):
        opt.zero_grad()
        for chunk_x, chunk_y in zip(x.chunk(accumulate), y.chunk(accumulate)):
            F.cross_entropy(model(chunk_x), chunk_y).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()


def _mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 4)).to(dtype)


def _data(n=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 12, generator=g).to(dtype), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize(
    ("make_opt", "kind"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "momentum_buffer"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "momentum_buffer"),
        (lambda p: torch.optim.Adam(p, lr=0.01), "normalized"),  # the default for Adam
        (lambda p: torch.optim.AdamW(p, lr=0.01), "normalized"),
        (lambda p: torch.optim.Adamax(p, lr=0.01), "exp_avg"),  # no second moment to divide by
        (lambda p: torch.optim.SGD(p, lr=0.1), "own"),
        (lambda p: torch.optim.Adagrad(p, lr=0.1), "own"),
    ],
)
def test_importance_reads_the_right_momentum(make_opt, kind):
    model = _mlp()
    opt = make_opt(model.parameters())
    sparse = st.attach(model, opt, density=0.3, update_every=3, total_steps=30)
    assert sparse._kinds == [kind, kind]
    x, y = _data()
    _steps(model, opt, 2, x, y)
    masks_before = [m.clone() for m in sparse.masks]
    _steps(model, opt, 1, x, y)  # step 3: the update reads the momentum of this step
    report = sparse.history[-1]
    for layer, t, mask, own in zip(report.layers, sparse.targets, masks_before, sparse._own):
        if kind == "normalized":
            state = opt.state[t.param]
            p = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
        else:
            p = own if kind == "own" else opt.state[t.param][kind]
        expected = float(p[mask].abs().double().sum()) / int(mask.sum())
        assert expected > 0
        assert layer.importance == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("make_opt", "source"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "SGD's momentum buffer"),
        (lambda p: torch.optim.Adam(p, lr=0.01), "Adam's exp_avg / (sqrt(exp_avg_sq) + eps)"),
        (
            lambda p: torch.optim.Adadelta(p, lr=1.0),
            "the library's own gradient average (beta 0.9): Adadelta keeps no momentum",
        ),
        (
            lambda p: torch.optim.SGD(p, lr=0.1),
            "the library's own gradient average (beta 0.9): SGD keeps no momentum",
        ),
        (None, "the library's own gradient average (beta 0.9): no optimizer given"),
    ],
)
def test_the_momentum_source_is_named_once_and_readable(make_opt, source, caplog):
    model = _mlp()
    opt = None if make_opt is None else make_opt(model.parameters())
    with caplog.at_level("INFO", logger="sparsecore"):
        sparse = st.attach(model, opt, density=0.3, total_steps=30)
    assert sparse.momentum_source.startswith(source)
    logged = [r.getMessage() for r in caplog.records if r.name == "sparsecore"]
    assert logged == [f"sparsecore: sparse momentum reads {sparse.momentum_source}"]
    sparse.detach()


def test_mixed_momentum_sources_are_named_per_layer_count():
    model = _mlp()
    opt = torch.optim.SGD(
        [{"params": [model[0].weight], "momentum": 0.9}, {"params": [model[2].weight]}],
        lr=0.1,
    )
    sparse = st.attach(model, opt, density=0.3, total_steps=30)
    assert sparse.momentum_source == (
        "SGD's momentum buffer (momentum_buffer) for 1 of 2 sparse layers; the library's own "
        "gradient average (beta 0.9): SGD keeps no momentum for 1 of 2 sparse layers"
    )


def test_momentum_at_inactive_positions_keeps_accumulating():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(model, opt, density=0.2, update_every=100, total_steps=1000)
    x, y = _data()
    _steps(model, opt, 3, x, y)
    for t in sparse.targets:
        buf = opt.state[t.param]["momentum_buffer"]
        inactive = ~sparse.mask(t.name)
        assert buf[inactive].abs().sum() > 0  # not masked: regrowth reads it
        assert (t.param.detach()[inactive] == 0).all()


def test_adam_normalized_momentum():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sparse = st.attach(
        model, opt, density=0.3, update_every=2, total_steps=20, adam_momentum="normalized"
    )
    x, y = _data()
    _steps(model, opt, 2, x, y)
    layer = sparse._layers()[0]
    state = opt.state[sparse.targets[0].param]
    expected = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
    assert torch.allclose(layer.momentum, expected)
    assert len(sparse.history) == 1


def test_param_groups_accumulation_and_clipping_count_optimizer_steps():
    model = _mlp()
    opt = torch.optim.SGD(
        [
            {"params": [model[0].weight, model[0].bias], "lr": 0.1, "momentum": 0.9},
            {"params": [model[2].weight, model[2].bias], "lr": 0.05, "momentum": 0.5},
        ]
    )
    sparse = st.attach(model, opt, density=0.25, update_every=4, total_steps=40)
    x, y = _data(64)
    _steps(model, opt, 8, x, y, accumulate=4, clip=0.5)
    assert sparse.steps == 8 and [r.step for r in sparse.history] == [4, 8]
    for t in sparse.targets:
        assert (t.param.detach()[~sparse.mask(t.name)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_parameters(dtype):
    model = _mlp(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(model, opt, density=0.3, update_every=2, total_steps=20)
    x, y = _data(dtype=dtype)
    _steps(model, opt, 6, x, y)
    assert len(sparse.history) == 3 and not any(r.skipped for r in sparse.history)
    assert sum(int(m.sum()) for m in sparse.masks) == sparse.engine.target
    for t in sparse.targets:
        assert t.param.dtype == dtype
        assert (t.param.detach()[~sparse.mask(t.name)] == 0).all()


def test_no_optimizer_listens_to_any_optimizer_with_own_momentum():
    model = _mlp()
    sparse = st.attach(model, density=0.3, update_every=2, total_steps=20)
    other = nn.Linear(3, 3)
    unrelated = torch.optim.SGD(other.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    for _ in range(4):
        other(torch.randn(2, 3)).sum().backward()
        unrelated.step()  # not the model's optimizer: not counted
        _steps(model, opt, 1, x, y)
    assert sparse.steps == 4 and len(sparse.history) == 2
    assert sparse._kinds == ["own", "own"]
    with pytest.raises(SparseCoreError, match="step"):
        sparse.step()
    sparse.detach()
    _steps(model, opt, 2, x, y)
    assert sparse.steps == 4  # detached: the hook is gone


def test_manual_step_without_torch_optimizer():
    model = _mlp()
    sparse = st.attach(model, density=0.3, update_every=3, total_steps=30)
    x, y = _data()
    for _ in range(6):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        sparse.step()
    assert sparse.steps == 6 and len(sparse.history) == 2
    for t in sparse.targets:
        assert (t.param.detach()[~sparse.mask(t.name)] == 0).all()
    sparse.detach()


def test_static_and_set_baselines():
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(model, opt, density=0.3, growth="none", total_steps=20)
    before = [m.clone() for m in sparse.masks]
    _steps(model, opt, 10, x, y)
    sparse.end_epoch()
    assert sparse.history == [] and all(torch.equal(a, b) for a, b in zip(before, sparse.masks))
    sparse.detach()

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(
        model,
        opt,
        density=0.3,
        prune="SET",
        growth="random",
        redistribution="none",
        update_every=5,
        total_steps=20,
    )
    _steps(model, opt, 10, x, y)
    for report in sparse.history:
        for layer in report.layers:
            assert layer.pruned == layer.grown and layer.nnz_after == layer.nnz_before


def test_epoch_end_updates():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(
        model, opt, density=0.3, update_every=None, update_at_epoch_end=True, total_steps=12
    )
    x, y = _data()
    for _epoch in range(3):
        _steps(model, opt, 4, x, y)
        sparse.end_epoch()
    # after the last epoch (step 12 = total_steps) no update
    assert [r.step for r in sparse.history] == [4, 8]


def test_reset_optimizer_state_at_changed_positions():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(
        model, opt, density=0.3, update_every=3, total_steps=30, reset_optimizer_state=True
    )
    x, y = _data()
    _steps(model, opt, 2, x, y)
    before = [m.clone() for m in sparse.masks]
    _steps(model, opt, 1, x, y)
    for t, old in zip(sparse.targets, before):
        changed = old ^ sparse.mask(t.name)
        assert changed.any()
        assert (opt.state[t.param]["momentum_buffer"][changed] == 0).all()


def test_growth_gradient_reads_dense_gradient():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sparse = st.attach(model, opt, density=0.3, growth="gradient", update_every=2, total_steps=10)
    x, y = _data()
    _steps(model, opt, 4, x, y)
    assert len(sparse.history) == 2 and sparse.history[-1].totals()["grown"] > 0


def test_dead_units_are_readable_on_the_handle():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(DeadUnitsWarning, match="'0.weight': 1[89] of 24 output units start"):
        sparse = st.attach(model, opt, density=0.02, update_every=2, total_steps=20, recipe="paper")
    before = sparse.dead_units()
    empty = [int((~sparse.mask(n).any(dim=1)).sum()) for n in sparse.names]
    assert before == {n: (e, m.shape[0]) for n, e, m in zip(sparse.names, empty, sparse.masks)}
    x, y = _data()
    _steps(model, opt, 2, x, y)
    last = sparse.last_report
    assert sparse.dead_units() == {r.name: (r.dead_units, r.units) for r in last.layers}
