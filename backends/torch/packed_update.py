"""The fused mask update of all layers at once, in flat buffers: few launches, two host reads.

Why: the per-layer torch path sends every layer's counts and sums back to the host and runs a few
dozen small operations per layer. On a GPU that is host-bound: a ResNet-50 update took 102 ms
for 22.7 ms of GPU work, in about 7,300 launches and 1,371 host synchronisations
(docs/kernels-gpu.md). Here every stage handles all layers with one set of tensor operations.

How (the engine's fused update, :class:`sparsecore.fusion.FusedUpdate`: :func:`scan` and
:func:`prune_regrow`, which :class:`~sparsecore.torch.backend.TorchBackend` offers per group as
``fused_scan``/``fused_prune_regrow`` and :class:`~sparsecore.torch.sharded_update.ShardedUpdate`
over row shards):

- **Packing.** Each layer's flat (C-order) values are copied into one buffer, starting on a
  multiple of the chunk size ``C`` and padded with zeros (mask False) to a whole number of
  chunks, so the buffer is a ``(chunks, C)`` matrix whose every row belongs to one layer.
  Per-layer values are broadcast along rows; per-layer counts are row sums, then a sum over
  each layer's rows gathered into a ``(layers, most rows)`` matrix.
- **Exact importance sums.** The ``|x|`` sums of the scan are exact integer sums of mantissas
  bucketed by exponent (:mod:`sparsecore.torch.exact_sum`), rounded once to float64 on the host:
  the same bits whatever the order of the additions, so a sharded update
  (:mod:`sparsecore.torch.sharded_update`) finds the very same budgets, and the same on every
  run and every device.
- **The order key.** Selection order (ALGORITHM.md) is score, then the position hash (larger
  first), then the lower index; within a layer the hash is a bijection of the position, so the
  pair ``(score bits, 2**32 - 1 - hash)`` is a distinct integer key per position, and "the k
  best" is "the k smallest keys". The bits of ``|x|`` (sign cleared) order like the values, with
  -0.0 and +0.0 equal; for growth, largest first, the key is ``max - bits``. Integer keys also
  keep subnormal values exact on devices that flush them in float arithmetic.
- **Segmented radix select.** The k-th smallest key of every layer is found 16 bits at a time,
  all layers together: a histogram of the current digit of every still-undecided candidate
  (``index_add_`` into ``layer * 65536 + digit``; the others are spread over a few thousand
  spare bins so that they do not pile onto one counter), a cumulative sum per layer, and the
  first bucket where the count reaches that layer's remaining k. Candidates in lower buckets
  are selected, those in higher ones dropped, the bucket's own go on to the next digit. After
  the last digit exactly one candidate per layer is left: the k-th. float32 keys take 4 rounds
  (2 score digits, 2 hash digits), float16/bfloat16 3, float64 6. Every round is a fixed number
  of operations with shapes known in advance, so nothing waits for the device.
- **Shards.** A layer may be one process's part of a whole layer (its rows ``offset ..``):
  positions are hashed at their place in the whole layer, and a ``reduce`` hook sums every
  per-layer figure (scan, each round's histograms, the final counts) over the processes, so
  each process selects exactly its part of the whole layer's selection.
- **Host reads.** The scan reads per-layer counts and sums once; the budgets (the engine's host
  routine) go back to the device by a non-blocking copy; prune and regrow run without a host
  read until one at the end, which fetches the net counts, the selected counts (checked against
  the budgets) and whether a weight is NaN/Inf.

Every layer's arrays must be on one device; layers are float16, bfloat16, float32 or float64
(weights and momentum may differ; values are widened exactly to the widest type present).
Scratch memory peaks at about 40 bytes per float32 weight; :class:`TorchBackend` calls these
functions on groups of layers of at most ``max_packed`` weights (two host reads per group).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sparsecore.backend import FusedLayer, LayerScan
from sparsecore.hashing import MASK32, HashKey, mix
from sparsecore.layers import Layer

from . import exact_sum

#: Sums a tensor over every process in place (an all-reduce); None in a single process.
Reduce = Callable[[torch.Tensor], None]

DIGIT_BITS = 16
MAX_CHUNK = 4096  # positions per row of the packed matrix (a power of two)
SPARE_BINS = 4096  # histogram bins that collect the decided positions, spread by column
#: Layers must be smaller than this: per-bucket counts are int32, and the hash is a bijection of
#: positions below 2**32 only.
MAX_LAYER = 1 << 31

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BITS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
_WIDTH = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}
# The pattern of +inf: |x| bits at or above it are Inf or NaN.
_INF_BITS = {
    torch.float16: 0x7C00,
    torch.bfloat16: 0x7F80,
    torch.float32: 0x7F800000,
    torch.float64: 0x7FF0000000000000,
}


@dataclass(frozen=True)
class Layout:
    """Where each layer lies in the packed ``(chunks, chunk)`` matrix, and per-row constants.

    Built once per (device, layer sizes, chunk limit, offsets) and cached: an update only reads
    it. A layer may have no positions (an empty shard): it then has no rows.
    """

    sizes: tuple[int, ...]
    chunk: int
    starts: tuple[int, ...]  # flat offset of each layer (a multiple of ``chunk``)
    pads: tuple[int, ...]  # zeros after each layer, up to the next multiple of ``chunk``
    chunks: int
    row_layer: torch.Tensor  # (chunks,) int64: the layer of each row
    row_first: torch.Tensor  # (chunks, 1) int64: position in its layer of a row's first column
    row_valid: torch.Tensor  # (chunks, 1) int64: positions of the row that belong to the layer
    columns: torch.Tensor  # (1, chunk) int64: 0 .. chunk-1
    layer_rows: torch.Tensor  # (layers, most rows) int64: rows of each layer; ``chunks`` pads
    bin_layer: torch.Tensor  # (chunks, 1) int32: the layer of each row (histogram offsets)
    spread: torch.Tensor  # (1, chunk) int32: the spare bin of each column, 0 .. SPARE_BINS-1

    @property
    def layers(self) -> int:
        return len(self.sizes)

    def valid(self) -> torch.Tensor:
        """(chunks, chunk) bool: True where a position belongs to a layer (not padding)."""
        return self.columns < self.row_valid


def layout_for(
    sizes: Sequence[int],
    device: torch.device,
    max_chunk: int = MAX_CHUNK,
    offsets: Sequence[int] | None = None,
) -> Layout:
    """The (cached) layout of layers of ``sizes`` elements on ``device``.

    ``offsets``: the position in its whole layer of each layer's first element (a shard of a
    layer starts inside it); the position hash that breaks ties reads it. 0 by default.
    """
    offs = (0,) * len(sizes) if offsets is None else tuple(int(o) for o in offsets)
    return _layout(tuple(int(n) for n in sizes), torch.device(device), int(max_chunk), offs)


@functools.lru_cache(maxsize=8)
def _layout(
    sizes: tuple[int, ...], device: torch.device, max_chunk: int, offsets: tuple[int, ...]
) -> Layout:
    # Rows as long as the largest layer needs, up to max_chunk: small models pad little.
    chunk = min(max_chunk, 1 << (max(max(sizes), 1) - 1).bit_length())
    rows = np.array([-(-n // chunk) for n in sizes], dtype=np.int64)
    first_row = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    chunks = int(rows.sum())
    row_layer = np.repeat(np.arange(len(sizes)), rows)
    row_first = (np.arange(chunks) - first_row[row_layer]) * chunk
    row_valid = np.minimum(np.array(sizes, dtype=np.int64)[row_layer] - row_first, chunk)
    row_first += np.array(offsets, dtype=np.int64)[row_layer]
    layer_rows = np.full((len(sizes), int(rows.max())), chunks, dtype=np.int64)
    for i, (r, f) in enumerate(zip(rows, first_row)):
        layer_rows[i, :r] = np.arange(f, f + r)
    columns = np.arange(chunk)
    return Layout(
        sizes=sizes,
        chunk=chunk,
        starts=tuple(int(f) * chunk for f in first_row),
        pads=tuple(int(r) * chunk - n for r, n in zip(rows, sizes)),
        chunks=chunks,
        row_layer=to_device(row_layer, device),
        row_first=to_device(row_first.reshape(-1, 1), device),
        row_valid=to_device(row_valid.reshape(-1, 1), device),
        columns=to_device(columns.reshape(1, -1), device),
        layer_rows=to_device(layer_rows, device),
        bin_layer=to_device(row_layer.reshape(-1, 1), device).to(torch.int32),
        spread=to_device(columns.reshape(1, -1) % SPARE_BINS, device).to(torch.int32),
    )


# -- moving data -----------------------------------------------------------------------------


def pack(tensors: Sequence[torch.Tensor], layout: Layout) -> torch.Tensor:
    """The ``(chunks, chunk)`` matrix of ``tensors`` (flattened in C order, zero padded), in
    the widest of their dtypes (widening between these float types is exact)."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    zeros = torch.zeros(max(layout.pads), dtype=dtype, device=tensors[0].device)
    parts: list[torch.Tensor] = []
    for t, pad in zip(tensors, layout.pads):
        parts.append(t.reshape(-1))
        if pad:
            parts.append(zeros[:pad])
    return torch.cat(parts).view(layout.chunks, layout.chunk)


def per_layer(row_values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Per-layer sums of per-row values, always in the same order (no atomics)."""
    padded = torch.cat([row_values, row_values.new_zeros(1)])
    return padded[layout.layer_rows].sum(dim=1)


def to_device(values: np.ndarray | Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Host integers as an int64 tensor on ``device``, copied without waiting for the device
    (from pinned memory, on CUDA): a blocking copy would wait for all queued work."""
    host = torch.as_tensor(np.asarray(values, dtype=np.int64))
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def read(columns: Sequence[torch.Tensor]) -> np.ndarray:
    """Per-layer columns, each ``(layers,)`` or ``(k, layers)``, fetched to the host in one
    copy (the one synchronisation of a stage) as a ``(all columns, layers)`` array.

    Integer and boolean columns travel as int64, exactly; with a float column, all travel as
    float64 (counts below 2**53 stay exact).
    """
    layers = columns[0].shape[-1]
    exact = not any(c.dtype.is_floating_point for c in columns)
    dtype = torch.int64 if exact else torch.float64
    return torch.cat([c.reshape(-1, layers).to(dtype) for c in columns]).cpu().numpy()


# -- keys and selection ----------------------------------------------------------------------


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` as integers that order like the values (the sign bit cleared): int32 for
    16- and 32-bit floats, int64 for float64."""
    bits = x.view(_BITS[x.dtype])
    if _WIDTH[x.dtype] == 16:
        return bits.to(torch.int32) & 0x7FFF
    return bits & ((1 << (_WIDTH[x.dtype] - 1)) - 1)


def inverted_hash(layout: Layout, prefixes: torch.Tensor) -> torch.Tensor:
    """``2**32 - 1 - hash`` of every packed position (its bits in an int32): smaller first."""
    x = layout.row_first + layout.columns  # position in its layer
    x ^= prefixes[layout.row_layer].reshape(-1, 1)
    x = mix(x)  # in place: one int64 temporary at a time, not one per step
    return x.neg_().add_(MASK32).to(torch.int32)


def _digit(word: torch.Tensor, width: int, shift: int, bits: int) -> torch.Tensor:
    """Bits ``shift .. shift + bits - 1`` of ``word`` as int32 (one operation where one
    suffices)."""
    if shift == 0:
        digit = word & ((1 << bits) - 1)
    elif shift + bits == width and word.dtype == torch.int64:
        digit = word >> shift  # the top digit of a non-negative word: nothing above it
    else:  # int32 words may be negative (a 32-bit key): the shift brings the sign bits along
        digit = (word >> shift) & ((1 << bits) - 1)
    return digit.to(torch.int32)


def select_smallest(
    digits: Sequence[tuple[torch.Tensor, int]],
    candidates: torch.Tensor,
    k: torch.Tensor,
    layout: Layout,
    *,
    digit_bits: int = DIGIT_BITS,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """Per layer, the ``k[layer]`` candidates with the smallest keys (bool, packed shape).

    The key is the concatenation of the ``digits`` words, most significant first, each given
    with its width in bits (a multiple of 16; a word's bits above its width are zero). Keys
    must be distinct within a layer and ``0 <= k <= candidates`` per layer.

    ``digit_bits`` (a power of two up to 16): bits decided per round; each round's histogram
    has ``2**digit_bits`` bins per layer. ``reduce``: where candidates are spread over
    processes (the shards of a layer, :mod:`sparsecore.torch.sharded_update`), it sums each
    round's per-layer histograms over all of them, so every process picks the same buckets and
    the selection is that of the whole layer; ``k`` is then the whole layer's count.
    """
    buckets = 1 << digit_bits
    bins = layout.layers * buckets
    base = layout.bin_layer * buckets
    spare = layout.spread + bins
    undecided = candidates.clone()
    chosen = torch.zeros_like(candidates)
    left = k.to(torch.int32)  # int32 throughout: no widening copies of the histograms
    ones = torch.ones((), dtype=torch.int32, device=candidates.device).expand(candidates.numel())
    for word, width in digits:
        for shift in range(width - digit_bits, -1, -digit_bits):
            digit = _digit(word, width, shift, digit_bits)
            target = torch.where(undecided, base + digit, spare)
            hist = torch.zeros(bins + SPARE_BINS, dtype=torch.int32, device=digit.device)
            hist.index_add_(0, target.reshape(-1), ones)
            if reduce is not None:
                reduce(hist[:bins])
            counts = hist[:bins].view(layout.layers, buckets).cumsum(dim=1, dtype=torch.int32)
            # the first bucket whose running count reaches what is left to choose
            bucket = (counts < left.reshape(-1, 1)).sum(dim=1, dtype=torch.int32)
            below = counts.gather(1, (bucket - 1).clamp(min=0).reshape(-1, 1).long()).reshape(-1)
            left = left - torch.where(bucket > 0, below, 0)
            pick = bucket.clamp(max=buckets - 1)[layout.row_layer].reshape(-1, 1)
            chosen |= undecided & (digit < pick)
            undecided &= digit == pick
    # one candidate is left in each layer with k > 0: its k-th smallest key
    return chosen | (undecided & (k > 0)[layout.row_layer].reshape(-1, 1))


# -- the two engine calls --------------------------------------------------------------------


def _momenta(layers: Sequence[Layer]) -> list[torch.Tensor]:
    out = []
    for layer in layers:
        assert layer.momentum is not None  # the engine's checks require it
        out.append(layer.momentum)
    return out


def scan(
    layers: Sequence[Layer],
    source: str | None,
    max_chunk: int = MAX_CHUNK,
    *,
    reduce: Reduce | None = None,
) -> list[LayerScan]:
    """The fused scan of all layers: nnz, the exact ``|source|`` sums, finiteness.

    The sums are exact, correctly rounded once to float64 (:mod:`.exact_sum`): the same bits
    whatever the packing or the sharding. Every figure is an integer on the device (counts,
    bucket sums), so ``reduce`` (sharded layers) adds them over the processes exactly before the
    one host read.
    """
    first = layers[0].mask
    layout = layout_for([t.mask.numel() for t in layers], first.device, max_chunk)
    mask = pack([t.mask for t in layers], layout)
    momentum = pack(_momenta(layers), layout)
    p_dtype = momentum.dtype
    p_bits = magnitude_bits(momentum)
    del momentum
    columns = [per_layer(mask.sum(dim=1), layout)]
    sums_dtype = p_dtype
    if source == "momentum":
        table, bad = exact_sum.bucket_sums(p_bits, p_dtype, mask, layout.row_layer, layout.layers)
        columns += [bad, table.T]
    else:
        columns.append(per_layer((p_bits >= _INF_BITS[p_dtype]).sum(dim=1), layout))
        if source == "weight":
            weight = pack([t.weight for t in layers], layout)
            sums_dtype = weight.dtype
            table, bad = exact_sum.bucket_sums(
                magnitude_bits(weight), sums_dtype, mask, layout.row_layer, layout.layers
            )
            columns += [bad, table.T]
    del p_bits
    stacked = torch.cat([c.reshape(-1, layout.layers).to(torch.int64) for c in columns])
    if reduce is not None:
        reduce(stacked)
    host = read([stacked])
    buckets = exact_sum.FORMATS[sums_dtype].buckets
    out = []
    for i in range(layout.layers):
        finite = host[1, i] == 0  # no NaN/Inf in the momentum
        active = total = 0.0
        if source is not None:
            inactive_sums, active_sums = host[-2 * buckets : -buckets, i], host[-buckets:, i]
            active = exact_sum.to_float(active_sums, sums_dtype)
            total = exact_sum.to_float(inactive_sums + active_sums, sums_dtype)
            source_bad = host[1, i] if source == "momentum" else host[2, i]
            finite = finite and source_bad == 0 and math.isfinite(total)
        out.append(LayerScan(int(host[0, i]), active, total, bool(finite)))
    return out


def prune_regrow(
    layers: Sequence[Layer],
    prune_counts: Sequence[int],
    grow_counts: Sequence[int],
    keys: Sequence[HashKey],
    max_chunk: int = MAX_CHUNK,
    *,
    offsets: Sequence[int] | None = None,
    reduce: Reduce | None = None,
    digit_bits: int = DIGIT_BITS,
) -> list[FusedLayer] | None:
    """The fused prune and regrow of all layers (contract: ``FusedUpdate.prune_regrow``).

    None if a weight is NaN or Inf.

    Sharded layers (:mod:`sparsecore.torch.sharded_update`): each of ``layers`` is this
    process's part of a layer, starting at position ``offsets[l]`` of the whole layer (the
    hash that breaks ties reads whole-layer positions), and the counts are the whole layers'.
    ``reduce`` sums the selection's histograms (``digit_bits`` per round) and the final counts
    over the processes; each process gets the new masks and weights of its own part.
    """
    first = layers[0].mask
    layout = layout_for([t.mask.numel() for t in layers], first.device, max_chunk, offsets)
    mask = pack([t.mask for t in layers], layout)
    weight = pack([t.weight for t in layers], layout)
    momentum = pack(_momenta(layers), layout)
    budgets = to_device(
        [list(prune_counts), list(grow_counts), [key.prefix() for key in keys]], first.device
    )
    inverted = inverted_hash(layout, budgets[2])
    w_bits = magnitude_bits(weight)
    not_finite = (w_bits >= _INF_BITS[weight.dtype]).any()
    pruned = select_smallest(
        [(w_bits, _WIDTH[weight.dtype]), (inverted, 32)], mask, budgets[0], layout,
        digit_bits=digit_bits, reduce=reduce,
    )  # fmt: skip
    del w_bits  # scratch goes as soon as it is done with: the peak is a few words per weight
    kept = mask & ~pruned
    p_width = _WIDTH[momentum.dtype]
    grow_key = magnitude_bits(momentum)
    grow_key.neg_().add_((1 << (p_width - 1)) - 1)  # largest |p| first
    del momentum
    grown = select_smallest(
        [(grow_key, p_width), (inverted, 32)], layout.valid() & ~kept, budgets[1], layout,
        digit_bits=digit_bits, reduce=reduce,
    )  # fmt: skip
    del grow_key, inverted
    new_mask = kept | grown
    new_weight = torch.where(
        mask & new_mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)
    )
    del weight
    counts = torch.stack(
        [
            per_layer((mask & ~new_mask).sum(dim=1), layout),
            per_layer((new_mask & ~mask).sum(dim=1), layout),
            per_layer(pruned.sum(dim=1), layout),
            per_layer(grown.sum(dim=1), layout),
            not_finite.expand(layout.layers).to(torch.int64),
        ]
    )
    if reduce is not None:
        reduce(counts)
    host = read([counts]).tolist()
    if host[4][0]:
        return None
    if host[2] != list(prune_counts) or host[3] != list(
        grow_counts
    ):  # pragma: no cover - a broken device operation, not a user error
        raise RuntimeError(
            f"packed mask update selected {host[2]} / {host[3]} weights for budgets "
            f"{list(prune_counts)} / {list(grow_counts)}"
        )
    flat_mask, flat_weight = new_mask.reshape(-1), new_weight.reshape(-1)
    out = []
    for i, layer in enumerate(layers):
        start, n = layout.starts[i], layout.sizes[i]
        w = flat_weight[start : start + n].view(layer.weight.shape)
        out.append(
            FusedLayer(
                mask=flat_mask[start : start + n].view(layer.mask.shape),
                weight=w if w.dtype == layer.weight.dtype else w.to(layer.weight.dtype),
                net_pruned=int(host[0][i]),
                net_grown=int(host[1][i]),
            )
        )
    return out
