"""After every optimizer step, on every path, every weight outside the masks is exactly +0: also
when a gradient holds NaN or Inf and no GradScaler catches it, and where the step made a weight
negative (a float multiply by the mask would leave -0.0 there, or NaN for NaN and Inf)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsecore.torch as st_torch
from sparsecore import NonFiniteError

PATHS = ["sgd_fused", "sgd_plain", "adam", "no_optimizer_given", "manual_step"]


def _all_plus_zero_outside(sparse) -> bool:
    for t in sparse.targets:
        outside = t.param.detach()[~sparse.mask(t.name)]
        if not bool((outside == 0).all()) or bool(torch.signbit(outside).any()):
            return False
    return True


def _setup(path: str, dtype: torch.dtype, on_nonfinite: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).to(dtype)
    options = dict(density=0.3, update_every=4, total_steps=40, on_nonfinite=on_nonfinite)
    if path in ("sgd_fused", "sgd_plain"):
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
        sparse = st_torch.attach(model, opt, fused_sgd=path == "sgd_fused", **options)
    elif path == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        sparse = st_torch.attach(model, opt, **options)
    elif path == "no_optimizer_given":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        sparse = st_torch.attach(model, **options)
    else:
        opt = None
        sparse = st_torch.attach(model, **options)
    return model, opt, sparse


def _step(model, opt, sparse, bad: float | None) -> None:
    """One training step; ``bad`` (NaN or +-Inf) goes into one gradient entry, positive and
    negative entries nearby, inside and outside the mask."""
    x = torch.randn(5, 6, dtype=model[0].weight.dtype)
    y = torch.randint(0, 3, (5,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if bad is not None:
        g = model[0].weight.grad
        g[0, :3] = torch.tensor([bad, 1e3, -1e3], dtype=g.dtype)
        g[~sparse.mask("0.weight")] = bad  # every inactive position of the first layer
    if opt is not None:
        opt.step()
    else:  # a loop without torch.optim: plain SGD by hand, then sparse.step()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
        sparse.step()


@settings(max_examples=15, deadline=None)
@given(
    path=st.sampled_from(PATHS),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    bad_step=st.integers(1, 8),
)
def test_plus_zero_outside_the_masks_after_every_step(path, dtype, bad, bad_step):
    model, opt, sparse = _setup(path, dtype, "skip")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the skipped updates say so
            for step in range(1, 10):
                _step(model, opt, sparse, bad if step == bad_step else None)
                assert _all_plus_zero_outside(sparse), (path, dtype, step)
    finally:
        sparse.detach()


@pytest.mark.parametrize("path", PATHS)
def test_a_raising_step_leaves_plus_zero_too(path):
    """With on_nonfinite='raise', the step or update that raises still leaves +0 outside."""
    model, opt, sparse = _setup(path, torch.float32, "raise")
    try:
        for _ in range(3):
            _step(model, opt, sparse, None)
        with pytest.raises(NonFiniteError):
            _step(model, opt, sparse, float("nan"))  # step 4: an update is due, or step() raises
        assert _all_plus_zero_outside(sparse)
    finally:
        sparse.detach()
