"""The fused SGD + re-masking step (sparsecore.torch.fused_step): bit for bit what
``torch.optim.SGD`` followed by masking gives, and the plain path wherever it does not apply."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch import nn

import sparsecore.torch as st
from sparsecore.errors import SparseCoreError
from sparsecore.torch import fused_step as fs

# Lengths around the 8- and 16-lane vector widths, so vector bodies and scalar tails both run.
LENGTHS = [1, 7, 16, 33, 1000]
OPTIONS = [
    dict(momentum=m, weight_decay=wd, dampening=d, nesterov=n)
    for m, wd, d, n in itertools.product([0.0, 0.9], [0.0, 5e-4], [0.0, 0.1], [False, True])
    if not (n and (m == 0.0 or d != 0.0))  # SGD refuses nesterov without momentum/with dampening
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_kernel_equals_sgd_then_masking(dtype, options):
    gen = torch.Generator().manual_seed(0)
    for n in LENGTHS:
        mask = torch.rand(n, generator=gen) < 0.3
        start = torch.randn(n, generator=gen, dtype=dtype) * mask
        ref = start.clone().requires_grad_()
        opt = torch.optim.SGD([ref], lr=0.0123, **options)
        mine, state = start.clone(), {}
        group = dict(lr=0.0123, **options)
        for step in range(3):  # the first step creates the momentum buffer, later ones update it
            grad = torch.randn(n, generator=gen, dtype=dtype) * 10.0 ** (step - 1)
            ref.grad = grad.clone()
            opt.step()
            with torch.no_grad():
                ref.mul_(mask)
            fs.masked_sgd_step(mine, grad.clone(), mask, state, group)
            assert torch.equal(mine, ref.detach()), (n, step)
            assert not torch.signbit(mine[~mask]).any(), "inactive weights must be +0"
            if options["momentum"]:
                assert torch.equal(state["momentum_buffer"], opt.state[ref]["momentum_buffer"])
            else:
                assert state == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_kernel_folds_the_own_average_like_torch_lerp(dtype, beta):
    gen = torch.Generator().manual_seed(1)
    for n in LENGTHS:
        own_ref = torch.randn(n, generator=gen, dtype=dtype)
        own = own_ref.clone()
        grad = torch.randn(n, generator=gen, dtype=dtype)
        torch._foreach_lerp_([own_ref], [grad], 1.0 - beta)
        param = torch.zeros(n, dtype=dtype)
        mask = torch.ones(n, dtype=torch.bool)
        fs.masked_sgd_step(param, grad, mask, {}, dict(lr=0.1, momentum=0.0), own, 1.0 - beta)
        assert torch.equal(own, own_ref), n
        assert torch.equal(param, -torch.tensor(0.1, dtype=dtype) * grad)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 3)
    )


def _train(model, opt, steps: int, *, closure: bool = False, sparse=None) -> None:
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 3, (16,), generator=gen)

        def loss_fn(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            grads = [p.grad for p in model.parameters()]
            opt.step()
            # SGD's step reads the gradients the fused loop held back: they are back, unchanged
            assert all(p.grad is g for p, g in zip(model.parameters(), grads))
        if sparse is not None:
            for t, m in zip(sparse.targets, sparse.masks):
                assert not t.param.detach()[~m].any(), "weights outside the mask must be 0"


def _run(optimizer: str, fused: bool, own: bool = False, closure: bool = False, **sgd):
    model = _mlp()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, **sgd)
    elif optimizer == "sgd_subclass":
        opt = type("MySGD", (torch.optim.SGD,), {})(model.parameters(), lr=0.05, **sgd)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sparse = st.attach(
        model, None if own else opt, density=0.2, update_every=4, total_steps=20, fused_sgd=fused
    )
    calls = []
    inner = sparse._finish_sgd_step
    sparse._finish_sgd_step = lambda o: calls.append(done := inner(o)) or done  # type: ignore
    _train(model, opt, 13, closure=closure, sparse=sparse)
    fused_steps = sum(1 for c in calls if c)
    return model, opt, sparse, fused_steps


def _same(a, b) -> None:
    (ma, oa, sa, _), (mb, ob, sb, _) = a, b
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)
    for x, y in zip(sa.masks, sb.masks):
        assert torch.equal(x, y)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        for key, value in oa.state[pa].items():
            assert torch.equal(value, ob.state[pb][key]), key
    for x, y in zip(sa._own, sb._own):
        assert (x is None and y is None) or torch.equal(x, y)
    assert [r.layers for r in sa.history] == [r.layers for r in sb.history]
    assert len(sa.history) == 3


@pytest.mark.parametrize(
    "sgd",
    [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-3), dict()],
    ids=["momentum", "nesterov_wd", "plain"],
)
@pytest.mark.parametrize("own", [False, True], ids=["optimizer_given", "own_momentum"])
def test_training_with_fused_steps_equals_the_plain_path(sgd, own):
    fused = _run("sgd", True, own=own, **sgd)
    assert fused[3] == 13, "every step of these float32 CPU weights is fused"
    _same(fused, _run("sgd", False, own=own, **sgd))


@pytest.mark.parametrize(
    "case",
    [
        dict(optimizer="adam"),
        dict(optimizer="sgd_subclass", momentum=0.9),
        dict(optimizer="sgd", momentum=0.9, maximize=True),
        dict(optimizer="sgd", momentum=0.9, closure=True),
    ],
    ids=["adam", "sgd_subclass", "maximize", "closure"],
)
def test_steps_the_fused_loop_does_not_reproduce_take_the_plain_path(case):
    case = dict(case)
    optimizer = case.pop("optimizer")
    result = _run(optimizer, True, **case)
    assert result[3] == 0
    _same(result, _run(optimizer, False, **case))


def test_half_precision_weights_take_the_plain_path():
    model = _mlp().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(model, opt, density=0.2, update_every=None, total_steps=10)
    x = torch.randn(8, 12, dtype=torch.bfloat16)
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    opt.step()
    assert sparse._sgd.groups is not None and not sparse._sgd.taken
    assert all("momentum_buffer" in opt.state[t.param] for t in sparse.targets)
    for t, m in zip(sparse.targets, sparse.masks):
        assert not t.param.detach()[~m].any()


def test_weights_written_behind_the_librarys_back_are_cleaned_on_the_next_step():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(model, opt, density=0.2, update_every=None, total_steps=10)
    weight = sparse.targets[0].param
    weight.data.fill_(3.0)  # .data bypasses autograd's version counter
    _train(model, opt, 1, sparse=sparse)  # asserts 0 outside the masks after the step


def test_a_step_that_fails_between_the_hooks_loses_no_gradient():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(model, opt, density=0.2, update_every=None, total_steps=10)
    F.cross_entropy(model(torch.randn(4, 12)), torch.zeros(4, dtype=torch.long)).backward()
    grads = [t.param.grad for t in sparse.targets]

    def fail(*args):
        raise RuntimeError("boom")

    handle = opt.register_step_pre_hook(fail)  # runs after the library's pre-hook
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    handle.remove()
    before = [t.param.detach().clone() for t in sparse.targets]
    opt.step()  # the held gradients are given back first, then this step uses them
    assert all(t.param.grad is g for t, g in zip(sparse.targets, grads))
    assert all(not torch.equal(t.param, b) for t, b in zip(sparse.targets, before))
    assert sparse.steps == 1


def test_detach_gives_held_gradients_back():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(model, opt, density=0.2, total_steps=10)
    F.cross_entropy(model(torch.randn(4, 12)), torch.zeros(4, dtype=torch.long)).backward()
    grads = [t.param.grad for t in sparse.targets]
    sparse._take_sgd_step(opt, (opt,), {})
    assert all(t.param.grad is None for t in sparse.targets)
    sparse.detach()
    assert all(t.param.grad is g for t, g in zip(sparse.targets, grads))


def test_fused_sgd_must_be_a_bool():
    with pytest.raises(SparseCoreError, match="fused_sgd must be True or False, got 'yes'"):
        st.attach(_mlp(), fused_sgd="yes")


def test_without_numba_steps_take_the_plain_path(tmp_path):
    """Numba is optional for the core: where it is missing, training is unchanged but unfused,
    and the mask updates run on the torch backend."""
    script = tmp_path / "no_numba.py"
    script.write_text(
        "import sys, warnings\n"
        "sys.modules['numba'] = None  # import numba now raises ImportError\n"
        "import torch, torch.nn.functional as F\n"
        "import sparsecore.torch as st\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.ReLU(), "
        "torch.nn.Linear(40, 3))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)\n"
        "sparse = st.attach(model, opt, density=0.2, update_every=2, total_steps=10)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(4):\n"
        "        opt.zero_grad()\n"
        "        F.cross_entropy(model(torch.randn(8, 12)), torch.zeros(8, dtype=torch.long))"
        ".backward()\n"
        "        opt.step()\n"
        "assert len(sparse.history) == 2 and sparse.last_update_backend == 'torch'\n"
        "assert all(not t.param.detach()[~m].any() for t, m in zip(sparse.targets, sparse.masks))\n"
        "messages = [str(w.message) for w in caught if 'fused SGD' in str(w.message)]\n"
        "assert len(messages) == 1 and 'import of numba' in messages[0], messages\n"
        "print('ok')\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@settings(max_examples=40, deadline=None)
@given(
    seed=hs.integers(0, 2**31 - 1),
    n=hs.integers(1, 300),
    lr=hs.floats(1e-6, 10.0),
    momentum=hs.one_of(hs.just(0.0), hs.floats(0.01, 0.999)),
    weight_decay=hs.one_of(hs.just(0.0), hs.floats(1e-6, 0.1)),
    dampening=hs.one_of(hs.just(0.0), hs.floats(0.0, 0.9)),
    nesterov=hs.booleans(),
    float64=hs.booleans(),
    scale=hs.sampled_from([1e-30, 1e-3, 1.0, 1e20]),
)
def test_kernel_equals_sgd_for_any_hyperparameters(
    seed, n, lr, momentum, weight_decay, dampening, nesterov, float64, scale
):
    """Arbitrary learning rates, momenta, decays and dampenings (rounded to the weights' dtype
    the way PyTorch rounds them), gradients from subnormal to huge: still bit for bit."""
    if nesterov and (momentum == 0.0 or dampening != 0.0):
        nesterov = False
    dtype = torch.float64 if float64 else torch.float32
    options = dict(momentum=momentum, weight_decay=weight_decay, dampening=dampening)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=gen) < 0.5
    start = torch.randn(n, generator=gen, dtype=dtype) * mask
    ref = start.clone().requires_grad_()
    opt = torch.optim.SGD([ref], lr=lr, nesterov=nesterov, **options)
    mine, state = start.clone(), {}
    for _ in range(2):
        grad = torch.randn(n, generator=gen, dtype=dtype) * scale
        ref.grad = grad.clone()
        opt.step()
        with torch.no_grad():
            ref.mul_(mask)
        fs.masked_sgd_step(mine, grad, mask, state, dict(lr=lr, nesterov=nesterov, **options))
        assert torch.equal(mine, ref.detach())
        if momentum:
            assert torch.equal(state["momentum_buffer"], opt.state[ref]["momentum_buffer"])


def test_a_cpu_whose_sgd_rounds_differently_turns_the_fused_step_off(monkeypatch):
    """The once-per-process self-check compares the loop with PyTorch's own SGD arithmetic; a
    loop that rounds differently (simulated: one ulp off) switches fusion off, with a warning."""
    exact = fs.masked_sgd_step

    def one_ulp_off(param, *args, **kwargs):
        exact(param, *args, **kwargs)
        param.copy_(torch.nextafter(param, torch.full_like(param, torch.inf)))

    assert fs._self_check() is None
    monkeypatch.setattr(fs, "masked_sgd_step", one_ulp_off)
    assert "rounds differently" in fs._self_check()
    monkeypatch.setattr(fs, "_AVAILABLE", None)
    with pytest.warns(RuntimeWarning, match="fused SGD .* is off .*rounds differently"):
        assert not fs.available()
    model, opt, sparse, fused_steps = _run("sgd", True, momentum=0.9)
    assert fused_steps == 0
    _same((model, opt, sparse, fused_steps), _run("sgd", False, momentum=0.9))


@pytest.mark.parametrize(
    "recast",
    [lambda b: b.double(), lambda b: b.t().contiguous().t() if b.dim() == 2 else b],
    ids=["float64_buffer", "transposed_buffer"],
)
def test_a_momentum_buffer_the_loop_cannot_write_takes_the_plain_path(recast):
    """The loop writes SGD's buffer through a pointer: a buffer of another dtype or layout
    (replaced by the user, say) must go through SGD's own step, with the same results."""
    runs = []
    for fused in (True, False):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sparse = st.attach(model, opt, density=0.2, update_every=4, total_steps=20, fused_sgd=fused)
        _train(model, opt, 1, sparse=sparse)
        for state in opt.state.values():
            state["momentum_buffer"] = recast(state["momentum_buffer"])
        _train(model, opt, 6, sparse=sparse)
        runs.append((model, opt, sparse))
    (ma, oa, _), (mb, ob, _) = runs
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)
        buf_a, buf_b = oa.state[pa]["momentum_buffer"], ob.state[pb]["momentum_buffer"]
        assert buf_a.dtype == buf_b.dtype and buf_a.stride() == buf_b.stride()
        assert torch.equal(buf_a, buf_b)
