"""One rank of the tests of ``attach`` on an FSDP2 model (run by test_fsdp.py: real gloo processes).

Usage: fsdp_worker.py RANK WORLD INIT_FILE OUT_FILE CKPT_DIR MODE. MODE ``save`` (2 ranks):
train a ``fully_shard`` model under ``attach`` beside two single-process copies, checkpoint it
through ``torch.distributed.checkpoint`` halfway, train on, then resume from the checkpoint in a
fresh model and train to the end again. MODE ``load`` (any number of ranks): the same training
beside the copies, then resume the checkpoint that ``save`` wrote on another number of ranks.
Rank 0 writes what it found to OUT_FILE (whole tensors, gathered for the checks only).

The two single-process copies take the same steps on every rank:

- ``exact`` receives the FSDP model's gradients (the reduce-scattered ones, gathered) before each
  step, so its weights and momentum stay those of the sharded model: its masks must equal the
  sharded update's bit for bit at every update.
- ``free`` computes its own gradients on the whole batch: the sum over the batch differs from the
  ranks' reduce-scatter in the order of additions only, so it agrees to a tolerance (float64).

A failed check raises; the rank leaves at once (``os._exit(1)``) so the others fail fast.
"""

from __future__ import annotations

import copy
import datetime
import gc
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import sparsecore.torch as sct
from sparsecore.errors import SparseCoreError
from sparsecore.torch.fsdp import as_dtensor as fsdp_as_dtensor

STEPS, SAVE_AT, BATCH = 12, 6, 12
OPTIONS: dict[str, Any] = dict(
    density=0.3, update_every=3, total_steps=STEPS, seed=5, recipe="paper", prune_rate=0.4
)
#: float64 training: the whole-batch run and the sharded one differ by rounding in the gradient
#: sums (about 1e-16 relative per step); this bound leaves room for 12 steps and any masks flip
TOLERANCE = 1e-12


def doc_checkpoint() -> dict[str, Any]:
    """save() and load() of docs/distributed.md, as written: the checkpoints here use them."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "def save(path" in b]
    namespace: dict[str, Any] = {"__name__": "docs_distributed_checkpoint"}
    exec(compile(block, f"{doc}:checkpoint", "exec"), namespace)
    return namespace


DOC_CHECKPOINT = doc_checkpoint()


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(
        nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 7), nn.ReLU(), nn.Linear(7, 5)
    ).double()


def shard(model: nn.Module, world: int) -> nn.Module:
    mesh = init_device_mesh("cpu", (world,))
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 12, generator=g, dtype=torch.float64), torch.randint(
        0, 5, (BATCH,), generator=g
    )


def whole(x: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (gloo gathers no bool tensors: masks travel as bytes)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(x, DTensor):
        return x.detach().clone()
    x = x.detach()
    if x.dtype == torch.bool:
        return x.to(torch.uint8).full_tensor().bool()
    return x.full_tensor()


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


class Run:
    """One sharded model under attach, with its optimizer."""

    def __init__(self, world: int) -> None:
        self.model = shard(make_model(), world)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.sparse = sct.attach(self.model, self.opt, **OPTIONS)
        self.world, self.rank = world, dist.get_rank()

    def step(self, step: int) -> None:
        x, y = batch(step)
        part = BATCH // self.world
        rows = slice(self.rank * part, (self.rank + 1) * part)
        self.opt.zero_grad()
        loss_of(self.model, x[rows], y[rows]).backward()
        self.opt.step()

    def whole_weights(self) -> list[torch.Tensor]:
        return [whole(p) for p in self.model.parameters()]

    def whole_masks(self) -> list[torch.Tensor]:
        return [whole(self.sparse.mask(n)) for n in self.sparse.names]

    def save(self, path: Path) -> None:
        DOC_CHECKPOINT["save"](str(path), self.model, self.opt, self.sparse)

    def load(self, path: Path) -> None:
        DOC_CHECKPOINT["load"](str(path), self.model, self.opt, self.sparse)


def history(handle: Any) -> list[dict[str, Any]]:
    return [r.to_dict() for r in handle.history]


def train_beside_copies(world: int, rank: int) -> dict[str, Any]:
    """The sharded run beside ``exact`` (its gradients) and ``free`` (its own gradients)."""
    run = Run(world)
    exact, free = make_model(), make_model()
    exact_opt = torch.optim.SGD(exact.parameters(), lr=0.1, momentum=0.9)
    free_opt = torch.optim.SGD(free.parameters(), lr=0.1, momentum=0.9)
    exact_sparse = sct.attach(exact, exact_opt, **OPTIONS)
    free_sparse = sct.attach(free, free_opt, **OPTIONS)
    # each rank holds its rows only: masks shaped like the local shards
    for name, mask, p in zip(
        run.sparse.names, run.sparse.masks, (t.param for t in run.sparse.targets)
    ):
        assert mask.shape == p.to_local().shape, (name, mask.shape)
        assert mask.shape[0] < p.shape[0], name
    assert run.sparse.density() == exact_sparse.density()
    assert run.sparse.dead_units() == exact_sparse.dead_units()  # gathered for the report
    lines: list[str] = []
    run.sparse.summary(lines.append)
    exact_lines: list[str] = []
    exact_sparse.summary(exact_lines.append)
    assert lines == exact_lines
    worst = 0.0
    for step in range(1, STEPS + 1):
        run.step(step)
        x, y = batch(step)
        exact_opt.zero_grad()
        loss_of(exact, x, y).backward()
        for mine, theirs in zip(exact.parameters(), run.model.parameters()):
            assert mine.grad is not None and theirs.grad is not None
            mine.grad.copy_(whole(theirs.grad))
        exact_opt.step()
        free_opt.zero_grad()
        loss_of(free, x, y).backward()
        free_opt.step()
        masks, weights = run.whole_masks(), run.whole_weights()
        exact_masks = [exact_sparse.mask(n) for n in exact_sparse.names]
        assert all(torch.equal(a, b) for a, b in zip(masks, exact_masks)), f"masks, step {step}"
        assert all(torch.equal(a, b) for a, b in zip(weights, exact.parameters())), step
        free_masks = [free_sparse.mask(n) for n in free_sparse.names]
        assert all(torch.equal(a, b) for a, b in zip(masks, free_masks)), f"free, step {step}"
        worst = max(
            worst,
            max(float((a - b.detach()).abs().max()) for a, b in zip(weights, free.parameters())),
        )
        assert worst <= TOLERANCE, (step, worst)
    assert run.sparse.last_update_backend == "torch-sharded"
    same_reports(history(run.sparse), history(exact_sparse))
    assert len(run.sparse.history) == 3  # after steps 3, 6 and 9 (none at the last step)
    assert sum(r.layers[0].net_grown for r in run.sparse.history) > 0  # the masks moved
    assert run.sparse.layer_densities() == exact_sparse.layer_densities()
    # a single process's state (whole tensors) loads into the sharded model: each rank its rows
    again = Run(world)
    again.sparse.load_state_dict(exact_sparse.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.whole_masks(), exact_masks))
    assert again.sparse.steps == STEPS and len(again.sparse.history) == 3
    return {"updates": len(run.sparse.history), "free_max_diff": worst}


def same_reports(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Equal reports: every count exactly; the importance (an exact sum on the sharded path, a
    float64 sum in another order on the single-process CPU path) and the shares to 1e-12."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        la, lb = ra.pop("layers"), rb.pop("layers")
        assert ra == rb, (ra, rb)
        for x, y in zip(la, lb):
            for key in ("importance", "share"):
                u, v = x.pop(key), y.pop(key)
                assert abs(u - v) <= 1e-12 * max(abs(v), 1e-300), (key, u, v)
            assert x == y, (x, y)


def snapshot(run: Run) -> dict[str, Any]:
    return {
        "weights": run.whole_weights(),
        "masks": run.whole_masks(),
        "history": history(run.sparse),
        "steps": run.sparse.steps,
    }


def same(a: dict[str, Any], b: dict[str, Any], tol: float = 0.0) -> None:
    assert a["steps"] == b["steps"]
    if tol == 0.0:
        assert a["history"] == b["history"], (a["history"], b["history"])
    else:
        same_reports(copy.deepcopy(a["history"]), copy.deepcopy(b["history"]))
    assert all(torch.equal(x, y) for x, y in zip(a["masks"], b["masks"]))
    diff = max(float((x - y).abs().max()) for x, y in zip(a["weights"], b["weights"]))
    assert diff <= tol, diff


def refusals(world: int) -> int:
    """What the sharded update cannot run is refused by attach, naming it; nothing changes."""
    model = shard(make_model(), world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [whole(p) for p in model.parameters()]
    checked = 0
    for options, words in (
        ({"density": 0.3}, "growth='momentum_neuron'"),
        ({**OPTIONS, "revive_dead_units": True}, "revive_dead_units=True"),
        ({**OPTIONS, "prune": "SET"}, "prune='SET'"),
        ({**OPTIONS, "kernels": "cpu"}, "kernels='cpu'"),
        ({**OPTIONS, "update_backend": "numba"}, "update_backend='numba'"),
    ):
        try:
            sct.attach(model, opt, **options)
        except SparseCoreError as err:
            assert words in str(err) and "fully_shard" in str(err), str(err)
            checked += 1
    assert all(torch.equal(a, whole(p)) for a, p in zip(before, model.parameters()))
    handle = sct.attach(model, opt, **OPTIONS)  # still attachable: nothing was left behind
    try:
        handle.export()
    except SparseCoreError as err:
        assert "torch.distributed.checkpoint" in str(err)
        checked += 1
    return checked


def step_beside_exact(
    world: int, model: nn.Module, opt: Any, exact: nn.Module, exact_opt: Any, *, steps: int
) -> None:
    """``steps`` training steps of the sharded ``model`` on this rank's part of each batch, and
    of the single-process ``exact`` copy fed the sharded model's reduced gradients."""
    part = BATCH // world
    rows = slice(dist.get_rank() * part, (dist.get_rank() + 1) * part)
    for step in range(1, steps + 1):
        x, y = batch(step)
        opt.zero_grad()
        loss_of(model, x[rows], y[rows]).backward()
        opt.step()
        exact_opt.zero_grad()
        loss_of(exact, x, y).backward()
        for mine, theirs in zip(exact.parameters(), model.parameters()):
            mine.grad.copy_(whole(theirs.grad))  # type: ignore[union-attr]
        exact_opt.step()


def own_momentum(world: int, ckpt: Path) -> float:
    """SGD without momentum: the handle keeps its own gradient average, this rank's rows only;
    masks equal a single-process copy's fed the same gradients, and the average survives a DCP
    checkpoint (a DTensor placed like its parameter)."""
    model = shard(make_model(), world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = sct.attach(model, opt, **OPTIONS)
    exact = make_model()
    exact_opt = torch.optim.SGD(exact.parameters(), lr=0.1)
    exact_sparse = sct.attach(exact, exact_opt, **OPTIONS)
    step_beside_exact(world, model, opt, exact, exact_opt, steps=6)
    assert len(sparse.history) == 2 and "own gradient average" in sparse.momentum_source
    masks = [whole(sparse.mask(n)) for n in sparse.names]
    assert all(torch.equal(a, exact_sparse.mask(n)) for a, n in zip(masks, sparse.names))
    own = [o for o in sparse._own if o is not None]
    assert len(own) == 3 and all(o.shape[0] < t.param.shape[0] for o, t in zip(own, sparse.targets))
    state = sparse.state_dict()
    dcp.save({"sparse": state}, checkpoint_id=str(ckpt))
    fresh = sct.attach(shard(make_model(), world), None, **OPTIONS)
    template = {"sparse": fresh.state_dict()}
    assert template["sparse"]["own_momentum"][0] is not None
    dcp.load(template, checkpoint_id=str(ckpt))
    fresh.load_state_dict(template["sparse"])
    want = exact_sparse.state_dict()["own_momentum"]
    got = [whole(fsdp_as_dtensor(o, t.param)) for o, t in zip(fresh._own, fresh.targets)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    return max(float((a - b).abs().max()) for a, b in zip(got, want))


def adam_with_reset(world: int) -> int:
    """Adam's exp_avg as the momentum, and reset_optimizer_state=True: the optimizer's state at
    positions whose mask changed is zeroed in each rank's rows; masks and Adam's state equal a
    single-process copy's fed the same gradients, bit for bit."""
    options = dict(OPTIONS, reset_optimizer_state=True)
    model = shard(make_model(), world)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sparse = sct.attach(model, opt, **options)
    exact = make_model()
    exact_opt = torch.optim.Adam(exact.parameters(), lr=0.01)
    exact_sparse = sct.attach(exact, exact_opt, **options)
    step_beside_exact(world, model, opt, exact, exact_opt, steps=6)
    assert len(sparse.history) == 2 and "exp_avg" in sparse.momentum_source
    for t, n, p in zip(sparse.targets, sparse.names, (u.param for u in exact_sparse.targets)):
        assert torch.equal(whole(sparse.mask(n)), exact_sparse.mask(n)), n
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(whole(opt.state[t.param][key]), exact_opt.state[p][key]), (n, key)
    return len(sparse.history)


def save_mode(world: int, rank: int, ckpt: Path) -> dict[str, Any]:
    out = train_beside_copies(world, rank)
    out["refused"] = refusals(world)
    out["own_momentum"] = own_momentum(world, ckpt.parent / "own")
    out["adam_updates"] = adam_with_reset(world)
    run = Run(world)
    for step in range(1, SAVE_AT + 1):
        run.step(step)
    run.save(ckpt)
    at_save = snapshot(run)
    for step in range(SAVE_AT + 1, STEPS + 1):
        run.step(step)
    uninterrupted = snapshot(run)
    resumed = Run(world)
    resumed.load(ckpt)
    same(snapshot(resumed), at_save)  # the checkpoint holds what was saved
    for step in range(SAVE_AT + 1, STEPS + 1):
        resumed.step(step)
    same(snapshot(resumed), uninterrupted)  # resume equal to uninterrupted, bit for bit
    if rank == 0:
        torch.save({"at_save": at_save, "final": uninterrupted}, ckpt.parent / "expected.pt")
    return dict(out, resumed=True)


def load_mode(world: int, rank: int, ckpt: Path) -> dict[str, Any]:
    out = train_beside_copies(world, rank)
    expected = torch.load(ckpt.parent / "expected.pt", weights_only=True)
    run = Run(world)
    run.load(ckpt)
    same(snapshot(run), expected["at_save"])  # resharded from 2 ranks, the same whole tensors
    for step in range(SAVE_AT + 1, STEPS + 1):
        run.step(step)
    same(snapshot(run), expected["final"], TOLERANCE)  # another gradient sum order only
    return dict(out, resharded=True)


def main() -> None:
    rank, world, init_file, out_file, ckpt, mode = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        Path(sys.argv[4]),
        Path(sys.argv[5]),
        sys.argv[6],
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    start = time.monotonic()
    try:
        out = (save_mode if mode == "save" else load_mode)(world, rank, ckpt)
        out["seconds"] = round(time.monotonic() - start, 1)
        if rank == 0:
            out_file.write_text(json.dumps(out))
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    gc.collect()  # free cyclic models while the process group lives (gloo exit aborts)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
