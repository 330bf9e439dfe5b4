"""The PyTorch array backend: every mask-update operation with torch ops on the tensors' device.

Only host scalars (counts, float64 sums, per-unit sums) leave the device. Selection is O(n):
``torch.topk``/``torch.kthvalue`` finds the boundary score among the candidates, everything
strictly better is taken, and only the candidates tied with the boundary are ordered by the
position hash, exactly as the NumPy reference (:mod:`sparsecore.backend_numpy`) does, so masks
agree bit for bit.

Half-precision scores (float16, bfloat16) are widened to float32 before selection: the conversion
is exact, so order and ties are those of the original values.

That is the generic, per-layer path: it reads counts back to the host several times per layer.
On CUDA tensors the engine's fused update (the paper's modes) runs instead as one packed update
of all layers, with two host reads (:mod:`sparsecore.torch.packed_update`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sparsecore.backend import (
    ArrayBackend,
    FusedLayer,
    LayerScan,
    Sign,
    register_backend_factory,
)
from sparsecore.hashing import MASK32, HashKey, mix
from sparsecore.layers import Layer

_HALF = (torch.float16, torch.bfloat16)


def torch_position_hash(key: HashKey, ids: torch.Tensor) -> torch.Tensor:
    """Hash (int64 in [0, 2**32)) of the flat positions ``ids`` of one layer."""
    return mix((ids.to(torch.int64) & MASK32) ^ key.prefix())  # a new tensor: mixed in place


_LANES_PER_CHUNK = 255  # int64 words summed per chunk: a byte lane reaches at most 255, no carry
_CHUNK_BYTES = 8 * _LANES_PER_CHUNK


def _count_true(mask: torch.Tensor) -> int:
    """Number of True entries of a boolean tensor, exactly, with one host synchronisation.

    ``sum(dtype=...)`` and ``count_nonzero`` first widen every byte, which costs more than the
    count itself. For large contiguous masks the bytes are read eight at a time as int64 words:
    summing 255 words adds each of the eight byte lanes separately (0/1 bytes, so a lane stays
    below 256 and never carries into the next), and the bytes of those few chunk sums add up to
    the count. About 9x faster than ``count_nonzero`` on a 2M-entry CPU mask.
    """
    n = mask.numel()
    if not mask.is_contiguous() or n >= 2**31:
        return int(torch.count_nonzero(mask))
    flat = mask.reshape(-1).view(torch.uint8)
    if n < 1 << 16 or mask.storage_offset() % 8:
        return int(flat.sum(dtype=torch.int32))  # small: exact in int32, cheaper than int64
    full = n - n % _CHUNK_BYTES
    chunks = flat[:full].view(torch.int64).view(-1, _LANES_PER_CHUNK).sum(dim=1)
    total = chunks.view(torch.uint8).sum(dtype=torch.int32)
    if full < n:
        total = total + flat[full:].sum(dtype=torch.int32)
    return int(total)


def _counts_in_one_read(masks: Sequence[torch.Tensor]) -> list[int]:
    """The number of True entries of each mask (all on one device), brought back together."""
    return [int(c) for c in torch.stack([m.sum() for m in masks]).tolist()]


_SUM_CHUNK = 1 << 14  # float64 copy of a chunk: at least 128 KiB


def _sum_float64(values: torch.Tensor) -> float:
    """``values.sum(dtype=torch.float64)``, without a float64 copy of the whole tensor on CPUs.

    On CPUs, a sum with a wider ``dtype`` first converts the whole input to it; for a layer of
    a million weights that is an 8 MB buffer, fresh from the operating system whenever the
    allocator has returned the last one, and filling it page by page cost several times the
    sum itself inside real training loops. Summing in eight chunks (of at least 16 384) keeps
    each copy small enough to be reused and the number of calls small. Every chunk sum is
    float64, so the result is a float64 sum in a different order: it agrees with NumPy's to
    about 1e-16 relative, as the single sum does.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if flat.device.type != "cpu" or n <= 2 * _SUM_CHUNK:
        return float(flat.sum(dtype=torch.float64))
    chunk = max(_SUM_CHUNK, -(-n // 8))
    parts = [part.sum(dtype=torch.float64) for part in flat.split(chunk)]
    return float(torch.stack(parts).sum())


def _widen(scores: torch.Tensor) -> torch.Tensor:
    return scores.float() if scores.dtype in _HALF else scores


def _sentinel(scores: torch.Tensor, largest: bool) -> torch.Tensor:
    """A score no candidate reaches, so non-candidates sort behind every candidate.

    Inputs are finite (the engine checks), so -inf/+inf never tie with a candidate; hash scores
    lie in [0, 2**32), so -1 / 2**62 serve for integer scores.
    """
    if scores.dtype.is_floating_point:
        value = -math.inf if largest else math.inf
    else:
        value = -1 if largest else 2**62
    return torch.tensor(value, dtype=scores.dtype, device=scores.device)


_NARROW_MIN = 1 << 15  # from this many values on, the k-th best is bracketed by a sample first


def _kth_best(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The k-th best of ``values`` (0-d tensor), exactly: ``topk`` for a small k, else
    ``kthvalue``; on many values a sample first narrows the search (:func:`_bracketed`)."""
    if values.numel() >= _NARROW_MIN:
        found = _bracketed(values, k, largest)
        if found is not None:
            return found
    return _kth_selected(values, k, largest)


def _kth_selected(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The k-th best of ``values`` by one selection over all of them."""
    if k <= values.numel() // 8:
        top = torch.topk(values, k, largest=largest, sorted=False).values
        return top.min() if largest else top.max()
    return torch.kthvalue(values, values.numel() - k + 1 if largest else k).values


def _bracketed(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor | None:
    """The k-th best of many ``values``, selected among the few inside a sampled bracket.

    ``kthvalue`` over millions of values that are no longer in cache costs about 12 ns each on
    a CPU; two comparisons and a gather cost a few. A strided sample of about 4096 values gives
    two bounds that should enclose the k-th best (its rank in the sample, give or take four
    standard deviations of a binomial count and 8). If the values strictly better than the better
    bound number fewer than k, and those inside the bracket make up the rest, the k-th best is
    the right one among the inside values: exact whatever the sample. Otherwise None, and the
    caller selects over all values.
    """
    n = values.numel()
    sample = values[:: max(1, n // 4096)]
    m = sample.numel()
    rank = k * m / n  # expected rank of the k-th best in the sample, best = 1
    spread = 4.0 * math.sqrt(rank * max(0.0, 1.0 - rank / m)) + 8.0
    best_rank = max(1, math.floor(rank - spread))
    worst_rank = min(m, math.ceil(rank + spread))

    # the i-th best of the sample is its (m - i + 1)-th smallest when largest
    def nth_best(i: int) -> torch.Tensor:
        return torch.kthvalue(sample, m - i + 1 if largest else i).values

    better, worse = nth_best(best_rank), nth_best(worst_rank)
    if largest:
        n_better = _count_true(values > better)
        inside = values[(values <= better) & (values >= worse)]
    else:
        n_better = _count_true(values < better)
        inside = values[(values >= better) & (values <= worse)]
    need = k - n_better
    if not 1 <= need <= inside.numel():
        return None
    return _kth_selected(inside, need, largest)


def _shortlist(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    n_candidates: int,
    largest: bool,
    magnitude: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Positions and scores of a set of candidates that holds the ``k`` best, and every
    candidate tied with the k-th best; ``(None, scores with a sentinel at non-candidates)``
    when no smaller set is found.

    - Few candidates (pruning among a sparse layer's active weights): all of them, gathered
      (and only then made ``|score|``, which saves a pass over the whole layer).
    - A small k of many candidates (growth: a few thousand of a layer's inactive positions): a
      strided sample of the candidates' scores gives a bound; the candidates at or past it
      are gathered if there are at least k of them. Every candidate better than or equal to the
      k-th best is then in the set, whatever the sample, so the selection stays exact; if
      fewer than k pass, the full path runs instead.

    Everything after this step (the k-th best, strictly better, tied) works on the short
    set: on CPUs the comparisons and ``nonzero`` over a whole layer cost far more than
    the arithmetic (a boolean result is written one byte at a time).
    """
    n = candidates.numel()
    if n_candidates * 4 < n:
        positions = torch.nonzero(candidates).reshape(-1)
        gathered = scores[positions]
        return positions, gathered.abs() if magnitude else gathered
    if magnitude:
        scores = scores.abs()
    if k <= n_candidates // 8 and n >= 1 << 16:
        stride = n // 4096
        sample = scores[::stride][candidates[::stride]]
        m = sample.numel()
        if m > 0:
            r = min(m, 2 * (k * m) // n_candidates + 16)  # about twice the sample's share
            top = torch.topk(sample, r, largest=largest, sorted=False).values
            passing = scores >= top.min() if largest else scores <= top.max()
            positions = torch.nonzero(passing & candidates).reshape(-1)
            if positions.numel() >= k:
                return positions, scores[positions]
    return None, torch.where(candidates, scores, _sentinel(scores, largest))


def select_flat(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    *,
    largest: bool,
    key: HashKey,
    magnitude: bool = False,
) -> torch.Tensor:
    """Boolean (flat) selection of the ``k`` first candidates in selection order.

    Order: score (descending if ``largest``; of ``|score|`` if ``magnitude``), then position
    hash (larger first). The boundary
    score comes from one selection over a shortlist (:func:`_shortlist`), everything strictly
    better is taken, and only the positions tied with the boundary are ranked by hash.
    """
    n_candidates = _count_true(candidates)
    if k <= 0:
        return torch.zeros_like(candidates)
    if k >= n_candidates:
        return candidates.clone()
    positions, cand_scores = _shortlist(
        _widen(scores), candidates, k, n_candidates, largest, magnitude
    )
    threshold = _kth_best(cand_scores, k, largest)
    better = cand_scores > threshold if largest else cand_scores < threshold
    tied = torch.nonzero(cand_scores == threshold).reshape(-1)
    if positions is not None:
        better_pos, tied = positions[better], positions[tied]
    need = k - _count_true(better)
    if need < tied.numel():
        # Hashes of one layer's positions are distinct (mix is a bijection on 32-bit words), so
        # the largest ``need`` hashes decide; the lower-index rule never comes into play.
        hashes = torch_position_hash(key, tied)
        tied = tied[torch.topk(hashes, need, sorted=False).indices]
    if positions is None:
        chosen = better
    else:
        chosen = torch.zeros_like(candidates)
        chosen[better_pos] = True
    chosen[tied] = True
    return chosen


class TorchBackend(ArrayBackend):
    """:class:`~sparsecore.backend.ArrayBackend` on ``torch.Tensor`` (any device, any float dtype).

    It offers the engine's fused update (magnitude pruning with momentum growth, any built-in
    redistribution) as a *packed* update: all layers in flat buffers, each stage one set of
    tensor operations for every layer, two host reads per update (per group of ``max_packed``
    weights; :mod:`sparsecore.torch.packed_update`). Masks, weights and reports are the generic
    path's, bit for bit.
    """

    name = "torch"
    supports_fused_update = True

    def __init__(
        self, *, fused: bool | None = None, max_packed: int = 1 << 26, max_chunk: int = 4096
    ) -> None:
        """``fused``: when the packed update runs. None (the default): for CUDA tensors only;
        on CPUs the per-layer path, with its shortlists of few candidates, is faster (and
        ``attach`` runs CPU updates through Numba anyway). True: on any device, CPU included
        (what the CPU tests use); False: never.

        ``max_packed``: the most weights packed together. The packed update needs about 40
        bytes of scratch memory per float32 weight at its peak (42 measured over ResNet-50 on a
        CPU), so a larger model is taken in groups of consecutive layers of at most this many
        weights (a larger layer alone), each group costing two more host reads; the default,
        2**26, keeps the scratch under 3 GB and takes ResNet-50 (25.5M weights) in one group.

        ``max_chunk``: the longest row of the packed matrix (a power of two). Tests make both
        small to reach every path.
        """
        if max_chunk < 1 or max_chunk & (max_chunk - 1):
            raise ValueError(f"max_chunk must be a power of two, got {max_chunk}")
        if max_packed < 1:
            raise ValueError(f"max_packed must be positive, got {max_packed}")
        self.fused = fused
        self.max_packed = max_packed
        self.max_chunk = max_chunk
        #: How many fused updates the packed path completed (tests and benchmarks read it).
        self.packed_updates = 0

    def owns(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(int(s) for s in x.shape)

    def dtype_kind(self, x: Any) -> str:
        if x.dtype == torch.bool:
            return "b"
        if x.dtype.is_floating_point:
            return "f"
        if x.dtype.is_complex:
            return "c"
        return "i"

    def all_finite(self, x: Any) -> bool:
        # A sum is finite only if every element is (NaN and Inf propagate): one fast reduction
        # in the array's own dtype. A non-finite sum may also be an overflow of finite values,
        # so that case gets the exact element-wise check.
        if bool(torch.isfinite(x.sum())):
            return True
        return bool(torch.isfinite(x).all())

    # -- the required primitives (the rest is overridden below, for speed) ----------------
    def from_numpy(self, a: np.ndarray, like: Any) -> Any:
        if a.dtype == np.uint32:  # hashes: torch sorts and compares int64, not uint32
            a = a.astype(np.int64)
        return torch.as_tensor(a, device=like.device)

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return x.reshape(shape)

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        return torch.movedim(x, source, destination)

    def abs(self, x: Any) -> Any:
        return x.abs()

    def positive(self, x: Any) -> Any:
        return x > 0

    def isfinite(self, x: Any) -> Any:
        return torch.isfinite(x)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return torch.where(cond, a, b)

    def nonzero(self, flat: Any) -> Any:
        return torch.nonzero(flat).reshape(-1)

    def take(self, flat: Any, index: Any) -> Any:
        return flat[index]

    def mark(self, positions: Any, size: int, like: Any) -> Any:
        out = torch.zeros(size, dtype=torch.bool, device=like.device)
        out[positions] = True
        return out

    def argsort(self, flat: Any, *, descending: bool) -> Any:
        return torch.argsort(flat, descending=descending, stable=True)

    def sum(self, x: Any, axis: int | None = None) -> np.ndarray:
        dtype = torch.float64 if x.dtype.is_floating_point else torch.int64
        total = x.sum(dtype=dtype) if axis is None else x.sum(dim=axis, dtype=dtype)
        return total.cpu().numpy()

    def count(self, mask: Any) -> int:
        return _count_true(mask)

    def count_positive(self, x: Any, mask: Any) -> int:
        return int(torch.count_nonzero(mask & (x > 0)))

    def abs_sum(self, x: Any, mask: Any | None) -> float:
        values = x.abs()
        if mask is not None:
            # |x| times the mask's 0/1 bytes, in place: the same values as a masked fill (+0
            # outside; x is finite), so the same float64 sum, and on CPUs several times faster
            # than masked_fill_ or where() with a boolean mask.
            values.mul_(mask.view(torch.uint8))
        return _sum_float64(values)

    def unit_abs_sum(self, x: Any, axis: int) -> np.ndarray:
        units = torch.movedim(x.abs(), axis, 0).reshape(x.shape[axis], -1)
        return units.sum(dim=1, dtype=torch.float64).cpu().numpy()

    def unit_count(self, mask: Any, axis: int, active: bool) -> np.ndarray:
        units = torch.movedim(mask, axis, 0).reshape(mask.shape[axis], -1)
        counts = torch.count_nonzero(units, dim=1).to(torch.int64)
        if not active:
            counts = units.shape[1] - counts
        return counts.cpu().numpy()

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
        flat = x.reshape(-1)
        candidates = mask.reshape(-1) if among_active else ~mask.reshape(-1)
        if sign == "positive":
            candidates = candidates & (flat > 0)
        elif sign == "nonpositive":
            candidates = candidates & ~(flat > 0)
        chosen = select_flat(flat, candidates, k, largest=largest, key=key, magnitude=magnitude)
        return chosen.reshape(x.shape)

    def select_per_unit(
        self,
        x: Any,
        mask: Any,
        ks: np.ndarray,
        *,
        axis: int,
        among_active: bool,
        largest: bool,
        magnitude: bool,
        key: HashKey,
    ) -> Any:
        """Vectorised over units: three stable sorts give each row's selection order at once.

        Sort keys, applied least significant first: hash (descending), score, then candidacy
        (candidates first); the first ``ks[j]`` entries of row ``j`` are chosen.
        """
        units = x.shape[axis]
        ids = torch.arange(x.numel(), device=x.device).reshape(x.shape)
        ids = torch.movedim(ids, axis, 0).reshape(units, -1)
        flat = x.reshape(-1)
        rows = _widen(flat[ids])
        scores = rows.abs() if magnitude else rows
        candidate = mask.reshape(-1)[ids] == among_active
        order = torch.sort(torch_position_hash(key, ids), dim=1, descending=True, stable=True)[1]
        order = order.gather(
            1,
            torch.sort(scores.gather(1, order), dim=1, descending=largest, stable=True)[1],
        )
        order = order.gather(
            1,
            torch.sort(
                candidate.gather(1, order).to(torch.uint8), dim=1, descending=True, stable=True
            )[1],
        )
        k = torch.as_tensor(np.asarray(ks, dtype=np.int64), device=x.device).reshape(units, 1)
        take = torch.arange(ids.shape[1], device=x.device).reshape(1, -1) < k
        out = torch.zeros(flat.shape, dtype=torch.bool, device=x.device)
        out[ids.gather(1, order)[take]] = True
        return out.reshape(x.shape)

    # -- the fused update, packed ------------------------------------------------------------
    def packs(self, layers: Sequence[Layer]) -> bool:
        """Does the packed update take these layers? All arrays on one device (a CUDA device
        unless ``fused=True``), strided, in float16/bfloat16/float32/float64 (masks boolean),
        every layer smaller than 2**31 positions."""
        from .packed_update import FLOATS, MAX_LAYER

        if self.fused is False:
            return False
        device = layers[0].mask.device
        if self.fused is None and device.type != "cuda":
            return False
        for layer in layers:
            arrays = (layer.weight, layer.mask, layer.momentum)
            if layer.momentum is None or any(
                not isinstance(a, torch.Tensor) or a.device != device or a.layout != torch.strided
                for a in arrays
            ):
                return False
            if layer.mask.dtype != torch.bool or layer.mask.numel() >= MAX_LAYER:
                return False
            if layer.weight.dtype not in FLOATS or layer.momentum.dtype not in FLOATS:
                return False
        return True

    def groups(self, layers: Sequence[Layer]) -> list[slice]:
        """Consecutive layers packed together: at most ``max_packed`` weights (or one layer)."""
        out, start, total = [], 0, 0
        for i, layer in enumerate(layers):
            n = layer.mask.numel()
            if i > start and total + n > self.max_packed:
                out.append(slice(start, i))
                start, total = i, 0
            total += n
        out.append(slice(start, len(layers)))
        return out

    def fused_scan(self, layers: Sequence[Layer], *, source: str | None) -> list[LayerScan] | None:
        if not self.packs(layers):
            return None
        from . import packed_update

        out: list[LayerScan] = []
        for group in self.groups(layers):
            out += packed_update.scan(layers[group], source, self.max_chunk)
        return out

    def fused_prune_regrow(
        self,
        layers: Sequence[Layer],
        nnz: Sequence[int],
        prune_counts: Sequence[int],
        grow_counts: Sequence[int],
        keys: Sequence[HashKey],
    ) -> list[FusedLayer] | None:
        from . import packed_update

        out: list[FusedLayer] = []
        for group in self.groups(layers):
            part = packed_update.prune_regrow(
                layers[group], prune_counts[group], grow_counts[group], keys[group], self.max_chunk
            )
            if part is None:  # a NaN/Inf weight: nothing was changed
                return None
            out += part
        self.packed_updates += 1
        return out

    def unit_nonzero(self, x: Any, axis: int) -> np.ndarray:
        return self.units_nonzero([x], [axis])[0]

    def units_nonzero(self, xs: Sequence[Any], axes: Sequence[int]) -> list[np.ndarray]:
        """Per output unit of each tensor, whether it holds a non-zero entry: computed on the
        tensors' device and brought back in one host read for all of them."""
        if not xs:
            return []
        flags = [
            (x.movedim(axis, 0).reshape(x.shape[axis], -1) != 0).any(dim=1)
            for x, axis in zip(xs, axes)
        ]
        devices = {f.device for f in flags}
        if len(devices) != 1:
            return [f.cpu().numpy() for f in flags]
        joined = torch.cat(flags).cpu().numpy()
        return list(np.split(joined, np.cumsum([f.numel() for f in flags])[:-1]))

    def counts(self, masks: Sequence[Any]) -> list[int]:
        """Every mask's count; off the CPU, in one host read instead of one per mask."""
        devices = {m.device for m in masks}
        if len(devices) != 1 or next(iter(devices)).type == "cpu":
            return [_count_true(m) for m in masks]
        return _counts_in_one_read(masks)

    def position_hash(self, key: HashKey, like: Any) -> Any:
        ids = torch.arange(like.numel(), device=like.device, dtype=torch.int64)
        return torch_position_hash(key, ids).reshape(like.shape)

    def and_not(self, a: Any, b: Any) -> Any:
        return a & ~b

    def logical_or(self, a: Any, b: Any) -> Any:
        return a | b

    def zeros_mask(self, like: Any) -> Any:
        return torch.zeros(like.shape, dtype=torch.bool, device=like.device)

    def apply(self, weight: Any, old_mask: Any, new_mask: Any) -> Any:
        return torch.where(
            old_mask & new_mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)
        )

    def signed_fill(self, x: Any, where: Any, value: float, key: HashKey) -> Any:
        odd = (self.position_hash(key, x) & 1).to(torch.bool)
        magnitude = torch.tensor(value, dtype=x.dtype, device=x.device)
        return torch.where(where, torch.where(odd, magnitude, -magnitude), x)


# Also announced as the "torch" entry point (pyproject.toml); registered here too, so that
# importing sparsecore.torch is enough even where the package metadata lacks it.
register_backend_factory("torch", TorchBackend, framework="torch")
