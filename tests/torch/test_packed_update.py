"""The torch backend's packed update equals the NumPy reference, bit for bit, in few host reads.

The packed update (:mod:`sparsecore.torch.packed_update`) is the torch backend's fused
capability: magnitude pruning and momentum growth of all layers at once, by a segmented radix
select over integer keys. It runs by default on CUDA tensors; ``TorchBackend(fused=True)`` runs
the very same tensor operations on CPU tensors, which is how this suite checks it: masks, new
weights and reports against the NumPy reference's generic update, over tie-heavy values (small
integers, -0.0, all zeros), subnormal values, float16/bfloat16/float32/float64 (weights and
momentum of different types too), empty and full masks, every built-in redistribution,
min/max density, and rows of the packed matrix from 1 position (every layer spans many rows) to
4096. The same tests run on CUDA where a GPU is present.

A wrong "few host reads" claim is caught on CPU too: a dispatch mode records every operation that
must bring a value back to the host (``.item()``, ``nonzero``, boolean indexing, ...), and the
packed path's own reads are counted.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import sparsecore as sc
from sparsecore.backend_numpy import NumpyBackend
from sparsecore.errors import SparseCoreError
from sparsecore.torch import packed_update as pu
from sparsecore.torch.backend import TorchBackend, _counts_in_one_read

REFERENCE = NumpyBackend()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = ["float16", "bfloat16", "float32", "float64"]
REDISTRIBUTION = ["momentum", "magnitude", "nonzero", "none"]
SETTINGS = settings(
    max_examples=int(os.environ.get("SPARSECORE_MAX_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def backend_for(device: str, max_chunk: int = pu.MAX_CHUNK, max_packed: int = 1 << 26) -> Any:
    """The packed path on ``device``: the default choice on CUDA, forced on the CPU."""
    fused = True if device == "cpu" else None
    return TorchBackend(fused=fused, max_chunk=max_chunk, max_packed=max_packed)


# -- inputs: torch layers and their NumPy twins ----------------------------------------------------


def torch_values(values: np.ndarray, dtype: str, device: str) -> tuple[torch.Tensor, np.ndarray]:
    """``values`` as a tensor of ``dtype``, and the same values as the NumPy reference sees
    them (bfloat16, which NumPy lacks, as float32: the widening is exact)."""
    t = torch.from_numpy(np.ascontiguousarray(values)).to(getattr(torch, dtype))
    ref = t.float().numpy() if dtype == "bfloat16" else t.numpy()
    return t.to(device), ref.copy()


@st.composite
def raw_values(draw: Any, size: int) -> tuple[np.ndarray, bool]:
    """float64 values and whether sums of their magnitudes are exact in any order: normal
    values, tie-heavy halves with -0.0, all zeros, or float32/float16 subnormals among zeros."""
    kind = draw(st.sampled_from(["normal", "small", "zeros", "subnormal"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "normal":
        return rng.standard_normal(size), False
    if kind == "small":
        out = rng.integers(-4, 5, size) / 2.0
        out[rng.random(size) < 0.2] = -0.0
        return out, True
    if kind == "zeros":
        return np.zeros(size), True
    tiny = 2.0**-149 if draw(st.booleans()) else 2.0**-24  # float32's / float16's smallest
    out = rng.integers(-3, 4, size) * tiny
    out[rng.random(size) < 0.3] = 0.0
    return out, True


@st.composite
def layer_sets(draw: Any, device: str) -> tuple[list[sc.Layer], list[sc.Layer], bool]:
    """One to four layers (torch on ``device``, NumPy twins) and whether sums are exact."""
    w_dtype = draw(st.sampled_from(DTYPES))
    p_dtype = draw(st.one_of(st.just(w_dtype), st.sampled_from(DTYPES)))
    torch_layers, numpy_layers, exact = [], [], True
    for i in range(draw(st.integers(1, 4))):
        shape = draw(
            st.one_of(
                st.tuples(st.integers(1, 40), st.sampled_from([1, 3, 17, 250])),
                st.tuples(st.integers(1, 8), st.integers(1, 6), st.just(3), st.just(3)),
            )
        )
        size = math.prod(shape)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        density = draw(st.sampled_from([0.0, 1.0, 0.05, 0.3, 0.7]))
        mask = (rng.random(shape) < density) if 0 < density < 1 else np.full(shape, density > 0)
        w_raw, w_exact = draw(raw_values(size))
        p_raw, p_exact = draw(raw_values(size))
        exact = exact and w_exact and p_exact
        weight, weight_ref = torch_values(w_raw.reshape(shape) * mask, w_dtype, device)
        momentum, momentum_ref = torch_values(p_raw.reshape(shape), p_dtype, device)
        t_mask = torch.from_numpy(mask).to(device)
        torch_layers.append(sc.Layer(f"layer{i}", weight, t_mask, momentum))
        numpy_layers.append(sc.Layer(f"layer{i}", weight_ref, mask, momentum_ref))
    return torch_layers, numpy_layers, exact


def snapshot(layers: list[sc.Layer]) -> list[bytes]:
    return [
        a.detach().cpu().view(torch.uint8).numpy().tobytes()
        for x in layers
        for a in (x.weight, x.mask, x.momentum)
    ]


def as_reference_bits(t: torch.Tensor) -> bytes:
    """A result tensor's bytes as the reference's type has them (bfloat16 widened exactly)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def assert_same_as_reference(
    torch_layers: list[sc.Layer],
    numpy_layers: list[sc.Layer],
    backend: TorchBackend,
    exact: bool,
    **options: Any,
) -> sc.UpdateResult:
    """The packed update against NumPy's generic update and apply: masks, weights, report."""
    before = snapshot(torch_layers)
    want = sc.update(numpy_layers, backend=REFERENCE, **options)
    want_weights = sc.apply_masks(numpy_layers, want.masks, backend=REFERENCE)
    done = backend.packed_updates
    got = sc.update(torch_layers, backend=backend, **options)
    assert snapshot(torch_layers) == before, "the update changed its inputs"
    assert got.weights is not None and backend.packed_updates == done + 1, "not the packed path"
    for layer, m_want, m_got, w_want, w_got in zip(
        torch_layers, want.masks, got.masks, want_weights, got.weights
    ):
        assert m_got.dtype == torch.bool and m_got.shape == layer.mask.shape
        assert m_got.device == layer.mask.device
        np.testing.assert_array_equal(m_got.cpu().numpy(), m_want, err_msg=layer.name)
        assert w_got.dtype == layer.weight.dtype and w_got.shape == layer.weight.shape
        assert as_reference_bits(w_got) == w_want.tobytes(), f"{layer.name}: weights differ"
    if exact:  # sums of these values are exact in any order: the whole report is identical
        assert got.report == want.report
    else:
        for have, ref in zip(got.report.layers, want.report.layers):
            assert math.isclose(have.importance, ref.importance, rel_tol=1e-12, abs_tol=0.0)
            assert math.isclose(have.share, ref.share, rel_tol=1e-12, abs_tol=1e-300)
            same = {k: v for k, v in vars(have).items() if k not in ("importance", "share")}
            assert same == {k: v for k, v in vars(ref).items() if k not in ("importance", "share")}
    return got


# -- equality with the reference ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(
    data=st.data(),
    redistribution=st.sampled_from(REDISTRIBUTION),
    rate=st.sampled_from([0.0, 0.1, 0.5, 0.97, 1.0]),
    densities=st.sampled_from([(0.0, 1.0), (0.0, 0.5), (0.2, 1.0), (0.3, 0.6)]),
    seed=st.integers(0, 2**31 - 1),
    update_index=st.integers(1, 50),
    max_chunk=st.sampled_from([4096, 16, 1]),
    max_packed=st.sampled_from([1 << 26, 300]),
)
def test_packed_update_equals_numpy(
    device, data, redistribution, rate, densities, seed, update_index, max_chunk, max_packed
):
    torch_layers, numpy_layers, exact = data.draw(layer_sets(device))
    min_density, max_density = densities
    options = dict(
        prune_rate=rate, update_index=update_index, seed=seed, redistribution=redistribution,
        min_density=min_density, max_density=max_density,
    )  # fmt: skip
    backend = backend_for(device, max_chunk, max_packed)  # 300: layers in several groups
    try:
        sc.update(numpy_layers, backend=REFERENCE, **options)
    except SparseCoreError as err:  # e.g. max_density leaves no room: same error, same message
        with pytest.raises(SparseCoreError) as got:
            sc.update(torch_layers, backend=backend, **options)
        assert str(got.value) == str(err)
        return
    assert_same_as_reference(torch_layers, numpy_layers, backend, exact, **options)


def large_layers(device: str, momentum: str, dtype: str = "float32") -> tuple[list, list]:
    """Layers of real sizes (many 4096-position rows): normal weights, chosen momentum."""
    rng = np.random.default_rng(3)
    torch_layers, numpy_layers = [], []
    for i, shape in enumerate([(256, 128, 3, 3), (1000, 300), (7, 13)]):
        mask = rng.random(shape) < 0.1
        w = rng.standard_normal(shape) * mask
        if momentum == "normal":
            p = rng.standard_normal(shape)
        elif momentum == "zeros":
            p = np.zeros(shape)
        else:
            p = rng.integers(-2, 3, shape).astype(np.float64)
        weight, weight_ref = torch_values(w, dtype, device)
        mom, mom_ref = torch_values(p, dtype, device)
        torch_layers.append(sc.Layer(f"big{i}", weight, torch.from_numpy(mask).to(device), mom))
        numpy_layers.append(sc.Layer(f"big{i}", weight_ref, mask, mom_ref))
    return torch_layers, numpy_layers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "momentum, dtype",
    [("normal", "float32"), ("zeros", "float32"), ("ints", "float16"), ("normal", "float64")],
)
def test_large_layers_equal_reference(device, momentum, dtype):
    """All-zero momentum (growth decided by the hash alone), integer ties, float64's six rounds."""
    torch_layers, numpy_layers = large_layers(device, momentum, dtype)
    got = assert_same_as_reference(
        torch_layers, numpy_layers, backend_for(device), momentum != "normal",
        prune_rate=0.5, update_index=4, seed=9,
    )  # fmt: skip
    assert all(layer.grown > 0 for layer in got.report.layers[:2])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5),
    wide=st.booleans(),
    max_chunk=st.sampled_from([1, 8, 4096]),
    data=st.data(),
)
def test_select_smallest_equals_a_sort(seed, sizes, wide, max_chunk, data):
    """The segmented radix select against argsort, for keys of one or two words (the second
    word's digits below the first's), any candidate set and any k from 0 to all of them."""
    rng = np.random.default_rng(seed)
    layout = pu.layout_for(sizes, torch.device("cpu"), max_chunk)
    high = np.zeros((layout.chunks, layout.chunk), np.int64)
    low = np.zeros_like(high)
    candidates = np.zeros(high.shape, bool)
    ks, expected = [], np.zeros(high.shape, bool)
    for i, n in enumerate(sizes):
        h = rng.integers(0, 4 if data.draw(st.booleans()) else 2**62, n)  # ties or spread
        h = h if wide else h & 0xFFFF
        # distinct, so keys never tie; a permutation of 0..n-1 includes the all-zero key
        lo = rng.choice(2**32, n, replace=False) if data.draw(st.booleans()) else rng.permutation(n)
        cand = rng.random(n) < data.draw(st.sampled_from([0.0, 0.3, 1.0]))
        k = data.draw(st.integers(0, int(cand.sum())))
        ks.append(k)
        start = layout.starts[i]
        for arr, values in ((high, h), (low, lo), (candidates, cand)):
            arr.reshape(-1)[start : start + n] = values
        order = np.lexsort((lo[cand], h[cand]))
        chosen = np.zeros(n, bool)
        chosen[np.flatnonzero(cand)[order[:k]]] = True
        expected.reshape(-1)[start : start + n] = chosen
    digits = [
        (torch.from_numpy(high), 64 if wide else 16),
        (torch.from_numpy(low).to(torch.int32), 32),
    ]
    got = pu.select_smallest(digits, torch.from_numpy(candidates), torch.tensor(ks), layout)
    np.testing.assert_array_equal(got.numpy(), expected)


# -- bad inputs, and when the packed path runs ---------------------------------------------------


def small_layers(device: str = "cpu", dtype: str = "float32") -> tuple[list, list]:
    rng = np.random.default_rng(2)
    torch_layers, numpy_layers = [], []
    for i, shape in enumerate([(30, 40), (20, 10), (9, 9)]):
        mask = rng.random(shape) < 0.3
        weight, weight_ref = torch_values(rng.standard_normal(shape) * mask, dtype, device)
        mom, mom_ref = torch_values(rng.standard_normal(shape), dtype, device)
        torch_layers.append(sc.Layer(f"l{i}", weight, torch.from_numpy(mask).to(device), mom))
        numpy_layers.append(sc.Layer(f"l{i}", weight_ref, mask, mom_ref))
    return torch_layers, numpy_layers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["active weight", "inactive weight", "momentum"])
@pytest.mark.parametrize("redistribution", ["momentum", "magnitude"])
def test_non_finite_inputs_raise_the_generic_error(device, dtype, bad, where, redistribution):
    torch_layers, numpy_layers = small_layers(device, dtype)
    for layers in (torch_layers, numpy_layers):
        target = layers[1]
        if where == "momentum":
            target.momentum[3, 4] = bad
        else:
            mask = target.mask if isinstance(target.mask, np.ndarray) else target.mask.cpu().numpy()
            position = tuple(np.argwhere(mask if where == "active weight" else ~mask)[0])
            target.weight[position] = bad
    before = snapshot(torch_layers)
    options = dict(prune_rate=0.5, redistribution=redistribution)
    with pytest.raises(SparseCoreError) as want:
        sc.update(numpy_layers, backend=REFERENCE, **options)
    with pytest.raises(SparseCoreError) as got:
        sc.update(torch_layers, backend=backend_for(device), **options)
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)
    assert snapshot(torch_layers) == before


def test_which_updates_take_the_packed_path():
    torch_layers, _ = small_layers()
    packed = TorchBackend(fused=True)
    assert sc.update(torch_layers, prune_rate=0.5, backend=packed).weights is not None
    for options in ({"growth": "random"}, {"prune": "SET"}, {"growth": "momentum_neuron"}):
        assert sc.update(torch_layers, prune_rate=0.5, backend=packed, **options).weights is None
    assert packed.packed_updates == 1
    # CPU tensors: the per-layer path by default (faster there), never with fused=False
    for backend in (TorchBackend(), TorchBackend(fused=False)):
        assert sc.update(torch_layers, prune_rate=0.5, backend=backend).weights is None
        assert backend.packed_updates == 0
    # arrays on two devices cannot be packed together
    meta = [sc.Layer(x.name, x.weight, x.mask, x.momentum.to("meta")) for x in torch_layers]
    assert not packed.packs(meta)


def test_options_are_checked():
    with pytest.raises(ValueError, match="power of two"):
        TorchBackend(max_chunk=12)
    with pytest.raises(ValueError, match="positive"):
        TorchBackend(max_packed=0)


def test_groups_hold_at_most_max_packed_weights_or_one_layer():
    layers = [sc.Layer(f"l{i}", torch.zeros(n), torch.zeros(n, dtype=torch.bool)) for i, n in
              enumerate([5, 5, 20, 3, 3, 3])]  # fmt: skip
    groups = TorchBackend(max_packed=10).groups(layers)
    assert groups == [slice(0, 2), slice(2, 3), slice(3, 6)]
    assert TorchBackend().groups(layers) == [slice(0, 6)]


@pytest.mark.parametrize("device", DEVICES)
def test_counts_in_one_read_are_exact(device):
    rng = np.random.default_rng(5)
    masks = [torch.from_numpy(rng.random(n) < p).to(device) for n, p in [(1, 1.0), (70001, 0.3)]]
    masks.append(masks[1][::3])  # a strided view
    expected = [int(torch.count_nonzero(m)) for m in masks]
    assert _counts_in_one_read(masks) == expected
    assert TorchBackend().counts(masks) == expected


# -- host reads ------------------------------------------------------------------------------------


class HostReads(TorchDispatchMode):
    """Records the operations that must wait for the device to return a value to the host."""

    SYNCING: ClassVar[set[str]] = {
        "aten._local_scalar_dense.default",  # .item(), int(), float(), bool() of a tensor
        "aten.nonzero.default",
        "aten.masked_select.default",
        "aten.bincount.default",
        "aten.unique_dim.default",
        "aten._unique2.default",
        "aten.repeat_interleave.Tensor",
    }

    def __init__(self) -> None:
        super().__init__()
        self.syncing: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        bool_index = name == "aten.index.Tensor" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        )
        if not self.paused and (name in self.SYNCING or bool_index):
            self.syncing.append(name)
        return func(*args, **(kwargs or {}))


@contextmanager
def counted_reads() -> Iterator[dict[str, Any]]:
    """Counts the packed path's reads and the backend's one-read counts, and records every
    other syncing operation (the counted reads themselves run unrecorded)."""
    out: dict[str, Any] = {"reads": 0, "syncing": []}
    mode = HostReads()

    def counted(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out["reads"] += 1
            mode.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                mode.paused = False

        return wrapper

    with pytest.MonkeyPatch.context() as patch, mode:
        patch.setattr(pu, "read", counted(pu.read))
        patch.setattr(TorchBackend, "counts", counted(TorchBackend.counts))
        # the dead-unit answers of every layer (mask and momentum), in one read as well
        patch.setattr(TorchBackend, "units_nonzero", counted(TorchBackend.units_nonzero))
        yield out
    out["syncing"] = mode.syncing


def sct_attach(model: torch.nn.Module, optimizer: Any, **options: Any) -> Any:
    """``attach`` at density 0.2 with a mask update every third step, with the paper's modes
    (magnitude pruning, momentum growth: the ones the packed path computes)."""
    import sparsecore.torch as sct

    return sct.attach(
        model, optimizer, density=0.2, update_every=3, total_steps=100, recipe="paper", **options
    )


def many_layers(count: int) -> list[sc.Layer]:
    rng = np.random.default_rng(count)
    layers = []
    for i in range(count):
        shape = (int(rng.integers(1, 50)), int(rng.integers(1, 50)))
        mask = torch.from_numpy(rng.random(shape) < 0.2)
        weight = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) * mask
        layers.append(sc.Layer(f"l{i}", weight, mask, torch.randn(shape)))
    return layers


@pytest.mark.parametrize("count", [1, 25])
def test_an_update_reads_the_host_twice_whatever_the_number_of_layers(count):
    layers = many_layers(count)
    backend = TorchBackend(fused=True)
    with counted_reads() as seen:
        sc.update(layers, prune_rate=0.5, backend=backend)
    assert seen == {"reads": 3, "syncing": []}  # the scan, prune-and-regrow, the dead units
    # groups of at most max_packed weights: two reads per group
    grouped = TorchBackend(fused=True, max_packed=sum(x.mask.numel() for x in layers) // 3 + 1)
    groups = len(grouped.groups(layers))
    assert groups == 1 if count == 1 else groups >= 3
    with counted_reads() as seen:
        sc.update(layers, prune_rate=0.5, backend=grouped)
    assert seen == {"reads": 2 * groups + 1, "syncing": []}

    config = sc.SparseConfig.from_options(recipe="paper", density=0.2)
    engine = sc.SparseEngine(config, [x.name for x in layers],
                             [tuple(x.mask.shape) for x in layers])  # fmt: skip
    masks = [torch.from_numpy(m) for m in engine.initial_masks()]
    layers = [sc.Layer(x.name, x.weight * m, m, x.momentum) for x, m in zip(layers, masks)]
    with counted_reads() as seen:
        engine.update(layers, step=1, backend=backend, prune_rate=0.5)
    # the engine's check of the total, the scan, prune-and-regrow, the dead units, the
    # ever-active counts
    assert seen == {"reads": 5, "syncing": []}


def test_an_attach_update_reads_the_host_five_times(monkeypatch):
    """Inside training, through the adapter (the packed path forced on CPU tensors, as CUDA
    tensors get it): the optimizer step that runs a mask update reads the host five times."""
    from sparsecore.torch import adapter

    packed = TorchBackend(fused=True)
    monkeypatch.setattr(adapter, "_BACKEND", packed)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(20, 20) for _ in range(12)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = sct_attach(model, optimizer, update_backend="torch", fused_sgd=False)
    x = torch.randn(8, 20)
    for step in range(1, 7):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        if step % 3:
            optimizer.step()
            continue
        with counted_reads() as seen:
            optimizer.step()
        assert seen == {"reads": 5, "syncing": []}, f"step {step}"
    assert packed.packed_updates == 2 and sparse.last_update_backend == "torch"


@pytest.mark.gpu
def test_a_cuda_update_synchronises_five_times():
    """On the device itself: CUDA's own count of synchronising calls during an engine update."""
    layers = [
        sc.Layer(x.name, x.weight.cuda(), x.mask.cuda(), x.momentum.cuda()) for x in many_layers(30)
    ]
    config = sc.SparseConfig.from_options(recipe="paper", density=0.2)
    engine = sc.SparseEngine(config, [x.name for x in layers],
                             [tuple(x.mask.shape) for x in layers])  # fmt: skip
    masks = [torch.from_numpy(m).cuda() for m in engine.initial_masks()]
    layers = [sc.Layer(x.name, x.weight * m, m, x.momentum) for x, m in zip(layers, masks)]
    backend = TorchBackend()
    engine.update(layers, step=1, backend=backend, prune_rate=0.5)  # builds the layout
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = engine.update(layers, step=2, backend=backend, prune_rate=0.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [
        f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)
    ]
    assert result.weights is not None and backend.packed_updates == 2
    assert len(syncs) <= 5, "\n".join(syncs)


@pytest.mark.gpu
def test_attach_on_cuda_takes_the_packed_path():
    from sparsecore.torch import adapter

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(20, 20) for _ in range(3))).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = sct_attach(model, optimizer)
    before = adapter._BACKEND.packed_updates
    x = torch.randn(8, 20, device="cuda")
    for _ in range(6):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    assert adapter._BACKEND.packed_updates == before + 2 and len(sparse.history) == 2
    assert sparse.last_update_backend == "torch"
    assert sum(int(sparse.mask(f"{i}.weight").sum()) for i in range(3)) == round(0.2 * 1200)
