"""attach(): masks after every optimizer step, updates on schedule, exact density, reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore
import sparsecore.torch as st
from sparsecore import SparseConfig, SparseCoreError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5)
    )


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 20, generator=g), torch.randint(0, 5, (n,), generator=g)


def _train(model, opt, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _outside_mask_zero(sparse) -> bool:
    return all(bool((t.param.detach()[~sparse.mask(t.name)] == 0).all()) for t in sparse.targets)


def test_masks_after_every_step_and_updates_on_schedule():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(model, opt, density=0.1, update_every=5, total_steps=40)
    assert sparse.names == ["0.weight", "2.weight", "4.weight"]
    target = sparse.engine.target
    x, y = _data()
    for step in range(1, 41):
        _train(model, opt, 1, x, y)
        assert _outside_mask_zero(sparse)
        assert sum(int(m.sum()) for m in sparse.masks) == target
        # updates after steps 5, 10, ..., 35: none at 40 (= total_steps, the end of training)
        assert len(sparse.history) == min(step // 5, 7)
    assert [r.step for r in sparse.history] == [5, 10, 15, 20, 25, 30, 35]
    rates = [r.prune_rate for r in sparse.history]
    assert rates == sorted(rates, reverse=True) and rates[0] < 0.5
    assert sparse.last_report is sparse.history[-1]
    assert sparse.density() == pytest.approx(target / sum(m.numel() for m in sparse.masks))
    assert any(r.totals()["net_grown"] > 0 for r in sparse.history)
    # the momentum was read: every layer's importance is positive
    assert all(layer.importance > 0 for layer in sparse.history[0].layers)


def test_default_attach_uses_the_library_defaults_and_the_paper_is_one_option_away():
    model = _mlp()
    with pytest.warns(UserWarning, match="total_steps"):
        sparse = st.attach(model)
    cfg = sparse.config
    assert (cfg.density, cfg.prune_rate, cfg.prune_schedule) == (0.05, 0.5, "cosine")
    assert (cfg.prune, cfg.growth, cfg.redistribution) == (
        "magnitude",
        "momentum_neuron",
        "momentum",
    )
    assert (cfg.init, cfg.cover_units, cfg.revive_dead_units) == ("ER", True, True)
    assert sparse.density() == pytest.approx(0.05, abs=1e-3)
    assert _outside_mask_zero(sparse)
    sparse.detach()
    with pytest.warns(UserWarning, match="total_steps"):
        paper = st.attach(model, recipe="paper").config
    assert (paper.init, paper.growth, paper.cover_units, paper.revive_dead_units) == (
        "uniform",
        "momentum",
        False,
        False,
    )
    assert paper == SparseConfig.from_options(recipe="paper")
    with pytest.raises(SparseCoreError, match="recipe must be one of"):
        st.attach(model, recipe="papers", total_steps=10)


def test_summary_is_a_per_layer_table_and_repr_one_line():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(model, opt, density=0.1, update_every=5, total_steps=40)
    x, y = _data()
    _train(model, opt, 12, x, y)
    lines: list[str] = []
    sparse.summary(print_fn=lines.append)
    assert lines[0].startswith("SparseTraining: 3 sparse weights, ") and "step 12" in lines[0]
    assert "2 mask updates" in lines[0]
    rows = {line.split()[0]: line for line in lines[3:-1]}
    last = sparse.history[-1]
    for i, name in enumerate(sparse.names):
        mask = sparse.mask(name)
        cells = rows[name].split()
        assert f"({', '.join(str(d) for d in mask.shape)})" in rows[name]
        assert cells[-10:-7] == [
            str(mask.numel()),
            str(int(mask.sum())),
            f"{100 * mask.float().mean():.2f}%",
        ]
        assert cells[-6:-4] == [str(last.layers[i].pruned), str(last.layers[i].grown)]
        empty_rows = int((~mask.any(dim=1)).sum())
        unread = int((~mask.any(dim=0)).sum())
        assert cells[-2:] == [f"{empty_rows}/{mask.shape[0]}", f"{unread}/{mask.shape[1]}"]
    assert rows["all"].split()[1:3] == [
        str(sum(m.numel() for m in sparse.masks)),
        str(sparse.engine.target),
    ]
    assert "\n" not in repr(sparse) and repr(sparse).startswith("SparseTraining(3 sparse layers")


@pytest.mark.parametrize("scale_init", [True, False])
def test_scale_init_puts_each_unit_at_its_dense_output_scale(scale_init):
    """Attaching multiplies the freshly initialised weights by sqrt(fan_in / active fan_in) per
    output unit (the default) or only masks them; biases are left as they are."""
    model = _mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse = st.attach(model, density=0.1, total_steps=10, scale_init=scale_init)
    assert sparse.config.scale_init is scale_init
    params = dict(model.named_parameters())
    for t, mask in zip(sparse.targets, sparse.masks):
        factor = sparsecore.init_scales(mask.numpy(), 0) if scale_init else mask.numpy()
        expected = before[t.name] * torch.as_tensor(factor, dtype=torch.float32)
        torch.testing.assert_close(params[t.name].detach(), expected, rtol=1e-6, atol=0)
        units_norm = (params[t.name].detach() ** 2).sum(1)
        dense_norm = (before[t.name] ** 2).sum(1)
        if scale_init:  # the same order of output scale per unit as the dense layer
            assert 0.1 < float((units_norm / dense_norm).median()) < 10
    assert torch.equal(params["0.bias"], before["0.bias"])
