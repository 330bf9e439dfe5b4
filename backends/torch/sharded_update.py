"""The mask update of a sharded model (FSDP2): every process updates its own rows of each layer.

Why: under ``torch.distributed.fsdp.fully_shard`` each process holds a slice of every weight (a
DTensor, ``Shard(0)``: rows ``r*c .. (r+1)*c - 1`` of ``c = ceil(rows / world)``, the last
processes' slices shorter or empty), and the optimizer's momentum is sharded the same way.
Gathering whole layers for a mask update would cost what sharding saves. Here each process keeps
its slice and its slice of the mask; what crosses processes is a few integers per layer.

What it computes: the update of the whole layers, each process receiving its own part of the new
masks and weights, and the report of the whole layers. Given the same weights and momentum, the
masks, the weights and the report are those of a single-process packed update
(``TorchBackend(fused=True)``, :mod:`sparsecore.torch.packed_update`) of the whole tensors, bit
for bit, and so are the masks of the NumPy reference given the same budgets.

How: :class:`ShardedBackend` is an :class:`~sparsecore.backend.ArrayBackend` whose arrays are
:class:`Shard` objects (a local tensor, the whole layer's shape, the local part's offset in it),
offering the engine's fused update (:class:`ShardedUpdate`, a
:class:`sparsecore.fusion.FusedUpdate`); ``sparsecore.update`` and ``SparseEngine.update`` run
unchanged over it, so the checks, the budgets (the shared host routine) and the report are the
engine's own. Per update, with ``L`` layers and float32 values:

1. **Metadata** (two all-gathers at the start of each fused call): the layer count and a
   checksum of the names and shapes, then per layer and process the shard's offset and size,
   the dtypes and any local fault. Every process checks that the shards tile each layer exactly
   once, the same way, so a bad input raises the same
   :class:`~sparsecore.errors.SparseCoreError` on every process.
2. **Scan** (one all-reduce of ``L * 66`` int64): counts, NaN/Inf counts and the importance sums
   as exact integer buckets (:mod:`sparsecore.torch.exact_sum`). Integer sums do not depend on
   the order of the additions, so the float64 importance that the host computes from them is the
   single-process one to the last bit: no canonical order to keep, no gather.
3. **Budgets**: the engine's host routine on those figures, identical on every process.
4. **Selection** (one all-reduce per round of ``L * 2**digit_bits`` int32): the packed segmented
   radix select, whose per-layer digit histograms are summed over the processes each round, so
   every process picks the same bucket and keeps the same count of what is left to choose; a
   position's key holds the hash of its place in the whole layer (offset + local index). With
   8-bit digits a float32 key takes 8 rounds (4 for the score, 4 for the hash), so pruning and
   growth take 16 all-reduces of 1 KiB per layer.
5. **Counts** (one all-reduce of ``L * 5`` int64): net and selected counts (checked against
   the budgets) and whether a weight was NaN/Inf.

About 17 KiB per float32 layer per update (``digit_bits=4``: 32 rounds of 64 bytes, about 2.6
KiB), 22 collectives, whatever the layer's size; the scratch memory is the packed update's
(about 40 bytes per local float32 weight at the peak), taken ``max_packed`` local weights at a
time on the largest shard.

Use (every process, the same layers in the same order)::

    from sparsecore.torch.sharded_update import ShardedBackend, shard_of

    w = shard_of(param)  # a DTensor of fully_shard: this process's rows and where they lie
    layer = sparsecore.Layer(name, w, w.like(local_mask), shard_of(momentum_buffer))
    result = sparsecore.update([layer, ...], prune_rate=0.3, backend=ShardedBackend())
    result.masks[0].local, result.weights[0].local  # this process's rows of the new mask, weights

Only the paper's modes run sharded: magnitude pruning and momentum growth with any built-in
redistribution (the engine's fused update). Other modes raise a :class:`SparseCoreError`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sparsecore.backend import ArrayBackend, FusedLayer, LayerScan, Sign
from sparsecore.errors import SparseCoreError
from sparsecore.fusion import MAGNITUDE_MOMENTUM_RULES
from sparsecore.hashing import HashKey
from sparsecore.layers import Layer

from . import exact_sum
from . import packed_update as pu

#: dtype codes exchanged between processes (the order is arbitrary, the same everywhere)
_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class Shard:
    """This process's part of one layer's array: ``local`` holds the whole layer's flat (C-order)
    positions ``offset .. offset + local.numel() - 1``, that is whole rows (``local`` has the
    layer's ``shape`` but for its first dimension, which may be 0)."""

    local: torch.Tensor
    shape: tuple[int, ...]
    offset: int

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def size(self) -> int:
        """Positions of the whole layer."""
        return math.prod(self.shape)

    def like(self, local: torch.Tensor) -> Shard:
        """``local`` (another array of the layer, e.g. its mask) placed as this shard."""
        return Shard(local, self.shape, self.offset)

    def part(self, whole: Any) -> torch.Tensor:
        """This shard's positions of a whole-layer array (a tensor or a NumPy array of the
        layer's shape), as a tensor shaped like ``local`` (a view where possible)."""
        flat = torch.as_tensor(whole).reshape(-1)
        return flat[self.offset : self.offset + self.local.numel()].view(self.local.shape)


def shard_of(tensor: torch.Tensor) -> Shard:
    """The :class:`Shard` of ``tensor`` held by this process.

    A DTensor must be sharded along dimension 0 over a one-dimensional mesh (``fully_shard``'s
    ``Shard(0)``: rows ``r*c ..`` with ``c = ceil(rows / world)``); its local tensor is used
    as is (detached, same storage, so writing into ``Shard.local`` writes the parameter). A
    plain tensor is the whole layer.
    """
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor import Shard as ShardPlacement
    except ImportError:  # pragma: no cover - a torch without DTensor has no sharded tensors
        return Shard(tensor.detach(), tuple(int(d) for d in tensor.shape), 0)
    if not isinstance(tensor, DTensor):
        return Shard(tensor.detach(), tuple(int(d) for d in tensor.shape), 0)
    shape = tuple(int(d) for d in tensor.shape)
    placements = tuple(tensor.placements)
    if (
        tensor.device_mesh.ndim != 1
        or len(placements) != 1
        or type(placements[0]) is not ShardPlacement
        or placements[0].dim != 0
    ):
        raise SparseCoreError(
            f"a sharded layer must be a DTensor sharded along dimension 0 over a one-dimensional "
            f"mesh (fully_shard's Shard(0)), got placements {placements} on a mesh of shape "
            f"{tuple(tensor.device_mesh.shape)}"
        )
    local = tensor.to_local().detach()
    world, rank = tensor.device_mesh.size(), tensor.device_mesh.get_local_rank()
    per = -(-shape[0] // world)
    first = min(rank * per, shape[0])
    rows = min(per, shape[0] - first)
    if tuple(local.shape) != (rows, *shape[1:]):
        raise SparseCoreError(
            f"the local part of a DTensor of shape {shape} on rank {rank} of {world} has shape "
            f"{tuple(local.shape)}; Shard(0) lays out {(rows, *shape[1:])}"
        )
    return Shard(local, shape, first * math.prod(shape[1:]))


@dataclass(frozen=True)
class _Plan:
    """What the processes agreed on for one call: groups of layers packed together."""

    groups: list[slice]


# Local faults found before the first collective, reported by every process (code: reason).
_FAULTS = {
    1: "its local part does not hold whole rows of a layer of shape {shape}",
    2: "its shard (offset {offset}, {size} positions) does not start at a row inside the layer",
    3: "its mask or momentum is not placed like its weight (same local shape and offset)",
    4: "its weight, mask and momentum are not all on the device of the first layer's mask",
    5: "its arrays must be strided tensors: float16, bfloat16, float32 or float64 weight and "
    "momentum, a boolean mask",
    6: f"the layer is too large: the sharded update takes layers below {pu.MAX_LAYER} positions",
}


class ShardedBackend(ArrayBackend):
    """:class:`~sparsecore.backend.ArrayBackend` on :class:`Shard` arrays: each process holds
    rows of every layer; the engine's fused update runs over the whole layers (module doc).

    ``group``: the process group that shards the layers (None: the default group; without an
    initialised process group, one process holds whole layers). ``digit_bits`` (4, 8 or 16):
    bits of the selection key decided per round; each round all-reduces ``2**digit_bits``
    int32 per layer, a float32 key takes ``64 / digit_bits`` rounds per selection.
    ``max_packed``: the most local weights packed together (the packed update's scratch is
    about 40 bytes per float32 weight); layers go in consecutive groups that fit it on every
    process. ``max_chunk``: the packed rows' length, a power of two.

    Every call that reads counts or values is a collective: every process must make the same
    calls with the same layers (names, whole shapes, dtypes) in the same order, as
    ``sparsecore.update`` and ``SparseEngine.update`` do.
    """

    name = "torch-sharded"
    supports_fused_update = True

    def __init__(
        self,
        group: Any = None,
        *,
        digit_bits: int = 8,
        max_packed: int = 1 << 26,
        max_chunk: int = pu.MAX_CHUNK,
    ) -> None:
        if digit_bits not in (4, 8, 16):
            raise ValueError(f"digit_bits must be 4, 8 or 16, got {digit_bits}")
        if max_chunk < 1 or max_chunk & (max_chunk - 1):
            raise ValueError(f"max_chunk must be a power of two, got {max_chunk}")
        if max_packed < 1:
            raise ValueError(f"max_packed must be positive, got {max_packed}")
        self.group = group
        self.digit_bits = digit_bits
        self.max_packed = max_packed
        self.max_chunk = max_chunk
        #: How many fused updates completed (tests read it).
        self.packed_updates = 0

    # -- processes ------------------------------------------------------------------------
    @property
    def world(self) -> int:
        """Processes sharing the layers (1 without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        return dist.get_rank(self.group)

    def _reduce(self) -> Callable[[torch.Tensor], None] | None:
        """In-place sum over the processes, or None when there is one."""
        if self.world == 1:
            return None
        group = self.group

        def reduce(t: torch.Tensor) -> None:
            dist.all_reduce(t, group=group)

        return reduce

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        reduce = self._reduce()
        if reduce is not None:
            reduce(t)
        return t

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """``(world, *t.shape)``: every process's ``t``, in rank order."""
        if self.world == 1:
            return t.unsqueeze(0)
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts)

    # -- inspection and reductions (each a collective where it reads values) ------------------
    def owns(self, x: Any) -> bool:
        return isinstance(x, Shard)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(x.shape)

    def dtype_kind(self, x: Any) -> str:
        dtype = x.local.dtype
        if dtype == torch.bool:
            return "b"
        if dtype.is_floating_point:
            return "f"
        return "c" if dtype.is_complex else "i"

    def all_finite(self, x: Any) -> bool:
        bad = (~torch.isfinite(x.local)).sum()
        return int(self._sum(bad.reshape(1))[0]) == 0

    def count(self, mask: Any) -> int:
        return self.counts([mask])[0]

    def counts(self, masks: Sequence[Any]) -> list[int]:
        local = torch.stack([m.local.sum(dtype=torch.int64) for m in masks])
        return [int(c) for c in self._sum(local).tolist()]

    def abs_sum(self, x: Any, mask: Any | None) -> float:
        """Exact (:mod:`.exact_sum`): the same bits on any number of processes."""
        bits = pu.magnitude_bits(x.local.reshape(1, -1))
        active = (
            torch.ones_like(bits, dtype=torch.bool) if mask is None else mask.local.reshape(1, -1)
        )
        rows = torch.zeros(1, dtype=torch.int64, device=bits.device)
        table, bad = exact_sum.bucket_sums(bits, x.local.dtype, active, rows, 1)
        host = self._sum(torch.cat([table.reshape(-1), bad])).tolist()
        if host[-1]:
            return math.nan
        buckets = exact_sum.FORMATS[x.local.dtype].buckets
        return exact_sum.to_float(host[buckets : 2 * buckets], x.local.dtype)

    # -- element-wise, local ------------------------------------------------------------------
    def and_not(self, a: Any, b: Any) -> Any:
        return a.like(a.local & ~b.local)

    def logical_or(self, a: Any, b: Any) -> Any:
        return a.like(a.local | b.local)

    def zeros_mask(self, like: Any) -> Any:
        return like.like(torch.zeros_like(like.local, dtype=torch.bool))

    def apply(self, weight: Any, old_mask: Any, new_mask: Any) -> Any:
        w = weight.local
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        return weight.like(torch.where(old_mask.local & new_mask.local, w, zero))

    # -- what a shard cannot do ---------------------------------------------------------------
    def _unsupported(self, what: str) -> SparseCoreError:
        return SparseCoreError(
            f"{what} is not available on sharded layers: the sharded update runs magnitude "
            f"pruning with momentum growth (prune='magnitude', growth='momentum', any built-in "
            f"redistribution)"
        )

    def count_positive(self, x: Any, mask: Any) -> int:
        raise self._unsupported("counting positive weights (SET pruning)")

    def unit_abs_sum(self, x: Any, axis: int) -> np.ndarray:
        raise self._unsupported("per-unit sums (momentum_neuron growth)")

    def unit_count(self, mask: Any, axis: int, active: bool) -> np.ndarray:
        """Exact: integer counts, summed over the processes in one all-reduce."""
        return self._unit_counts([mask.like(mask.local == active)], [axis])[0]

    def unit_nonzero(self, x: Any, axis: int) -> np.ndarray:
        return self.units_nonzero([x], [axis])[0]

    def units_nonzero(self, xs: Sequence[Any], axes: Sequence[int]) -> list[np.ndarray]:
        """Dead-unit counts of every layer in one all-reduce: each process counts its rows'
        non-zero entries per unit; a unit is non-zero where the sum over processes is."""
        counts = self._unit_counts([x.like(x.local != 0) for x in xs], axes)
        return [c > 0 for c in counts]

    def _unit_counts(self, flags: Sequence[Shard], axes: Sequence[int]) -> list[np.ndarray]:
        """Per layer, per output unit (index along its axis), the number of True entries of the
        boolean shard over all processes. A shard holds whole rows: along axis 0 its rows are the
        units ``offset // row .. + rows``; along another axis every process holds part of every
        unit."""
        parts = []
        for flag, axis in zip(flags, axes):
            units = flag.shape[axis]
            local = flag.local
            if axis == 0:
                row = math.prod(flag.shape[1:])
                first = flag.offset // row if row else 0
                whole = torch.zeros(units, dtype=torch.int64, device=local.device)
                rows = local.reshape(local.shape[0], row).sum(dim=1, dtype=torch.int64)
                whole[first : first + local.shape[0]] = rows
            else:
                moved = local.movedim(axis, 0).reshape(units, local.numel() // max(units, 1))
                whole = moved.sum(dim=1, dtype=torch.int64)
            parts.append(whole)
        if not parts:
            return []
        total = self._sum(torch.cat(parts)).cpu().numpy().astype(np.int64)
        return list(np.split(total, np.cumsum([p.numel() for p in parts])[:-1]))

    def select(
        self,
        x: Any,
        mask: Any,
        k: int,
        *,
        among_active: bool,
        largest: bool,
        magnitude: bool,
        key: HashKey,
        sign: Sign = "any",
    ) -> Any:
        raise self._unsupported("a per-layer selection (the generic update path)")

    def position_hash(self, key: HashKey, like: Any) -> Any:
        raise self._unsupported("the position hash of a layer (random growth)")

    # -- the fused update, sharded ------------------------------------------------------------
    def fused_update(self) -> ShardedUpdate:
        """The engine's fused update over these shards (:class:`ShardedUpdate`)."""
        return ShardedUpdate(self)

    def _plan(self, layers: Sequence[Layer]) -> _Plan:
        """Agree with the other processes on the layers (two all-gathers), check that their
        shards tile every layer, and group the layers; raises the same error everywhere."""
        device = layers[0].mask.local.device
        header = torch.tensor([len(layers), _checksum(layers)], dtype=torch.int64, device=device)
        headers = self._gather(header).tolist()
        if any(h != headers[0] for h in headers):
            raise SparseCoreError(
                "the processes passed different layers to the sharded mask update (layer count "
                f"and checksum of names and shapes per rank: {[tuple(h) for h in headers]}); "
                "every process must pass the same layers in the same order"
            )
        local = torch.tensor(
            [_local_facts(layer, device) for layer in layers], dtype=torch.int64, device=device
        )
        facts = self._gather(local).cpu().numpy()  # (world, layers, 5)
        for i, layer in enumerate(layers):
            _check_tiling(layer, facts[:, i, :])
        sizes = facts[:, :, 1]  # local positions per process and layer
        groups, start = [], 0
        for i in range(1, len(layers) + 1):
            if i == len(layers) or sizes[:, start : i + 1].sum(axis=1).max() > self.max_packed:
                groups.append(slice(start, i))
                start = i
        return _Plan(groups)


class ShardedUpdate:
    """:class:`sparsecore.fusion.FusedUpdate` over row shards: the packed update
    (:mod:`sparsecore.torch.packed_update`) of each group of layers on this process's rows, its
    per-layer integers summed over the processes (module doc). It serves the paper's rules."""

    prune = MAGNITUDE_MOMENTUM_RULES["prune"]
    growth = MAGNITUDE_MOMENTUM_RULES["growth"]
    importance = MAGNITUDE_MOMENTUM_RULES["importance"]

    def __init__(self, backend: ShardedBackend) -> None:
        self.backend = backend

    def scan(self, layers: Sequence[Layer], *, source: str | None) -> list[LayerScan]:
        be = self.backend
        plan = be._plan(layers)
        local = _local_layers(layers)
        out: list[LayerScan] = []
        for group in plan.groups:
            out += pu.scan(local[group], source, be.max_chunk, reduce=be._reduce())
        return out

    def prune_regrow(
        self,
        layers: Sequence[Layer],
        nnz: Sequence[int],
        prune_counts: Sequence[int],
        grow_counts: Sequence[int],
        keys: Sequence[HashKey],
    ) -> list[FusedLayer] | None:
        be = self.backend
        plan = be._plan(layers)
        local = _local_layers(layers)
        out: list[FusedLayer] = []
        for group in plan.groups:
            part = pu.prune_regrow(
                local[group],
                prune_counts[group],
                grow_counts[group],
                keys[group],
                be.max_chunk,
                offsets=[layer.weight.offset for layer in layers[group]],
                reduce=be._reduce(),
                digit_bits=be.digit_bits,
            )
            if part is None:  # a NaN/Inf weight on some process: every process stops here
                return None
            for layer, result in zip(layers[group], part):
                out.append(
                    FusedLayer(
                        mask=layer.weight.like(result.mask),
                        weight=layer.weight.like(result.weight),
                        net_pruned=result.net_pruned,
                        net_grown=result.net_grown,
                    )
                )
        be.packed_updates += 1
        return out


def _momentum(layer: Layer) -> Shard:
    assert layer.momentum is not None  # the engine's checks require it
    return layer.momentum


def _local_layers(layers: Sequence[Layer]) -> list[Layer]:
    return [
        Layer(x.name, x.weight.local, x.mask.local, _momentum(x).local, axis=x.axis) for x in layers
    ]


def _checksum(layers: Sequence[Layer]) -> int:
    text = "\n".join(f"{x.name}:{tuple(x.weight.shape)}" for x in layers)
    return zlib.crc32(text.encode())


def _dtype_code(t: torch.Tensor) -> int:
    return _DTYPES.index(t.dtype) if t.dtype in _DTYPES else len(_DTYPES)


def _local_facts(layer: Layer, device: torch.device) -> list[int]:
    """Per layer: offset, local positions, local fault code, weight and momentum dtype codes."""
    w, m, p = layer.weight, layer.mask, _momentum(layer)
    shape, local = tuple(w.shape), w.local
    row = math.prod(shape[1:])
    fault = 0
    if local.dim() != len(shape) or tuple(local.shape[1:]) != shape[1:]:
        fault = 1
    elif not 0 <= w.offset <= math.prod(shape) - local.numel() or w.offset % row:
        fault = 2
    elif any(
        not isinstance(a, Shard) or a.offset != w.offset or a.local.shape != local.shape
        for a in (m, p)
    ):
        fault = 3
    elif any(a.local.device != device for a in (w, m, p)):
        fault = 4
    elif (
        any(a.local.layout != torch.strided for a in (w, m, p))
        or m.local.dtype != torch.bool
        or w.local.dtype not in pu.FLOATS
        or p.local.dtype not in pu.FLOATS
    ):
        fault = 5
    elif math.prod(shape) >= pu.MAX_LAYER:
        fault = 6
    return [w.offset, local.numel(), fault, _dtype_code(w.local), _dtype_code(p.local)]


def _check_tiling(layer: Layer, facts: np.ndarray) -> None:
    """``facts``: ``(world, 5)`` of one layer. Raise if a process found a fault, the dtypes
    differ between processes, or the shards do not hold every position exactly once."""
    shape = tuple(layer.weight.shape)
    for rank, (offset, size, fault, _, _) in enumerate(facts.tolist()):
        if fault:
            reason = _FAULTS[fault].format(shape=shape, offset=offset, size=size)
            raise SparseCoreError(f"layer {layer.name!r}: on rank {rank}, {reason}")
    if len({(int(a), int(b)) for a, b in facts[:, 3:5]}) > 1:
        names = [
            (_DTYPES[a] if a < len(_DTYPES) else "?", _DTYPES[b] if b < len(_DTYPES) else "?")
            for a, b in facts[:, 3:5].tolist()
        ]
        raise SparseCoreError(
            f"layer {layer.name!r}: weight and momentum dtypes differ between ranks: {names}"
        )
    held = sorted((int(o), int(n)) for o, n, *_ in facts.tolist() if n > 0)
    end = 0
    for offset, size in held:
        if offset != end:
            break
        end += size
    else:
        if end == math.prod(shape):
            return
    raise SparseCoreError(
        f"layer {layer.name!r} of shape {shape}: the ranks' shards (offset, positions) "
        f"{[(int(o), int(n)) for o, n, *_ in facts.tolist()]} do not hold each of its "
        f"{math.prod(shape)} positions exactly once"
    )
