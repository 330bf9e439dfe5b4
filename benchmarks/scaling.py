"""How attach's costs grow with a GPT-style model: one process, and 2 FSDP2 ranks.

Work, for each size (``--sizes``, in millions of sparse weights: 1, 3, 10, 30, 100 by default):
a decoder-only Transformer written with ``nn.Linear`` (per block: a fused q/k/v projection
``d -> 3d``, the output projection ``d -> d``, an MLP ``d -> 4d -> d``, two LayerNorms), a dense
token embedding and a linear head over a 256-token vocabulary; every linear weight is sparse
(density 0.1, ``recipe="paper"``), SGD with momentum 0.9, float32, batches of ``--batch``
sequences of ``--seq`` tokens, ``--threads`` torch threads per process (1 by default).

Measured, interleaved and repeated (medians; min-max in the JSON):

- **step**: one training step (forward, backward, ``optimizer.step()``) of the dense model and of
  the same model under ``attach`` with no mask update due; the difference is attach's overhead
  per step (the re-masking after the step, fused into SGD on one process).
- **update**: one mask update as ``attach`` runs it (the handle's own update routine, called
  directly so that it can be timed alone: on one process the Numba update on NumPy views of the
  CPU tensors, on FSDP ranks the sharded update); its time per weight shows how it grows with
  the number of weights.
- **floor**: one streaming read of every sparse weight and momentum tensor (``|W|.sum()`` and
  ``|P|.sum()``): the least any update that reads both can cost. The update against it is the
  ratio to look at.
- **memory**: the bytes attach keeps per sparse weight on each rank (masks, their integer copy
  for the re-masking, ever-active masks, own momentum where there is one), counted on the
  handle's tensors.

With ``--ranks 2`` the same is measured on 2 gloo processes (``fully_shard`` on every block and
on the model, each rank its own data), timed on rank 0 between barriers.

Timings only mean something on a quiet machine (load average below 1; printed before and after).
Usage (the full run took 6 minutes on a quiet 2-core machine)::

    python benchmarks/scaling.py --sizes 1,3,10,30,100 --ranks 2 --repeats 5 --out scaling-run
    python benchmarks/scaling.py --sizes 0.2,0.5 --ranks 2 --repeats 2   # a quick check

``--out DIR`` writes ``scaling.json`` and ``scaling.png`` (update, floor and the training steps
with and without attach against the number of weights) there; ``--plot-only DIR/scaling.json``
redraws the plot of a finished run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import sparsecore.torch as sct

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mask_update import commit

VOCAB = 256
# the model returns the head's output, which FSDP2 warns about; nothing here writes to it in place
warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
OPTIONS: dict[str, Any] = dict(recipe="paper", density=0.1, update_every=10**9, total_steps=10**9)


class Block(nn.Module):
    """A pre-LayerNorm Transformer block, attention and MLP written with nn.Linear."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, d: int, layers: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.position = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(Block(d, max(1, d // 64)) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def shape_for(millions: float) -> tuple[int, int]:
    """(width, blocks) with about ``millions`` * 1e6 sparse weights: 12 d^2 per block and depth
    about d / 64, as in GPT-2's family (d 768, 12 blocks: 85M), d a multiple of 64."""
    target = millions * 1e6
    d = max(64, round((target * 64 / 12) ** (1 / 3) / 64) * 64)
    return d, max(1, round((target - d * VOCAB) / (12 * d * d)))


def sparse_weights(d: int, layers: int) -> int:
    return 12 * d * d * layers + d * VOCAB


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(ts: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts)}


class Trainer:
    """A model, its optimizer, a batch and (optionally) an attach handle."""

    def __init__(self, d: int, layers: int, args: argparse.Namespace, sparse: bool, world: int):
        torch.manual_seed(0)
        self.model = GPT(d, layers, args.seq)
        if world > 1:
            from torch.distributed.fsdp import fully_shard

            for block in self.model.blocks:
                fully_shard(block)
            fully_shard(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.handle = sct.attach(self.model, self.opt, **OPTIONS) if sparse else None
        rank = dist.get_rank() if world > 1 else 0
        g = torch.Generator().manual_seed(rank)
        self.tokens = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=g)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=False)
        logits = self.model(self.tokens[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), self.tokens[:, 1:].reshape(-1)
        )
        loss.backward()
        self.opt.step()


def local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if hasattr(x, "to_local") else x  # type: ignore[operator]


def measure(millions: float, args: argparse.Namespace, world: int) -> dict[str, Any]:
    d, layers = shape_for(millions)
    dense = Trainer(d, layers, args, sparse=False, world=world)
    sparse = Trainer(d, layers, args, sparse=True, world=world)
    handle = sparse.handle
    assert handle is not None
    params = [t.param for t in handle.targets]

    def momenta() -> list[torch.Tensor]:
        return [local(sparse.opt.state[p]["momentum_buffer"]) for p in params]

    def floor() -> None:
        for p, m in zip(params, momenta()):
            local(p.detach()).abs().sum()
            m.abs().sum()

    def update() -> None:
        handle._update(handle.steps)  # the routine a due step runs; timed alone here

    def barrier(fn: Callable[[], Any]) -> Callable[[], Any]:
        if world == 1:
            return fn

        def call() -> None:
            fn()
            dist.barrier()

        return call

    candidates = {
        "dense_step": barrier(dense.step),
        "sparse_step": barrier(sparse.step),
        "update": barrier(update),
        "floor": barrier(floor),
    }
    dense.step()  # warm up; the first sparse step creates the momentum buffers
    sparse.step()
    update()
    floor()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(candidates[name]))
    n = sum(p.numel() for p in params)
    held = sum(local(p.detach()).numel() for p in params)
    kept = [*handle.masks, *handle._keep, *(o for o in handle._own if o is not None)]
    ever = handle.engine.ever_active or []
    kept += [e.local if hasattr(e, "local") else e for e in ever]
    extra = sum(t.numel() * t.element_size() for t in kept)
    overheads = [s - t for s, t in zip(times["sparse_step"], times["dense_step"])]
    return {
        "millions": millions,
        "width": d,
        "blocks": layers,
        "ranks": world,
        "sparse_weights": n,
        "weights_on_rank0": held,
        "update_backend": handle.last_update_backend,
        **{name: summary(t) for name, t in times.items()},
        "overhead_per_step": summary(overheads),
        "update_per_weight_ns": 1e9 * statistics.median(times["update"]) / n,
        "update_to_floor": statistics.median(
            [u / f for u, f in zip(times["update"], times["floor"])]
        ),
        "attach_bytes_per_weight_on_rank0": extra / held,
    }


def rank_main(rank: int, world: int, init: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=1800),
    )  # fmt: skip
    rows = [measure(m, args, world) for m in sizes(args)]
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    gc.collect()  # free cyclic models while the process group lives (gloo exit aborts)
    dist.destroy_process_group()


def sizes(args: argparse.Namespace) -> list[float]:
    return [float(s) for s in args.sizes.split(",")]


def show(rows: list[dict[str, Any]]) -> None:
    print(f"{'ranks':>5} {'weights':>9} {'d x blocks':>10} {'dense step':>11} {'overhead':>9} "
          f"{'update':>9} {'ns/weight':>9} {'floor':>8} {'upd/floor':>9} {'B/weight':>8}")  # fmt: skip
    for r in rows:
        print(
            f"{r['ranks']:>5} {r['sparse_weights'] / 1e6:>8.2f}M {r['width']:>5}x{r['blocks']:<4} "
            f"{1e3 * r['dense_step']['median']:>9.1f}ms {1e3 * r['overhead_per_step']['median']:>7.1f}ms "
            f"{1e3 * r['update']['median']:>7.1f}ms {r['update_per_weight_ns']:>9.2f} "
            f"{1e3 * r['floor']['median']:>6.1f}ms {r['update_to_floor']:>9.1f} "
            f"{r['attach_bytes_per_weight_on_rank0']:>8.1f}"
        )  # fmt: skip


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for ranks in sorted({r["ranks"] for r in rows}):
        mine = [r for r in rows if r["ranks"] == ranks]
        x = [r["sparse_weights"] for r in mine]
        ax.loglog(
            x, [r["update"]["median"] for r in mine], "o-", label=f"mask update, {ranks} rank(s)"
        )
        ax.loglog(
            x, [r["floor"]["median"] for r in mine], "s:", label=f"streaming floor, {ranks} rank(s)"
        )
        # The overhead is a small difference of two noisy step times (often below their
        # spread, even negative): show both steps, not their difference on a log scale.
        ax.loglog(x, [r["sparse_step"]["median"] for r in mine], "^--",
                  label=f"training step with attach, {ranks} rank(s)")  # fmt: skip
        ax.loglog(x, [r["dense_step"]["median"] for r in mine], "v:",
                  label=f"training step, dense, {ranks} rank(s)")  # fmt: skip
    ax.set_xlabel("sparse weights")
    ax.set_ylabel("seconds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,3,10,30,100", help="millions of sparse weights")
    parser.add_argument("--ranks", type=int, default=2, help="FSDP ranks (1: one process only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="folder for scaling.json and scaling.png")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", help="redraw the plot of this scaling.json (next to it)")
    args = parser.parse_args(argv)
    if args.plot_only:
        rows = json.loads(Path(args.plot_only).read_text())["rows"]
        plot(rows, str(Path(args.plot_only).with_name("scaling.png")))
        return
    if args.rank is not None:
        rank_main(args.rank, args.ranks, args.init, args)
        sys.stdout.flush()
        os._exit(0)  # gloo's threads may abort the interpreter's teardown
    torch.set_num_threads(args.threads)
    header = (
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit()}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} thread(s) per "
        f"process, batch {args.batch}x{args.seq}, load average {os.getloadavg()[0]:.1f}"
    )
    print(header)
    rows = [measure(m, args, 1) for m in sizes(args)]
    if args.ranks > 1:
        with tempfile.TemporaryDirectory() as tmp:
            init, result = os.path.join(tmp, "init"), os.path.join(tmp, "ranks.json")
            base = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])]
            extra = ["--init", init, "--result", result]
            procs = [subprocess.Popen([*base, "--rank", str(r), *extra]) for r in range(args.ranks)]
            codes = [p.wait() for p in procs]
            if any(codes):
                raise SystemExit(f"a rank failed: exit codes {codes}")
            with open(result) as f:
                rows += json.load(f)
    show(rows)
    after = f"# load average after: {os.getloadavg()[0]:.1f}"
    print(after)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "scaling.json"), "w") as f:
            json.dump({"header": header, "after": after, "rows": rows}, f, indent=1)
        plot(rows, os.path.join(args.out, "scaling.png"))
        print(f"# wrote {args.out}/scaling.json and scaling.png")
    if not all(math.isfinite(r["update"]["median"]) for r in rows):  # pragma: no cover
        raise SystemExit("a timing is not finite")


if __name__ == "__main__":
    main()
