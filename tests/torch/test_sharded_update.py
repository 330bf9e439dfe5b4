"""The sharded mask update (FSDP2): every rank's part equals a single-process update, bit for bit.

Two and three real gloo processes (``sharded_worker.py``) run random layers with uneven and empty
shards, ties, all-zero momentum, subnormal values, every float type, every built-in
redistribution, min/max density and its errors, 4-, 8- and 16-bit digits, several groups; a
SparseEngine run of four updates; errors raised identically on every rank (NaN/Inf on one rank,
overlapping shards, a shard off its rows, different layer lists, an unsupported mode); and a
real FSDP2 model (``fully_shard`` on the gloo ranks, trained, its DTensors' local shards
updated and written back, twice). Each run is bounded in time (the process group's timeout is
60 s; a failing rank leaves at once).

In this process: the backend on whole layers of one process (equal to the packed update), in a
SparseEngine, and its errors. The exact sums it relies on are tested in test_exact_sum.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sample_layers import spread_layers

import sparsecore as sc
from sparsecore.errors import SparseCoreError
from sparsecore.torch import TorchBackend
from sparsecore.torch.sharded_update import Shard, ShardedBackend, ShardedUpdate, shard_of

WORKER = Path(__file__).with_name("sharded_worker.py")


# -- real processes --------------------------------------------------------------------------------


def run_ranks(tmp_path: Path, world: int, cases: int) -> list[dict]:
    init = tmp_path / "init"
    outs = [tmp_path / f"rank{r}.json" for r in range(world)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(init), str(outs[r]), str(cases)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=150)
            logs.append(out.decode())
    finally:
        for p in procs:  # a hung rank must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    for p in procs:
        assert p.returncode == 0, "\n".join(logs)
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.parametrize("world, cases", [(2, 50), (3, 16)])
def test_ranks_update_their_shards_like_one_process(tmp_path, world, cases):
    results = run_ranks(tmp_path, world, cases)
    for r in results:
        random = r["random"]
        assert random["cases"] == cases
        # the random cases reached what they are meant to: errors, empty shards, 4-bit digits
        assert random["errors"] > 0 and random["empty_shards"] > 0 and random["digit_bits_4"] > 0
        assert r["engine"]["updates"] == 4
        assert r["traffic"]["all_reduce"] == 19 and r["traffic"]["all_gather"] == 4
        assert r["errors_checked"] == 6
        assert r["fsdp"]["updates"] == 3
        assert r["fsdp"]["target"] == results[0]["fsdp"]["target"]
        assert r["doc_example"] == results[0]["doc_example"]  # docs/distributed.md ran
        assert r["doc_example"]["updates"] >= 3
    if world == 3:  # Linear(5, 2) over three ranks: the last rank holds none of its rows
        assert sum(r["fsdp"]["empty_shards"] for r in results) >= 1


# -- one process: whole layers -------------------------------------------------------------------


def whole(layers: list[sc.Layer]) -> list[sc.Layer]:
    out = []
    for x in layers:
        w = shard_of(x.weight)
        out.append(sc.Layer(x.name, w, w.like(x.mask), shard_of(x.momentum)))
    return out


@pytest.mark.parametrize("redistribution", ["momentum", "magnitude", "nonzero", "none"])
@pytest.mark.parametrize("digit_bits", [4, 8, 16])
def test_one_process_equals_the_packed_update(redistribution, digit_bits):
    layers = spread_layers(np.random.default_rng(3), torch.float32)
    options = dict(prune_rate=0.4, redistribution=redistribution, update_index=3, seed=5)
    want = sc.update(layers, backend=TorchBackend(fused=True), **options)
    backend = ShardedBackend(digit_bits=digit_bits, max_packed=500)  # layers in groups
    got = sc.update(whole(layers), backend=backend, **options)
    assert got.report == want.report and backend.packed_updates == 1
    assert want.weights is not None and got.weights is not None
    for a, b, c, d in zip(got.masks, want.masks, got.weights, want.weights):
        assert isinstance(a, Shard) and torch.equal(a.local, b)
        assert torch.equal(c.local, d) and c.local.dtype == d.dtype


def test_engine_runs_on_shards():
    layers = spread_layers(np.random.default_rng(4), torch.float32)
    names, shapes = [x.name for x in layers], [tuple(x.weight.shape) for x in layers]
    config = sc.SparseConfig.from_options(
        recipe="paper", density=0.3, update_every=1, total_steps=10
    )
    masks = [torch.from_numpy(m) for m in sc.SparseEngine(config, names, shapes).initial_masks()]
    layers = [sc.Layer(x.name, x.weight * m, m, x.momentum) for x, m in zip(layers, masks)]
    full, sharded = sc.SparseEngine(config, names, shapes), sc.SparseEngine(config, names, shapes)
    for step in (1, 2):
        want = full.update(layers, step, backend=TorchBackend(fused=True))
        got = sharded.update(whole(layers), step, backend=ShardedBackend())
        assert got.report == want.report
        assert [torch.equal(a.local, b) for a, b in zip(got.masks, want.masks)] == [True] * 3
        layers = [sc.Layer(x.name, w, m, x.momentum) for x, w, m in
                  zip(layers, want.weights or [], want.masks)]  # fmt: skip


def test_an_overflowing_float64_sum_gives_the_single_process_error():
    big = torch.full((4, 4), 1.5e308, dtype=torch.float64)
    mask = torch.ones(4, 4, dtype=torch.bool)
    layers = [sc.Layer("huge", big.clone(), mask, big.clone())]
    with pytest.raises(SparseCoreError) as want:
        sc.update(layers, prune_rate=0.5, backend=TorchBackend(fused=True))
    with pytest.raises(SparseCoreError) as got:
        sc.update(whole(layers), prune_rate=0.5, backend=ShardedBackend())
    assert "returned inf" in str(want.value) and str(got.value) == str(want.value)


def test_bad_shards_raise_naming_the_layer_and_the_rank():
    layers = whole(spread_layers(np.random.default_rng(5), torch.float32))
    x = layers[1]
    part = Shard(x.weight.local[:3], x.weight.shape, 0)  # 3 of 7 rows, no other process
    cases = {
        "do not hold each of its 315 positions exactly once": sc.Layer(
            x.name, part, part.like(x.mask.local[:3]), part.like(x.momentum.local[:3])
        ),
        "on rank 0, its mask or momentum is not placed like its weight": sc.Layer(
            x.name, part, x.mask, x.momentum
        ),
        "on rank 0, its local part does not hold whole rows of a layer of shape (7, 5, 3, 3)":
            sc.Layer(x.name, *(a.like(a.local.reshape(7, 45)) for a in (x.weight, x.mask,
                                                                         x.momentum))),
        "on rank 0, its shard (offset 45, 315 positions) does not start at a row": sc.Layer(
            x.name, *(Shard(a.local, a.shape, 45) for a in (x.weight, x.mask, x.momentum))
        ),
    }  # fmt: skip
    for message, bad in cases.items():
        with pytest.raises(SparseCoreError, match="layer 'l1'") as err:
            sc.update([layers[0], bad, layers[2]], prune_rate=0.5, backend=ShardedBackend())
        assert message in str(err.value)


@pytest.mark.parametrize("options", [{"prune": "SET"}, {"growth": "momentum_neuron"},
                                     {"growth": "random"}, {"growth": "gradient"}])  # fmt: skip
def test_modes_a_shard_cannot_run_are_refused(options):
    layers = whole(spread_layers(np.random.default_rng(6), torch.float32))
    layers = [sc.Layer(x.name, x.weight, x.mask, x.momentum, grad=x.momentum) for x in layers]
    before = [a.local.clone() for x in layers for a in (x.weight, x.mask, x.momentum)]
    with pytest.raises(SparseCoreError, match="not available on sharded layers: the sharded "
                       "update runs magnitude pruning with momentum growth"):  # fmt: skip
        sc.update(layers, prune_rate=0.5, backend=ShardedBackend(), **options)
    after = [a.local for x in layers for a in (x.weight, x.mask, x.momentum)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_the_sharded_update_is_offered_as_a_fused_update():
    from sparsecore.fusion import FusedUpdate, fused_update_of

    backend = ShardedBackend()
    offered = fused_update_of(backend)
    assert isinstance(offered, ShardedUpdate) and isinstance(offered, FusedUpdate)
    assert offered.backend is backend
    assert (offered.prune, offered.growth) == ({"magnitude"}, {"momentum"})
    assert dict(offered.importance) == {"momentum": "momentum", "magnitude": "weight",
                                        "nonzero": None}  # fmt: skip


def test_options_are_checked():
    for bad in ({"digit_bits": 5}, {"max_chunk": 12}, {"max_packed": 0}):
        with pytest.raises(ValueError):
            ShardedBackend(**bad)
    assert ShardedBackend().world == 1 and ShardedBackend().rank == 0


def test_plain_tensors_are_whole_layers_and_writes_reach_them():
    w = torch.randn(5, 3, requires_grad=True)
    s = shard_of(w)
    assert s.shape == (5, 3) and s.offset == 0 and s.size == 15 and not s.local.requires_grad
    s.local.zero_()
    assert bool((w == 0).all())
