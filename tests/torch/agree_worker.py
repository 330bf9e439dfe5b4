"""One rank of the agreement test (run as a script by test_distributed.py: two real processes on
gloo, plain torch.distributed without DDP, so each rank's gradients and momentum are its own).

Usage: agree_worker.py RANK WORLD INIT_FILE OUT_FILE. The process group times out after 60 s, so
a rank left waiting in a collective fails the test instead of hanging it. Scenarios, in order:

- ``skip``: on_nonfinite='skip'; at the update due after step 4 only rank 1 has a NaN gradient.
  Every rank must skip that update with the same report, then agree on the later updates.
- ``raise``: on_nonfinite='raise'; a NaN gradient on rank 0 only, at a due update: every rank
  raises the same NonFiniteError (none waits for the others).
- ``manual``: no optimizer, the loop calls sparse.step(); a NaN gradient on rank 1 only: no rank
  counts that step, and the ranks stay in step.
- ``fail``: a growth mode that fails on rank 1 only: rank 1 raises its own error, rank 0 an
  error naming rank 1, and neither records an update.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


def _batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)


def _summary(sparse) -> dict:
    return {
        "steps": sparse.steps,
        "history": [r.to_dict() for r in sparse.history],
        "masks": [m.to(torch.int64).reshape(-1).tolist() for m in sparse.masks],
        "zero_outside": all(
            bool((t.param.detach()[~sparse.mask(t.name)] == 0).all()) for t in sparse.targets
        ),
    }


def skip_scenario(rank: int, st) -> dict:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(model, opt, density=0.2, update_every=2, total_steps=40, on_nonfinite="skip")
    g = torch.Generator().manual_seed(1000 + rank)  # a different shard per rank
    for step in range(1, 11):
        x, y = _batch(g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step == 4 and rank == 1:
            model[2].weight.grad[0, 0] = float("nan")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        if step == 4:
            skipped_warning = [str(w.message) for w in caught]
            with torch.no_grad():  # rank 1's momentum holds the NaN: clean it to go on
                for s in opt.state.values():
                    s["momentum_buffer"].nan_to_num_(0.0)
                for p in model.parameters():
                    p.nan_to_num_(0.0)
    out = _summary(sparse)
    out["warning"] = skipped_warning
    sparse.detach()
    return out


def raise_scenario(rank: int, st) -> dict:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(model, opt, density=0.2, update_every=2, total_steps=40)
    g = torch.Generator().manual_seed(2000 + rank)
    error = None
    for step in range(1, 5):
        x, y = _batch(g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step == 4 and rank == 0:
            model[0].weight.grad[1, 1] = float("inf")
        try:
            opt.step()
        except Exception as err:  # the NonFiniteError every rank must raise alike
            error = f"{type(err).__name__}: {err}"
    out = _summary(sparse)
    out["error"] = error
    sparse.detach()
    return out


def manual_scenario(rank: int, st) -> dict:
    model = _model()
    sparse = st.attach(model, density=0.2, update_every=3, total_steps=40, on_nonfinite="skip")
    g = torch.Generator().manual_seed(3000 + rank)
    for step in range(1, 9):
        x, y = _batch(g)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step == 3 and rank == 1:
            model[0].weight.grad[2, 2] = float("nan")
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad.nan_to_num(0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sparse.step()
    out = _summary(sparse)
    sparse.detach()
    return out


def fail_scenario(rank: int, st) -> dict:
    import sparsecore
    from sparsecore.modes import GROWTH

    @sparsecore.register_growth("fails_on_rank_1")
    def _growth(backend, layer, mask, k, key):
        if dist.get_rank() == 1:
            raise RuntimeError("growth failed here")
        return GROWTH["momentum"](backend, layer, mask, k, key)

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(
        model, opt, density=0.2, update_every=2, total_steps=40, growth="fails_on_rank_1"
    )
    g = torch.Generator().manual_seed(4000 + rank)
    error = None
    for _ in range(2):
        x, y = _batch(g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        try:
            opt.step()
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
    out = _summary(sparse)
    out["error"] = error
    sparse.detach()
    return out


def main() -> None:
    rank, world, init_file, out_file = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    import sparsecore.torch as st

    results = {
        "skip": skip_scenario(rank, st),
        "raise": raise_scenario(rank, st),
        "manual": manual_scenario(rank, st),
        "fail": fail_scenario(rank, st),
    }
    with open(out_file, "w") as f:
        json.dump(results, f)
    dist.barrier()
    gc.collect()  # free cyclic models while the process group lives (gloo exit aborts)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # see ddp_worker.py: leave without gloo's teardown
