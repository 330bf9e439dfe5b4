"""One rank of the sharded-update tests (run by test_sharded_update.py: real gloo processes).

Usage: sharded_worker.py RANK WORLD INIT_FILE OUT_FILE CASES. Every rank builds the same whole
layers from a seed, keeps its own rows, runs the sharded update, and compares its part with a
single-process packed update of the whole tensors that it computes itself (no gathering: every
rank knows the whole inputs). Then a SparseEngine run over several updates, the errors (the same
on every rank, nothing changed), and a real FSDP2 model (``fully_shard`` on the gloo ranks).

A failed check prints the case and leaves at once (``os._exit(1)``): the other ranks then fail
on the broken connection instead of waiting for the process group's timeout.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import sparsecore as sc
from sparsecore.errors import NonFiniteError, SparseCoreError
from sparsecore.torch import TorchBackend
from sparsecore.torch.sharded_update import Shard, ShardedBackend, shard_of

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
REDISTRIBUTION = ["momentum", "magnitude", "nonzero", "none"]


# -- whole layers, the same on every rank --------------------------------------------------------


def values(rng: np.random.Generator, size: int) -> np.ndarray:
    """Normal values, tie-heavy halves with -0.0, all zeros, or subnormal values among zeros."""
    kind = rng.choice(["normal", "small", "zeros", "subnormal"])
    if kind == "normal":
        return rng.standard_normal(size)
    if kind == "small":
        out = rng.integers(-4, 5, size) / 2.0
        out[rng.random(size) < 0.2] = -0.0
        return out
    if kind == "zeros":
        return np.zeros(size)
    out = rng.integers(-3, 4, size) * (2.0**-149 if rng.random() < 0.5 else 2.0**-24)
    out[rng.random(size) < 0.3] = 0.0
    return out


def whole_layers(rng: np.random.Generator, world: int) -> list[sc.Layer]:
    w_dtype = DTYPES[rng.integers(4)]
    p_dtype = w_dtype if rng.random() < 0.5 else DTYPES[rng.integers(4)]
    layers = []
    for i in range(int(rng.integers(1, 5))):
        rows = int(rng.choice([1, world - 1, world, world + 1, 2 * world + 1, 37]))
        rows = max(rows, 1)
        rest = [(1,), (3,), (17,), (250,), (2, 3, 3)][rng.integers(5)]
        shape = (rows, *rest)
        density = rng.choice([0.0, 1.0, 0.05, 0.3, 0.7])
        mask = rng.random(shape) < density if 0 < density < 1 else np.full(shape, density > 0)
        w = values(rng, math.prod(shape)).reshape(shape) * mask
        p = values(rng, math.prod(shape)).reshape(shape)
        layers.append(
            sc.Layer(
                f"layer{i}",
                torch.from_numpy(w).to(w_dtype),
                torch.from_numpy(mask),
                torch.from_numpy(p).to(p_dtype),
            )
        )
    return layers


def row_split(rng: np.random.Generator, rows: int, world: int, chunked: bool) -> list[int]:
    """First row of each rank (and ``rows`` at the end): FSDP's torch.chunk layout, or random
    cut points (empty shards anywhere)."""
    if chunked:
        per = -(-rows // world)
        return [min(r * per, rows) for r in range(world)] + [rows]
    cuts = sorted(int(c) for c in rng.integers(0, rows + 1, world - 1))
    return [0, *cuts, rows]


def my_shard(tensor: torch.Tensor, cuts: list[int], rank: int) -> Shard:
    row = math.prod(tensor.shape[1:])
    return Shard(tensor[cuts[rank] : cuts[rank + 1]].clone(), tuple(tensor.shape), cuts[rank] * row)


def sharded(layers: list[sc.Layer], splits: list[list[int]], rank: int) -> list[sc.Layer]:
    out = []
    for layer, cuts in zip(layers, splits):
        w = my_shard(layer.weight, cuts, rank)
        out.append(
            sc.Layer(
                layer.name,
                w,
                w.like(layer.mask[cuts[rank] : cuts[rank + 1]].clone()),
                w.like(layer.momentum[cuts[rank] : cuts[rank + 1]].clone()),
            )
        )
    return out


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def snapshot(layers: list[sc.Layer]) -> list[bytes]:
    return [bits(a.local) for x in layers for a in (x.weight, x.mask, x.momentum)]


def assert_parts_equal(got: Any, want: Any, splits: list[list[int]], rank: int, what: str) -> None:
    """Every rank's part of the sharded result is its rows of the single-process result."""
    assert got.report == want.report, f"{what}: reports differ\n{got.report}\n{want.report}"
    assert got.weights is not None and want.weights is not None
    for i, cuts in enumerate(splits):
        rows = slice(cuts[rank], cuts[rank + 1])
        m, w = got.masks[i], got.weights[i]
        assert isinstance(m, Shard) and isinstance(w, Shard)
        assert m.local.dtype == torch.bool and w.local.dtype == want.weights[i].dtype
        assert bits(m.local) == bits(want.masks[i][rows]), f"{what}: layer {i} masks differ"
        assert bits(w.local) == bits(want.weights[i][rows]), f"{what}: layer {i} weights differ"


# -- the checks -----------------------------------------------------------------------------------


def random_cases(rank: int, world: int, count: int) -> dict[str, int]:
    seen = {"cases": 0, "errors": 0, "empty_shards": 0, "digit_bits_4": 0}
    for case in range(count):
        rng = np.random.default_rng([world, case])
        layers = whole_layers(rng, world)
        chunked = bool(rng.random() < 0.5)
        splits = [row_split(rng, x.weight.shape[0], world, chunked) for x in layers]
        mine = sharded(layers, splits, rank)
        min_density, max_density = [(0.0, 1.0), (0.0, 0.5), (0.2, 1.0), (0.3, 0.6)][rng.integers(4)]
        options = dict(
            prune_rate=float(rng.choice([0.0, 0.1, 0.5, 0.97, 1.0])),
            update_index=int(rng.integers(1, 50)),
            seed=int(rng.integers(0, 2**31 - 1)),
            redistribution=REDISTRIBUTION[rng.integers(4)],
            min_density=min_density,
            max_density=max_density,
        )
        max_chunk = int(rng.choice([4096, 16, 1]))
        digit_bits = int(rng.choice([4, 8, 16]))
        backend = ShardedBackend(
            digit_bits=digit_bits, max_chunk=max_chunk, max_packed=int(rng.choice([1 << 26, 40]))
        )
        what = f"case {case} ({options}, digit_bits={digit_bits}, max_chunk={max_chunk})"
        before = snapshot(mine)
        try:
            want = sc.update(
                layers, backend=TorchBackend(fused=True, max_chunk=max_chunk), **options
            )
        except SparseCoreError as err:  # e.g. max_density leaves no room: same error everywhere
            try:
                sc.update(mine, backend=backend, **options)
            except SparseCoreError as got:
                assert str(got) == str(err), f"{what}: {got} != {err}"
            else:
                raise AssertionError(f"{what}: no error, expected {err}") from None
            seen["errors"] += 1
        else:
            got = sc.update(mine, backend=backend, **options)
            assert_parts_equal(got, want, splits, rank, what)
            assert backend.packed_updates == 1, what
        assert snapshot(mine) == before, f"{what}: the update changed its inputs"
        seen["cases"] += 1
        seen["empty_shards"] += sum(c[r] == c[r + 1] for c in splits for r in range(world))
        seen["digit_bits_4"] += digit_bits == 4
    return seen


def engine_run(rank: int, world: int) -> dict[str, Any]:
    """SparseEngine over four updates on a changing model: ever-active counts and history too."""
    rng = np.random.default_rng([world, 1000])
    shapes = [(7, 30), (world + 1, 5, 3, 3), (1, 64), (50, 11)]
    names = [f"w{i}" for i in range(len(shapes))]
    config = sc.SparseConfig.from_options(
        recipe="paper", density=0.15, total_steps=40, update_every=10, seed=3
    )
    full_engine = sc.SparseEngine(config, names, shapes)
    sharded_engine = sc.SparseEngine(config, names, shapes)
    masks = [torch.from_numpy(m) for m in full_engine.initial_masks()]
    weights = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in
               enumerate(shapes)]  # fmt: skip
    weights = [w * m for w, m in zip(weights, masks)]
    momenta = [torch.zeros(s) for s in shapes]  # all-zero at first: growth by the hash alone
    splits = [row_split(rng, s[0], world, chunked=i % 2 == 0) for i, s in enumerate(shapes)]
    local_masks = [m[c[rank] : c[rank + 1]].clone() for m, c in zip(masks, splits)]
    backend = ShardedBackend()
    for step in (10, 20, 30, 40):
        full = [sc.Layer(n, w, m, p) for n, w, m, p in zip(names, weights, masks, momenta)]
        mine = []
        for n, w, lm, p, c in zip(names, weights, local_masks, momenta, splits):
            shard = my_shard(w, c, rank)
            mine.append(sc.Layer(n, shard, shard.like(lm), my_shard(p, c, rank)))
        want = full_engine.update(full, step, backend=TorchBackend(fused=True))
        got = sharded_engine.update(mine, step, backend=backend)
        assert_parts_equal(got, want, splits, rank, f"engine step {step}")
        assert got.report.extra == want.report.extra, (got.report.extra, want.report.extra)
        masks, weights = list(want.masks), list(want.weights or [])
        local_masks = [m.local for m in got.masks]
        # "training": new weights at active positions, momentum from the same generator
        g = torch.Generator().manual_seed(step)
        momenta = [0.9 * p + torch.randn(p.shape, generator=g) for p in momenta]
        weights = [(w + 0.01 * torch.randn(w.shape, generator=g)) * m for w, m in
                   zip(weights, masks)]  # fmt: skip
    assert full_engine.history[-1] == sharded_engine.history[-1]
    return {"updates": sharded_engine.updates, "nnz": sharded_engine.history[-1].total_nnz}


def traffic(rank: int, world: int) -> dict[str, int]:
    """What crosses ranks in one update of float32 layers (8-bit digits): the collectives and
    their bytes, counted on the calls themselves, against docs/distributed.md's table."""
    rng = np.random.default_rng([world, 3000])
    shapes = [(64, 3, 3, 3), (40, 300), (3, 7)]
    full = []
    for i, shape in enumerate(shapes):
        mask = torch.from_numpy(rng.random(shape) < 0.2)
        w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) * mask
        p = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        full.append(sc.Layer(f"t{i}", w, mask, p))
    splits = [row_split(rng, s[0], world, chunked=True) for s in shapes]
    seen = {"all_reduce": 0, "all_gather": 0, "all_reduce_bytes": 0, "all_gather_bytes": 0}
    calls = {"all_reduce": dist.all_reduce, "all_gather": dist.all_gather}

    def counted(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            t = args[0] if name == "all_reduce" else args[1]
            seen[name] += 1
            seen[f"{name}_bytes"] += t.numel() * t.element_size()
            return calls[name](*args, **kwargs)

        return call

    dist.all_reduce, dist.all_gather = counted("all_reduce"), counted("all_gather")  # type: ignore[assignment]
    try:
        got = sc.update(sharded(full, splits, rank), prune_rate=0.5, backend=ShardedBackend())
    finally:
        dist.all_reduce, dist.all_gather = calls["all_reduce"], calls["all_gather"]  # type: ignore[assignment]
    want = sc.update(full, prune_rate=0.5, backend=TorchBackend(fused=True))
    assert_parts_equal(got, want, splits, rank, "traffic")
    layers = len(shapes)
    # scan 66 int64, 2 selections of 8 rounds of 256 int32, counts 5 int64 per layer, and the
    # dead units: one int64 per output unit for the mask and for the momentum
    units = sum(s[0] for s in shapes)
    assert seen["all_reduce"] == 1 + 16 + 1 + 1, seen
    assert seen["all_reduce_bytes"] == layers * (66 * 8 + 16 * 256 * 4 + 5 * 8) + 2 * units * 8, (
        seen
    )
    # twice: a header of 2 int64, then 5 int64 per layer (sent by this rank)
    assert seen["all_gather"] == 4 and seen["all_gather_bytes"] == 2 * (16 + layers * 40), seen
    return seen


def error_cases(rank: int, world: int) -> int:
    """Bad inputs raise the same error, word for word, on every rank, and change nothing."""
    rng = np.random.default_rng([world, 2000])
    layers = [
        sc.Layer(
            f"e{i}",
            torch.from_numpy(rng.standard_normal(s).astype(np.float32)),
            torch.from_numpy(rng.random(s) < 0.3),
            torch.from_numpy(rng.standard_normal(s).astype(np.float32)),
        )
        for i, s in enumerate([(2 * world, 9), (world + 1, 4)])
    ]
    layers = [sc.Layer(x.name, x.weight * x.mask, x.mask, x.momentum) for x in layers]
    splits = [row_split(rng, x.weight.shape[0], world, chunked=True) for x in layers]
    checked = 0

    def same_error(
        bad: list[sc.Layer], want: str, kind: type = SparseCoreError, **opts: Any
    ) -> None:
        nonlocal checked
        before = snapshot(bad)
        try:
            sc.update(bad, prune_rate=0.5, backend=ShardedBackend(), **opts)
        except kind as err:
            assert str(err) == want, f"{err!s} != {want}"
        else:
            raise AssertionError(f"no error, expected {want}")
        assert snapshot(bad) == before
        checked += 1

    # NaN / Inf on one rank only: the single-process error, on every rank
    for where in ("weight", "momentum"):
        whole = [sc.Layer(x.name, x.weight.clone(), x.mask, x.momentum.clone()) for x in layers]
        getattr(whole[1], where)[world, 2] = math.nan if where == "weight" else math.inf
        with_error = None
        try:
            sc.update(whole, prune_rate=0.5, backend=TorchBackend(fused=True))
        except NonFiniteError as err:
            with_error = str(err)
        assert with_error is not None
        same_error(sharded(whole, splits, rank), with_error, NonFiniteError)
    mine = sharded(layers, splits, rank)
    # shards that overlap (every rank claims the whole first layer)
    overlap = list(mine)
    w = layers[0].weight
    overlap[0] = sc.Layer("e0", Shard(w, tuple(w.shape), 0), Shard(layers[0].mask, tuple(w.shape), 0),
                          Shard(layers[0].momentum, tuple(w.shape), 0))  # fmt: skip
    offsets = [(0, w.numel())] * world
    if world > 1:
        same_error(
            overlap,
            f"layer 'e0' of shape {tuple(w.shape)}: the ranks' shards (offset, positions) "
            f"{offsets} do not hold each of its {w.numel()} positions exactly once",
        )
    # a shard that does not start on a row, on the last rank only
    odd = list(mine)
    if rank == world - 1:
        x = odd[1]
        odd[1] = sc.Layer(x.name, Shard(x.weight.local, x.weight.shape, x.weight.offset + 1),
                          x.mask, x.momentum)  # fmt: skip
    last = world - 1
    offset, size = splits[1][last] * 4 + 1, (splits[1][last + 1] - splits[1][last]) * 4
    same_error(
        odd,
        f"layer 'e1': on rank {last}, its shard (offset {offset}, {size} positions) does "
        f"not start at a row inside the layer",
    )
    # a different layer list on one rank
    if world > 1:
        fewer = mine[:1] if rank == 0 else mine
        try:
            sc.update(fewer, prune_rate=0.5, backend=ShardedBackend())
        except SparseCoreError as err:
            assert "different layers" in str(err), str(err)
            checked += 1
        else:
            raise AssertionError("different layer lists were accepted")
    # modes a shard cannot run
    same_error(
        mine,
        "a per-layer selection (the generic update path) is not available on sharded layers: "
        "the sharded update runs magnitude pruning with momentum growth (prune='magnitude', "
        "growth='momentum', any built-in redistribution)",
        growth="random",
    )
    return checked


def fsdp_check(rank: int, world: int) -> dict[str, Any]:
    """A real FSDP2 model: fully_shard on the gloo ranks, train, update the DTensors' local
    shards, compare with a single-process update of the full tensors (gathered for the test
    only), write the new weights back, train on, update again."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)  # the same initial weights everywhere
    model = nn.Sequential(nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 2))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    names = [f"{i}.weight" for i in (0, 2, 4)]
    shapes = [tuple(m.weight.shape) for m in linears]
    for m in linears:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = [m.weight for m in linears]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = sc.SparseConfig.from_options(
        recipe="paper", density=0.3, update_every=2, total_steps=8, seed=1
    )
    full_engine = sc.SparseEngine(config, names, shapes)
    sharded_engine = sc.SparseEngine(config, names, shapes)
    full_masks = [torch.from_numpy(m) for m in full_engine.initial_masks()]
    shards = [shard_of(p) for p in params]
    local_masks = [s.like(m.reshape(-1)[s.offset : s.offset + s.local.numel()].view(s.local.shape))
                   for s, m in zip(shards, full_masks)]  # fmt: skip
    empty = sum(s.local.numel() == 0 for s in shards)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    backend = ShardedBackend(mesh.get_group())
    updates = 0
    for step in range(1, 7):
        with torch.no_grad():
            for s, m in zip(shards, local_masks):
                s.local.mul_(m.local)
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 2, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            for s, m in zip(shards, local_masks):
                s.local.mul_(m.local)
        if step % 2:
            continue
        shards = [shard_of(p) for p in params]
        momenta = [shard_of(opt.state[p]["momentum_buffer"]) for p in params]
        mine = [sc.Layer(n, s, s.like(m.local), p) for n, s, m, p in
                zip(names, shards, local_masks, momenta)]  # fmt: skip
        # the single-process reference on the whole tensors (gathered here for the test only)
        full = [sc.Layer(n, p.full_tensor().detach(), m,
                         opt.state[p]["momentum_buffer"].full_tensor())
                for n, p, m in zip(names, params, full_masks)]  # fmt: skip
        want = full_engine.update(full, step, backend=TorchBackend(fused=True))
        got = sharded_engine.update(mine, step, backend=backend)
        for i, s in enumerate(shards):
            first = s.offset // math.prod(s.shape[1:])
            rows = slice(first, first + s.local.shape[0])
            assert bits(got.masks[i].local) == bits(want.masks[i][rows]), f"step {step} mask {i}"
            assert want.weights is not None and got.weights is not None
            assert bits(got.weights[i].local) == bits(want.weights[i][rows]), f"weights {i}"
        assert got.report == want.report
        with torch.no_grad():
            for s, m, nm, nw in zip(shards, local_masks, got.masks, got.weights or []):
                m.local.copy_(nm.local)
                s.local.copy_(nw.local)
        full_masks = list(want.masks)
        updates += 1
    # DTensors that are not fully_shard's Shard(0) are refused by name, on every rank
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor import Shard as ShardPlacement

    for placement in (Replicate(), ShardPlacement(1)):
        other = distribute_tensor(torch.ones(4, 2 * world), mesh, [placement])
        try:
            shard_of(other)
        except SparseCoreError as err:
            assert "sharded along dimension 0" in str(err) and repr(placement) in str(err)
        else:
            raise AssertionError(f"shard_of took a DTensor placed {placement}")
    total = sum(int(m.sum()) for m in full_masks)
    assert total == full_engine.target
    for p, m in zip(params, full_masks):  # weights outside the masks are 0 in the FSDP model
        assert bool((p.full_tensor().detach()[~m] == 0).all())
    return {"updates": updates, "empty_shards": empty, "target": full_engine.target}


def doc_example(rank: int, world: int) -> dict[str, Any]:
    """The example of docs/distributed.md, as written, on these ranks."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
    (block,) = [
        b
        for b in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
        if "ShardedBackend()" in b
    ]
    namespace: dict[str, Any] = {"__name__": "docs_distributed"}
    exec(compile(block, f"{doc}:example", "exec"), namespace)
    engine, shards, masks = namespace["engine"], namespace["shards"], namespace["masks"]
    backend = namespace["backend"]
    assert engine.updates >= 3 and backend.packed_updates == engine.updates
    held = backend.counts([s.like(m) for s, m in zip(shards, masks)])
    assert held == [layer.nnz_after for layer in engine.history[-1].layers]
    assert sum(held) == engine.target
    for s, m in zip(shards, masks):  # weights off the masks are 0 in the sharded model
        assert bool((s.local[~m] == 0).all())
    return {"updates": engine.updates, "density": engine.history[-1].density}


def main() -> None:
    rank, world, init_file, out_file, cases = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        int(sys.argv[5]),
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    started = time.perf_counter()
    result: dict[str, Any] = {}
    seconds = result["seconds"] = {}
    try:
        for name, check in (
            ("random", lambda: random_cases(rank, world, cases)),
            ("engine", lambda: engine_run(rank, world)),
            ("traffic", lambda: traffic(rank, world)),
            ("errors_checked", lambda: error_cases(rank, world)),
            ("fsdp", lambda: fsdp_check(rank, world)),
            ("doc_example", lambda: doc_example(rank, world)),
        ):
            result[name] = check()
            seconds[name] = round(time.perf_counter() - started, 2)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    with open(out_file, "w") as f:
        json.dump(result, f)
    dist.barrier()
    gc.collect()  # free cyclic models while the process group lives (gloo exit aborts)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's background threads can abort the interpreter's teardown after all work is done
    # and written; leave without that teardown (as ddp_worker.py does).
    sys.stdout.flush()
    os._exit(0)
