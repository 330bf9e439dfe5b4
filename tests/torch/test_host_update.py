"""Mask updates of CPU parameters through the Numba backend (``update_backend='auto'``): the same
training, bit for bit, as with the torch backend, in every mode; the choice falls back where it
must, says why where it was asked for, and leaves PyTorch's thread count alone."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore.torch as st
from sparsecore.errors import SparseCoreError

MODES = [
    dict(),  # the paper's: magnitude pruning, momentum growth and redistribution
    dict(prune="SET", growth="random", redistribution="none"),
    dict(growth="gradient", redistribution="magnitude", init="ERK"),
    dict(growth="momentum_neuron", redistribution="nonzero", prune_schedule="linear"),
]


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 40),
        nn.ReLU(),
        nn.Linear(40, 5),
    ).to(dtype)


def _attach(backend: str, own: bool, dtype=torch.float32, **options):
    model = _model(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    kw = dict(density=0.2, update_every=3, total_steps=30, update_backend=backend)
    sparse = st.attach(model, None if own else opt, **{**kw, **options})
    return model, opt, sparse


def _train(model, opt, steps: int, gen: torch.Generator | None = None) -> None:
    gen = gen or torch.Generator().manual_seed(3)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=gen).to(dtype)
        y = torch.randint(0, 5, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()


def _assert_same(a, b) -> None:
    (ma, oa, sa), (mb, ob, sb) = a, b
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)
        for key, value in oa.state[pa].items():
            assert torch.equal(value, ob.state[pb][key]), key
    for x, y in zip(sa.masks, sb.masks):
        assert torch.equal(x, y)
    for x, y in zip(sa._own, sb._own):
        assert (x is None and y is None) or torch.equal(x, y)
    assert [r.to_dict() for r in sa.history] == [r.to_dict() for r in sb.history]
    for x, y in zip(sa.engine.ever_active, sb.engine.ever_active):
        assert isinstance(x, torch.Tensor) and torch.equal(x, y)


@pytest.mark.parametrize("own", [False, True], ids=["optimizer_momentum", "own_momentum"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(map(str, m.values())) or "paper")
def test_numba_updates_train_exactly_as_torch_updates(mode, own):
    runs = []
    for backend in ("auto", "torch"):
        run = _attach(backend, own, **mode)
        _train(run[0], run[1], 14)
        runs.append(run)
    assert runs[0][2].last_update_backend == "numba"
    assert runs[1][2].last_update_backend == "torch"
    assert len(runs[0][2].history) == 4
    _assert_same(runs[0], runs[1])


def test_channels_last_conv_weights_give_the_same_masks():
    """A channels-last convolution weight is not contiguous: its NumPy view is strided, and
    both backends must still number its positions in the same (logical) order."""
    runs = []
    for backend in ("auto", "torch"):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)
        ).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sparse = st.attach(
            model, opt, density=0.2, update_every=3, total_steps=30, update_backend=backend
        )
        assert not sparse.targets[0].param.is_contiguous()
        gen = torch.Generator().manual_seed(3)
        for _ in range(7):
            x = torch.randn(8, 3, 8, 8, generator=gen).to(memory_format=torch.channels_last)
            opt.zero_grad()
            F.cross_entropy(model(x), torch.randint(0, 5, (8,), generator=gen)).backward()
            opt.step()
        runs.append((model, opt, sparse))
    assert runs[0][2].last_update_backend == "numba" and len(runs[0][2].history) == 2
    _assert_same(runs[0], runs[1])


def test_float16_cpu_weights_take_the_numba_path():
    """float16 weights with the float32 own momentum the adapter keeps for them."""
    runs = [_attach(backend, True, torch.float16) for backend in ("numba", "torch")]
    for model, opt, _ in runs:
        _train(model, opt, 7)
    assert runs[0][2].last_update_backend == "numba"
    _assert_same(runs[0], runs[1])


def test_bfloat16_weights_fall_back_to_the_torch_backend_and_numba_says_why():
    model, opt, sparse = _attach("auto", True, torch.bfloat16)
    _train(model, opt, 4)
    assert sparse.last_update_backend == "torch" and len(sparse.history) == 1
    model = _model(torch.bfloat16)
    with pytest.raises(
        SparseCoreError,
        match=r"update_backend='numba' cannot be used: layer '0.weight': weight is torch.bfloat16",
    ):
        st.attach(model, update_backend="numba")
    st.attach(model, total_steps=10).detach()  # the refused attach changed nothing


def test_update_backend_must_be_known():
    with pytest.raises(SparseCoreError, match=r"update_backend must be one of .*got 'cupy'"):
        st.attach(_model(), update_backend="cupy")


def test_checkpoint_from_the_numba_path_resumes_on_the_torch_path():
    reference = _attach("auto", False)
    _train(reference[0], reference[1], 14)

    gen = torch.Generator().manual_seed(3)  # the uninterrupted run's batches, in two halves
    model, opt, sparse = _attach("auto", False)
    _train(model, opt, 7, gen)
    state = sparse.state_dict()
    assert all(isinstance(e, torch.Tensor) for e in state["engine"]["ever_active"])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparse": state}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    model, opt, sparse = _attach("torch", False)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sparse.load_state_dict(saved["sparse"])
    _train(model, opt, 7, gen)
    assert sparse.last_update_backend == "torch" and len(sparse.history) == 4
    for x, y in zip(sparse.masks, reference[2].masks):
        assert torch.equal(x, y)
    for pa, pb in zip(model.parameters(), reference[0].parameters()):
        assert torch.equal(pa, pb)


def _train_in_fresh_process(setup: str, attach_options: str, report: str) -> list[str]:
    """Four SGD steps of a small model attached with ``attach_options`` (two mask updates), in
    a new interpreter: what ``report`` (an expression list) prints, split into words."""
    code = (
        "import sys, torch, torch.nn.functional as F\n"
        f"{setup}\n"
        "import sparsecore.torch as st\n"
        "model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), "
        "torch.nn.Linear(20, 3))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)\n"
        "sparse = st.attach(model, opt, density=0.3, update_every=2, total_steps=10"
        f"{attach_options})\n"
        "for _ in range(4):\n"
        "    opt.zero_grad()\n"
        "    F.cross_entropy(model(torch.randn(8, 30)), torch.zeros(8, dtype=torch.long))"
        ".backward()\n"
        "    opt.step()\n"
        f"print(sparse.last_update_backend, len(sparse.history), {report})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_numba_updates_leave_the_torch_thread_count_alone():
    """Starting Numba's threads resets the OpenMP count PyTorch uses; the update puts it back
    (a fresh process: Numba starts its threads once per process)."""
    words = _train_in_fresh_process(
        "import numba; torch.set_num_threads(1)",
        "",
        "torch.get_num_threads(), numba.get_num_threads()",
    )
    assert words == ["numba", "2", "1", "1"]


def test_torch_updates_without_fused_steps_never_load_numba():
    """The documented way to keep Numba (about 110 MiB) out of a process."""
    words = _train_in_fresh_process(
        "", ", update_backend='torch', fused_sgd=False", "'numba' in sys.modules"
    )
    assert words == ["torch", "2", "False"]


@pytest.mark.parametrize(
    "which, tensor, reason",
    [
        ("grad", torch.zeros(4, 3).to_sparse(), "gradient is a torch.sparse_coo tensor"),
        (
            "momentum",
            torch.zeros(4, 3, dtype=torch.bfloat16),
            "momentum is torch.bfloat16 (NumPy has no such type)",
        ),
        ("weight", torch.zeros(4, 3, device="meta"), "weight is on meta, not the CPU"),
        ("grad", None, None),
    ],
)
def test_only_dense_cpu_tensors_of_numpy_types_take_the_numba_path(which, tensor, reason):
    from sparsecore.layers import Layer
    from sparsecore.torch import host_update as hu

    arrays = dict(weight=torch.zeros(4, 3), momentum=torch.zeros(4, 3), grad=torch.zeros(4, 3))
    arrays[which] = tensor
    layer = Layer("fc", arrays["weight"], torch.zeros(4, 3, dtype=torch.bool),
                  momentum=arrays["momentum"], grad=arrays["grad"])  # fmt: skip
    problem = hu.why_not_viewable([layer])
    assert problem == (None if reason is None else f"layer 'fc': {reason}")


def test_numba_asked_for_raises_when_an_update_cannot_take_it():
    """SGD's momentum buffers cast to bfloat16 beside float32 weights: 'auto' updates on the
    torch backend, 'numba' says why it cannot."""
    for backend in ("auto", "numba"):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sparse = st.attach(model, opt, density=0.2, update_every=2, total_steps=10,
                           update_backend=backend)  # fmt: skip
        _train(model, opt, 1)
        for state in opt.state.values():
            state["momentum_buffer"] = state["momentum_buffer"].to(torch.bfloat16)
        if backend == "auto":
            _train(model, opt, 1)
            assert sparse.last_update_backend == "torch" and len(sparse.history) == 1
        else:
            with pytest.raises(SparseCoreError, match=r"'numba' cannot be used: .*bfloat16"):
                _train(model, opt, 1)
