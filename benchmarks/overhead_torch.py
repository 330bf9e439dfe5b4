"""Overhead of ``sparsecore.torch.attach`` on a CPU training epoch, and its peak memory.

For each model (LeNet-300-100 and LeNet-5 on Fashion-MNIST) eleven loops run interleaved, in a
fresh random order every round: the plain loop (dense SGD with momentum, no sparsecore), the same
loop after ``attach(model, optimizer)`` (the optimizer-momentum path) and after ``attach(model)``
(the library's own gradient EMA, found through the global optimizer hook), both with mask updates
every 100 steps (the default); and three breakdowns of the optimizer path: ``attach_static`` (no
mask update: the per-step re-masking alone), ``attach_epoch_end`` (one update per epoch, at its
end, the paper's schedule) and ``attach_unfused`` (``fused_sgd=False``: SGD's own step followed
by the re-masking multiply, instead of the fused step of :mod:`sparsecore.torch.fused_step`).
Two loops use Adam (lr 1e-3) instead: ``plain_adam`` and ``attach_adam``
(``attach(model, optimizer)``, Adam's ``exp_avg`` as the momentum; Adam steps are never fused),
and ``attach_adam`` is compared with ``plain_adam``. The last pair runs SGD without momentum
(``plain_nomomentum``, and ``attach_own_nomomentum`` = ``attach(model)``): the setting the
own-momentum path is for, where the library's EMA is the only momentum; in ``attach_own`` the
loop's SGD keeps a momentum buffer as well, so that row pays for two. ``attach_own_torch_update``
is ``attach_own`` with ``update_backend="torch"``: mask updates on the torch backend instead of
the Numba one (:mod:`sparsecore.torch.host_update`). The figure is the epoch time with attach divided by the
plain epoch time of the same round; we print the median ratio and its spread (min..max) over the
rounds. Each configuration starts from the same weights. The time spent inside the adapter's
per-step routine is measured in separate instrumented epochs (``--share-rounds``), so the clock
calls around it do not count against the ratios. Times are taken both as this process's
CPU time (``time.process_time``, with one torch thread: far less sensitive to other jobs on a
shared machine) and as wall time. Peak memory: each configuration runs a short loop in a fresh
subprocess, with the peak resident set reset just before it; the extra tensors the adapter keeps
(masks, 0/1 multipliers, own momentum) are counted exactly as well.

The plain and attached loops compute the same dense products (attach without ``kernels=`` only
masks the weights), so the ratio isolates the adapter's bookkeeping: re-masking after each step,
the EMA for the own-momentum path, and the mask updates themselves.

Usage: ``python benchmarks/overhead_torch.py [--rounds 5] [--threads 1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CONFIGS = (
    "plain",
    "attach_optimizer",
    "attach_own",
    "attach_own_torch_update",
    "attach_static",
    "attach_epoch_end",
    "attach_unfused",
    "plain_adam",
    "attach_adam",
    "plain_nomomentum",
    "attach_own_nomomentum",
)
#: The configurations with sparsecore, and the plain loop each one is compared with.
ATTACHED = tuple(c for c in CONFIGS if c.startswith("attach"))
BASELINE = {
    **dict.fromkeys(ATTACHED, "plain"),
    "attach_adam": "plain_adam",
    "attach_own_nomomentum": "plain_nomomentum",
}
#: Mask updates per epoch of each attached configuration (``steps`` steps per epoch).
UPDATES = {
    "attach_optimizer": lambda steps: steps // 100,
    "attach_own": lambda steps: steps // 100,
    "attach_own_torch_update": lambda steps: steps // 100,
    "attach_static": lambda steps: 0,
    "attach_epoch_end": lambda steps: 1,
    "attach_unfused": lambda steps: steps // 100,
    "attach_adam": lambda steps: steps // 100,
    "attach_own_nomomentum": lambda steps: steps // 100,
}
MODELS = {"lenet300": 60000, "lenet5": 10000}  # images per measured epoch


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    from sparsecore.datasets import load_fashion_mnist

    ds = load_fashion_mnist()
    x = torch.from_numpy(ds.train_images[:n].astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(ds.train_labels[:n])
    described = f"{ds.name} ({ds.source}), {x.shape[0]} images"
    if x.shape[0] < n:  # only the embedded subset is there: cycle through it
        reps = -(-n // x.shape[0])
        x, y = x.repeat(reps, 1, 1, 1)[:n], y.repeat(reps)[:n]
        described += f" cycled to {n}"
    return (x - 0.2860) / 0.3530, y, described


def _model(name: str) -> nn.Module:
    from sparsecore.torch.models import build_model

    torch.manual_seed(0)
    return build_model(name)


def _epoch(
    name: str, config: str, x: torch.Tensor, y: torch.Tensor, batch: int, instrument: bool = False
) -> tuple[float, float, float]:
    """One epoch under ``config``: (wall s, CPU s of this process, s inside the adapter's hook,
    wall s of each mask update).

    The hook and update times are measured only with ``instrument`` (the clock calls cost a few
    microseconds a step, which would count against the ratio); otherwise 0 and [].
    """
    import sparsecore.torch as st

    model = _model(name).to(x.device)
    opt: torch.optim.Optimizer
    if config.endswith("_adam"):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif config.endswith("_nomomentum"):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sparse = None
    steps = x.shape[0] // batch
    cuda = x.device.type == "cuda"
    if config == "attach_optimizer":
        sparse = st.attach(model, opt, update_every=100, total_steps=10 * steps)
    elif config == "attach_own":
        sparse = st.attach(model, update_every=100, total_steps=10 * steps)
    elif config == "attach_own_torch_update":  # the own path, updates on the torch backend
        sparse = st.attach(model, update_every=100, total_steps=10 * steps, update_backend="torch")
    elif config == "attach_static":  # re-masking after each step only, no mask update
        sparse = st.attach(
            model, opt, update_every=None, update_at_epoch_end=False, total_steps=10 * steps
        )
    elif config == "attach_epoch_end":  # the paper's schedule: one update, at the epoch's end
        sparse = st.attach(
            model, opt, update_every=None, update_at_epoch_end=True, total_steps=10 * steps
        )
    elif config == "attach_unfused":  # SGD's own step, then the re-masking multiply
        sparse = st.attach(model, opt, update_every=100, total_steps=10 * steps, fused_sgd=False)
    elif config == "attach_adam":  # Adam's exp_avg as the momentum; Adam is never fused
        sparse = st.attach(model, opt, update_every=100, total_steps=10 * steps)
    elif config == "attach_own_nomomentum":  # SGD without momentum: the own EMA is the only one
        sparse = st.attach(model, update_every=100, total_steps=10 * steps)
    hook_time = [0.0]
    update_times: list[float] = []
    if sparse is not None and instrument:
        # Time spent inside the adapter's per-step routine (mask updates included), measured in
        # the same run as the epoch, so other jobs on the machine hardly disturb the share.
        # The fused SGD step (sparsecore.torch.fused_step) counts too, although it replaces SGD's
        # own update of the sparse weights.
        clock = time.perf_counter if cuda else time.process_time

        def timed(inner: Any) -> Any:
            def run(*args: Any) -> Any:
                t0 = clock()
                out = inner(*args)
                hook_time[0] += clock() - t0
                return out

            return run

        for method in ("_take_sgd_step", "_finish_sgd_step", "_after_step"):
            setattr(sparse, method, timed(getattr(sparse, method)))
        # Each mask update on its own (wall time: what one update costs inside training).
        inner_update = sparse._update

        def timed_update(step: int) -> Any:
            t0 = time.perf_counter()
            out = inner_update(step)
            if cuda:
                torch.cuda.synchronize()
            update_times.append(time.perf_counter() - t0)
            return out

        sparse._update = timed_update  # type: ignore[method-assign]
    if cuda:
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    if config == "attach_epoch_end":
        assert sparse is not None
        t0 = time.perf_counter() if cuda else time.process_time()
        sparse.end_epoch()
        hook_time[0] += (time.perf_counter() if cuda else time.process_time()) - t0
    if cuda:
        torch.cuda.synchronize()
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if sparse is not None:
        assert len(sparse.history) == UPDATES[config](steps), "mask updates did not run as set"
        sparse.detach()
    return elapsed, elapsed_cpu, hook_time[0], update_times


def _extra_bytes(name: str, config: str) -> int:
    """Bytes of the tensors the adapter adds (masks, 0/1 multipliers, own momentum)."""
    if config == "plain":
        return 0
    import sparsecore.torch as st

    model = _model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sparse = st.attach(
        model, None if config == "attach_own" else opt, total_steps=100, fused_sgd=False
    )
    tensors = [*sparse.masks, *sparse._keep, *(o for o in sparse._own if o is not None)]
    sparse.detach()
    return sum(t.numel() * t.element_size() for t in tensors)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_child(name: str, config: str, threads: int, steps: int) -> tuple[int, int]:
    """(resident KiB before training, peak resident KiB during it) in a fresh process.

    Linux only: the peak (VmHWM) is reset through /proc/self/clear_refs once torch, the data
    and a warm-up step are in memory, so the difference is what training and the adapter add.
    """
    code = (
        "import sys, torch\n"
        f"torch.set_num_threads({threads})\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('ov', {__file__!r})\n"
        "ov = importlib.util.module_from_spec(spec); spec.loader.exec_module(ov)\n"
        f"x, y, _ = ov._data({steps * 100})\n"
        f"ov._epoch({name!r}, 'plain', x[:100], y[:100], 100)\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = ov._status_kib('VmRSS')\n"
        f"ov._epoch({name!r}, {config!r}, x, y, 100)\n"
        "print(before, ov._status_kib('VmHWM'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = out.stdout.strip().splitlines()[-1].split()
    return int(before), int(after)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[c for c in ATTACHED],
        choices=list(ATTACHED),
        help="attached configurations to run (each with its plain loop); default: all",
    )
    parser.add_argument(
        "--share-rounds", type=int, default=3, help="instrumented epochs per configuration"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--memory-steps", type=int, default=200)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (times: wall only)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": args.device
            + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
            "threads": args.threads,
        },
        "models": {},
    }
    rng = random.Random(0)
    for name in args.models:
        x, y, described = _data(MODELS[name])
        x, y = x.to(args.device), y.to(args.device)
        _epoch(name, "attach_optimizer", x[:2000], y[:2000], args.batch)  # warm-up
        attached = [c for c in ATTACHED if c in args.configs]
        configs = [c for c in CONFIGS if c in attached or c in {BASELINE[a] for a in attached}]
        wall: dict[str, list[float]] = {c: [] for c in configs}
        cpu: dict[str, list[float]] = {c: [] for c in configs}
        hook_share: dict[str, list[float]] = {c: [] for c in configs}
        update_ms: dict[str, list[float]] = {c: [] for c in configs}
        for _ in range(args.rounds):
            order = list(configs)
            rng.shuffle(order)
            for config in order:
                w, c, _, _ = _epoch(name, config, x, y, args.batch)
                wall[config].append(w)
                cpu[config].append(c)
        # The hook's share of the epoch, in separate instrumented epochs (not in the ratios).
        for _ in range(args.share_rounds):
            for config in attached:
                w, c, h, u = _epoch(name, config, x, y, args.batch, instrument=True)
                hook_share[config].append(h / (w if args.device == "cuda" else c))
                update_ms[config] += [1e3 * t for t in u]
        memory = {}
        # memory of the two paths (the breakdown configurations keep the same tensors), and of
        # the optimizer path unfused: the fused step loads Numba once per process
        memory_configs = [
            c for c in ("plain", "attach_optimizer", "attach_own", "attach_unfused") if c in configs
        ]
        for config in [] if args.no_memory or args.device != "cpu" else memory_configs:
            before, peak = _peak_rss_child(name, config, args.threads, args.memory_steps)
            memory[config] = {
                "rss_before_kib": before,
                "peak_rss_kib": peak,
                "training_peak_growth_kib": peak - before,
                "adapter_tensor_bytes": _extra_bytes(name, config),
            }
        baselines = [c for c in configs if c.startswith("plain")]
        entry: dict[str, Any] = {
            "data": described,
            "steps_per_epoch": x.shape[0] // args.batch,
            "mask_updates_per_epoch": (x.shape[0] // args.batch) // 100,
            **{f"{b}_epoch_wall_s": _spread(wall[b]) for b in baselines},
            **{f"{b}_epoch_cpu_s": _spread(cpu[b]) for b in baselines},
            "overhead_cpu": {},
            "overhead_wall": {},
            "hook_share": {c: _spread(hook_share[c]) for c in attached},
            "mask_update_ms": {c: _spread(update_ms[c]) for c in attached if update_ms[c]},
            "memory": memory,
        }
        for b in baselines:
            print(
                f"{name}: {described}, {entry['steps_per_epoch']} steps/epoch, {b} epoch "
                f"{entry[f'{b}_epoch_cpu_s']['median']:.2f} s CPU / "
                f"{entry[f'{b}_epoch_wall_s']['median']:.2f} s wall (median of {args.rounds})"
            )
        for config in attached:
            share = hook_share[config]
            print(
                f"  {config:18s} time inside the adapter's step hook: median "
                f"{100 * statistics.median(share):.2f}% of the epoch "
                f"(min {100 * min(share):.2f}%, max {100 * max(share):.2f}%)"
            )
            if update_ms[config]:
                u = update_ms[config]
                print(
                    f"  {config:18s} one mask update: median {statistics.median(u):.2f} ms "
                    f"(min {min(u):.2f}, max {max(u):.2f}; {len(u)} updates)"
                )
            for label, times in (("cpu", cpu), ("wall", wall)):
                base = times[BASELINE[config]]
                ratios = [t / p for t, p in zip(times[config], base)]
                entry[f"overhead_{label}"][config] = _spread(ratios)
                print(
                    f"  {config:18s} {label:4s} time ratio median {statistics.median(ratios):.3f} "
                    f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
                )
        for config, m in memory.items():
            print(
                f"  {config:18s} peak RSS {m['peak_rss_kib'] / 1024:.1f} MiB, training added "
                f"{m['training_peak_growth_kib'] / 1024:.1f} MiB; adapter tensors "
                f"{m['adapter_tensor_bytes'] / 1024:.1f} KiB"
            )
        results["models"][name] = entry
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
