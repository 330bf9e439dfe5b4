"""SparseTraining.load_state_dict is all or nothing: any corrupted field of a real saved state is
refused naming the field, and masks, weights, counters, history, own momentum and optimizer
buffers are exactly as before."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from corrupt import apply, corruptions, field_name
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsecore.torch as st_torch
from sparsecore import SparseCoreError

NULLABLE = {"step", "stop_at", "total_steps", "update_every", "steps_per_epoch"}
FREE_TEXT = {"reason"}
OPTIONS = dict(density=0.2, update_every=3, update_at_epoch_end=True, total_steps=40)


def _train(kind: str, steps: int, data_seed: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sparse = st_torch.attach(model, opt, on_nonfinite="skip", **OPTIONS)
    else:  # no optimizer momentum: the library's own EMA is part of the state
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sparse = st_torch.attach(model, on_nonfinite="skip", **OPTIONS)
    g = torch.Generator().manual_seed(data_seed)
    for step in range(1, steps + 1):
        x, y = torch.randn(8, 10, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step == 6:  # this update reads an inf gradient: skipped and recorded
            model[0].weight.grad[0, 0] = float("inf")
            with pytest.warns(RuntimeWarning, match="skipped"):
                opt.step()
            with torch.no_grad():  # a real run would be restarted from here; clean up
                for p in model.parameters():
                    p.nan_to_num_(0.0, 0.0, 0.0)
                for s in opt.state.values():
                    for v in s.values():
                        if isinstance(v, torch.Tensor):
                            v.nan_to_num_(0.0, 0.0, 0.0)
                for o in sparse._own:
                    if o is not None:
                        o.nan_to_num_(0.0, 0.0, 0.0)
        else:
            opt.step()
        if step % 5 == 0:
            sparse.end_epoch()
    return model, opt, sparse


def _saved(kind: str) -> dict:
    _, _, sparse = _train(kind, 14, data_seed=1)
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    sparse.detach()
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _snapshot(model, opt, sparse) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "masks": [m.clone() for m in sparse.masks],
        "own": [None if o is None else o.clone() for o in sparse._own],
        "counters": (sparse.steps, sparse.epochs, sparse._steps_per_epoch, sparse.engine.updates),
        "history": [r.to_dict() for r in sparse.history],
        "ever": [e.clone() for e in sparse.engine.ever_active or []],
        "config": sparse.config,
        "opt": copy.deepcopy(opt.state_dict()),
    }


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module", params=["sgd", "own"])
def setup(request):
    saved = _saved(request.param)
    model, opt, sparse = _train(request.param, 8, data_seed=2)  # another run, another point
    before = _snapshot(model, opt, sparse)
    found = corruptions(saved, nullable=NULLABLE, free_text=FREE_TEXT)
    yield saved, found, (model, opt, sparse), before
    sparse.detach()


def _refused_and_unchanged(setup, corruption) -> None:
    saved, _, (model, opt, sparse), before = setup
    with pytest.raises(SparseCoreError) as info:
        sparse.load_state_dict(apply(saved, corruption))
    assert field_name(corruption) in str(info.value), (corruption, str(info.value))
    assert _equal(_snapshot(model, opt, sparse), before), corruption


def test_the_saved_state_loads(setup):
    saved, found, _, _ = setup
    assert [r["skipped"] for r in saved["engine"]["history"]].count(True) == 1
    assert len(found) > 300
    _, _, other = _train("sgd" if saved["own_momentum"][0] is None else "own", 3, data_seed=3)
    other.load_state_dict(copy.deepcopy(saved))
    assert other.steps == 14 and other.engine.updates == saved["engine"]["updates"]
    other.detach()


@settings(max_examples=30)
@given(data=st.data())
def test_any_corrupted_field_is_refused_and_changes_nothing(setup, data):
    _refused_and_unchanged(setup, data.draw(st.sampled_from(setup[1])))


def test_every_corruption_of_every_field_is_refused(setup):
    for corruption in setup[1]:
        _refused_and_unchanged(setup, corruption)


def test_steps_corrupted_after_the_masks_is_still_refused_before_any_change(setup):
    """The example of the issue: a bad ``steps`` used to raise after masks and counters were
    overwritten."""
    saved, _, (model, opt, sparse), before = setup
    for bad in (None, "abc", -1, True):
        state = copy.deepcopy(saved)
        state["steps"] = bad
        with pytest.raises(SparseCoreError, match="field 'steps' must be an integer >= 0"):
            sparse.load_state_dict(state)
        assert _equal(_snapshot(model, opt, sparse), before)


def test_a_state_at_another_density_is_refused(setup):
    saved, _, (model, opt, sparse), before = setup
    state = copy.deepcopy(saved)
    state["engine"]["config"]["density"] = 0.3
    with pytest.raises(SparseCoreError, match=r"'engine.config' holds density 0.3, this run 0.2"):
        sparse.load_state_dict(state)
    assert _equal(_snapshot(model, opt, sparse), before)
