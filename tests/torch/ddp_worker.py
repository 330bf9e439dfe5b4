"""One rank of the DDP test (run as a script by test_distributed.py, two real processes on gloo).

Usage: ddp_worker.py RANK WORLD INIT_FILE OUT_FILE MODE. MODE ``ddp`` trains a
DistributedDataParallel model on this rank's shard; MODE ``local`` trains without DDP, so each
rank's momentum differs, and only the adapter's broadcast keeps the masks identical.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def main() -> None:
    rank, world, init_file, out_file, mode = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        sys.argv[5],
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import sparsecore.torch as st

    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    wrapped = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(wrapped, opt, density=0.2, update_every=2, total_steps=20)
    g = torch.Generator().manual_seed(1000 + rank)  # a different shard per rank
    for _ in range(6):
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        opt.step()
    checksum = [int((torch.arange(m.numel()) * m.reshape(-1)).sum()) for m in sparse.masks]
    weights_zero = all(
        bool((t.param.detach()[~sparse.mask(t.name)] == 0).all()) for t in sparse.targets
    )
    with open(out_file, "w") as f:
        json.dump(
            {
                "checksum": checksum,
                "updates": len(sparse.history),
                "history": [r.to_dict() for r in sparse.history],
                "names": sparse.names,
                "nnz": [int(m.sum()) for m in sparse.masks],
                "weights_zero": weights_zero,
                "weight_sum": float(sum(p.detach().double().sum() for p in model.parameters())),
            },
            f,
        )
    dist.barrier()
    gc.collect()  # free cyclic models while the process group lives (gloo exit aborts)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's background threads can abort the interpreter's teardown ("terminate called without
    # an active exception") after all work is done and written; leave without that teardown.
    sys.stdout.flush()
    os._exit(0)
