"""The :class:`NumbaBackend` class: the NumPy reference with its heavy passes compiled."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np

from ..backend import FusedLayer, LayerScan, Sign
from ..backend_numpy import NumpyBackend
from ..hashing import HashKey
from ..layers import Layer
from .bits import (
    _EXPONENT_MASK,
    _UINT_OF_SIZE,
    DENSE_MIN,
    MAX_SAMPLES,
    MIN_CHUNK,
    MIN_SAMPLES,
    PARALLEL_MIN,
    SAMPLE_SHIFT,
    SMALL_LAYER,
    SPREAD,
    _flat,
    rank_params,
)
from .fused import (
    _TOP,
    BufferPool,
    _chunk_decide,
    _chunk_scan,
    _chunk_scan_half,
    _fused_bounds,
    _fused_dtype,
    _fused_resolve,
)
from .passes import (
    _chunk_abs_sum,
    _chunk_abs_sum_half,
    _chunk_and_not,
    _chunk_apply,
    _chunk_candidates,
    _chunk_hash,
    _chunk_max_magnitude,
    _units_nonzero,
)
from .selection import _select_units, select_flat
from .threads import _map_layers, _run, _spans


class NumbaBackend(NumpyBackend):
    """NumPy arrays, with every full-layer pass compiled, fused and run on all cores.

    It inherits the NumPy reference for the cheap operations (shapes, counts, per-unit sums) and
    replaces the passes that dominate an update: selection, masked sums, finiteness checks,
    hashing and applying masks. ``owns`` still answers for plain arrays (the engine checks layers
    with it), but :func:`~sparsecore.backend.backend_for` gives NumPy arrays to the NumPy backend:
    this one is chosen by name.
    """

    name = "numba"

    def __init__(
        self,
        *,
        sampled: bool = True,
        small_layer: int = SMALL_LAYER,
        min_chunk: int = MIN_CHUNK,
        fused: bool = True,
        spread: tuple[float, float] = (SPREAD, 2.0),
        dense_min: int = DENSE_MIN,
        parallel_min: int = PARALLEL_MIN,
    ) -> None:
        """The defaults are the fast choices; the options exist to test every path.

        ``fused=False`` withdraws the fused-update capability (the engine then runs the generic
        update on this backend's operations); ``spread`` is the half-width of the fused path's
        sampled intervals, (standard deviations, extra ranks): a narrow one forces its fallback;
        layers of at least ``dense_min`` weights refine the intervals on a denser sample.
        ``sampled=False`` makes the fused path leave every candidate undecided. A fused update
        of fewer than ``parallel_min`` weights in all runs on the calling thread alone.
        """
        super().__init__()
        self.sampled = sampled
        self.small_layer = small_layer
        self.min_chunk = min_chunk
        self.parallel_min = parallel_min
        self.supports_fused_update = fused
        self._buffers = BufferPool()
        self._scratch = threading.local()
        self.spread = spread
        self.dense_min = dense_min
        # How often each way through the fused update ran: tests use it to see every branch.
        self.fused_paths: dict[str, int] = dict.fromkeys(
            ("decided", "resolved", "prune_miss", "grow_miss"), 0
        )

    # -- the fused update -------------------------------------------------------------------
    def fused_scan(self, layers: Sequence[Layer], *, source: str | None) -> list[LayerScan] | None:
        if not all(_fused_dtype(layer) for layer in layers):
            return None

        def scan(i: int, split: bool) -> LayerScan:
            layer = layers[i]
            mask = _flat(layer.mask)
            nnz, active, total, finite = self._scan(_flat(layer.momentum), mask, split)
            if source == "weight":
                nnz, active, total, weight_finite = self._scan(_flat(layer.weight), mask, split)
                finite = finite and weight_finite
            elif source is None:
                active = total = 0.0
            return LayerScan(nnz, active, total, finite)

        return self._per_layer(scan, layers)

    def _per_layer(self, work: Callable[[int, bool], Any], layers: Sequence[Layer]) -> list[Any]:
        """``[work(i, split) for each layer i]``: a layer holding more than a 2 * threads-th
        of all weights is split into chunks run on every thread (``split=True``), one after
        another; the others go whole, grouped, to the threads at once (:func:`_map_layers`).
        Fewer than ``parallel_min`` weights in all: every layer whole, on this thread."""
        sizes = [int(np.size(layer.mask)) for layer in layers]
        if sum(sizes) < self.parallel_min:
            return [work(i, False) for i in range(len(layers))]
        big = sum(sizes) // (2 * numba.get_num_threads())
        out: list[Any] = [None] * len(layers)
        small = [i for i, n in enumerate(sizes) if n <= big]
        for i, n in enumerate(sizes):
            if n > big:
                out[i] = work(i, True)
        for i, result in zip(
            small, _map_layers(lambda j: work(small[j], False), [sizes[i] for i in small])
        ):
            out[i] = result
        return out

    def _scan(
        self, x: np.ndarray, mask: np.ndarray, split: bool = True
    ) -> tuple[int, float, float, bool]:
        """Pass 1 over one array: nnz, the two float64 |x| sums, and whether all are finite."""
        spans = _spans(x.size, self.min_chunk) if split else [(0, x.size)]
        if x.dtype == np.float16:
            parts = _run(_chunk_scan_half, spans, x.view(np.uint16), mask)
        else:
            parts = _run(_chunk_scan, spans, x, mask)
        nnz = sum(int(c[0]) for c in parts)
        active = float(sum(c[1] for c in parts))
        total = float(sum(c[2] for c in parts))
        finite = all(int(c[3]) == 0 for c in parts) and bool(np.isfinite(total))
        return nnz, active, total, finite

    def fused_prune_regrow(
        self,
        layers: Sequence[Layer],
        nnz: Sequence[int],
        prune_counts: Sequence[int],
        grow_counts: Sequence[int],
        keys: Sequence[HashKey],
    ) -> list[FusedLayer] | None:
        with self._buffers.update():

            def decide(i: int, split: bool) -> tuple[Any, ...] | None:
                return self._fused_layer(
                    layers[i], int(nnz[i]), int(prune_counts[i]), int(grow_counts[i]), keys[i],
                    split,
                )  # fmt: skip

            decided = self._per_layer(decide, layers)
            if any(d is None for d in decided):
                return None
            out = []
            # The counters and the exact fallback (which uses every thread) run here, after.
            for layer, d, r, g, key in zip(layers, decided, prune_counts, grow_counts, keys):
                assert d is not None
                path, lost, gained, new_mask, new_weight = d
                self.fused_paths[path] += 1
                if path in ("prune_miss", "grow_miss"):  # select this layer exactly
                    w, p, mask = _flat(layer.weight), _flat(layer.momentum), _flat(layer.mask)
                    lost, gained = self._select_layer(
                        w, p, mask, int(r), int(g), key, new_mask, new_weight
                    )
                shape = np.shape(layer.mask)
                out.append(
                    FusedLayer(new_mask.reshape(shape), new_weight.reshape(shape), lost, gained)
                )
        return out

    def _fused_layer(
        self, layer: Layer, nnz: int, r: int, g: int, key: HashKey, split: bool = True
    ) -> tuple[Any, ...] | None:
        """Pass 2 and the resolution for one layer: (path, lost, gained, new mask, new weights);
        None if a weight is NaN or Inf.
        Path: ``fused_paths``' name for the way taken; on ``prune_miss`` / ``grow_miss`` the
        sampled interval missed and the caller selects the layer exactly. ``split``: pass 2 in
        chunks on every thread (else this thread alone: it may be a pool thread)."""
        w, p, mask = _flat(layer.weight), _flat(layer.momentum), _flat(layer.mask)
        n = w.size
        wbits = w.view(_UINT_OF_SIZE[w.dtype.itemsize])
        pbits = p.view(_UINT_OF_SIZE[p.dtype.itemsize])
        wmask = np.uint64((1 << (8 * w.dtype.itemsize - 1)) - 1)
        pmask = np.uint64((1 << (8 * p.dtype.itemsize - 1)) - 1)
        if self.sampled:
            # a layer that refines its intervals needs only a rough first guess
            shift = SAMPLE_SHIFT + (2 if n >= self.dense_min else 0)
            samples = min(max(n >> shift, MIN_SAMPLES), MAX_SAMPLES, n)
            sigmas, slack = self.spread
            intervals = _fused_bounds(
                wbits, pbits, mask, nnz, r, g, samples, wmask, pmask, float(sigmas),
                float(slack), self.dense_min,
            )  # fmt: skip
        else:  # everything open: the resolution decides every candidate
            intervals = (np.uint64(0), np.uint64(_TOP), np.uint64(0), np.uint64(_TOP))
        bounds = (*(np.uint64(b) for b in intervals), wmask, pmask)
        new_mask = self._buffers.take(n, np.dtype(bool))
        new_weight = self._buffers.take(n, w.dtype)
        new_bits = new_weight.view(wbits.dtype)
        spans = _spans(n, self.min_chunk) if split else [(0, n)]
        records = self._records(n)
        parts = [records[start:stop] for start, stop in spans]
        counts = _run(
            _chunk_decide, spans, wbits, pbits, mask, bounds, new_mask.view(np.uint8),
            new_bits, per_span=parts,
        )  # fmt: skip
        if max(int(c[6]) for c in counts) >= _EXPONENT_MASK[w.dtype.itemsize]:
            return None
        pdef, pund, gdef, gund, lost, gained = (sum(int(c[j]) for c in counts) for j in range(6))
        status = 0 if pdef <= r <= pdef + pund else -1
        if status == 0 and pund + gund:
            used = [part[: int(c[7])] for part, c in zip(parts, counts)]
            undecided = used[0] if len(used) == 1 else np.concatenate(used)
            status, more_lost, more_gained = _fused_resolve(
                undecided, r - pdef, g - gdef, bounds, 8 * w.dtype.itemsize,
                8 * p.dtype.itemsize, np.uint64(key.prefix()), new_mask, new_bits,
            )  # fmt: skip
            lost += int(more_lost)
            gained += int(more_gained)
            path = "resolved"
        else:  # nothing left open: the sure counts must be exact
            path = "decided"
            if status == 0 and gdef != g:
                status = -2
        if status != 0:
            path = "prune_miss" if status == -1 else "grow_miss"
        return path, lost, gained, new_mask, new_weight

    def _records(self, n: int) -> np.ndarray:
        """Scratch room for ``n`` undecided positions, kept per thread between layers and
        updates: only its first pages are ever touched, and touching fresh pages is slow."""
        scratch = getattr(self._scratch, "records", None)
        if scratch is None or scratch.shape[0] < n:
            scratch = np.empty((n, 3), dtype=np.uint64)
            self._scratch.records = scratch
        return scratch[:n]

    def _select_layer(
        self,
        w: np.ndarray,
        p: np.ndarray,
        mask: np.ndarray,
        r: int,
        g: int,
        key: HashKey,
        new_mask: np.ndarray,
        new_weight: np.ndarray,
    ) -> tuple[int, int]:
        """The fused path's fallback: prune, then regrow, by two exact selections."""
        options: dict[str, Any] = dict(
            magnitude=True, key=key, sampled=self.sampled, small_layer=self.small_layer,
            min_chunk=self.min_chunk,
        )  # fmt: skip
        pruned = select_flat(w, mask, r, among_active=True, largest=False, **options)
        kept = mask & ~pruned
        grown = select_flat(p, kept, g, among_active=False, largest=True, **options)
        np.logical_or(kept, grown, out=new_mask)
        new_weight[...] = self.apply(w, mask, new_mask)
        return int(np.count_nonzero(mask & ~new_mask)), int(np.count_nonzero(new_mask & ~mask))

    def all_finite(self, x: Any) -> bool:
        flat = _flat(x)
        if flat.dtype.kind != "f" or flat.dtype.itemsize not in _EXPONENT_MASK:
            return bool(super().all_finite(x))
        if flat.size == 0:
            return True
        size = flat.dtype.itemsize
        bits = flat.view(_UINT_OF_SIZE[size])
        sign_clear = _UINT_OF_SIZE[size]((1 << (8 * size - 1)) - 1)
        largest = max(
            _run(_chunk_max_magnitude, _spans(bits.size, self.min_chunk), bits, sign_clear)
        )
        return int(largest) < _EXPONENT_MASK[size]

    def count_positive(self, x: Any, mask: Any) -> int:
        flat = _flat(x)
        p = rank_params(
            flat.dtype, among_active=True, largest=True, magnitude=False, sign="positive"
        )
        if p is None:
            return super().count_positive(x, mask)
        bits = flat.view(_UINT_OF_SIZE[flat.dtype.itemsize])
        none = np.empty(0, dtype=bool)
        counts = _run(
            _chunk_candidates, _spans(bits.size, self.min_chunk), bits, _flat(mask), p, none
        )
        return sum(int(c) for c in counts)

    def abs_sum(self, x: Any, mask: Any | None) -> float:
        flat = _flat(x)
        flat_mask = np.empty(0, dtype=bool) if mask is None else _flat(mask)
        spans = _spans(flat.size, self.min_chunk)
        use_mask = mask is not None
        if flat.dtype == np.float16:
            parts = _run(_chunk_abs_sum_half, spans, flat.view(np.uint16), flat_mask, use_mask)
        elif flat.dtype in (np.float32, np.float64):
            parts = _run(_chunk_abs_sum, spans, flat, flat_mask, use_mask)
        else:
            return super().abs_sum(x, mask)
        return float(sum(parts))

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
        out = select_flat(
            x,
            mask,
            int(k),
            among_active=bool(among_active),
            largest=bool(largest),
            magnitude=bool(magnitude),
            key=key,
            sign=sign,
            sampled=self.sampled,
            small_layer=self.small_layer,
            min_chunk=self.min_chunk,
        )
        return out.reshape(np.shape(x))

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
        flat = _flat(x)
        p = rank_params(
            flat.dtype, among_active=among_active, largest=largest, magnitude=magnitude, sign="any"
        )
        if p is None:
            return super().select_per_unit(
                x, mask, ks, axis=axis, among_active=among_active, largest=largest,
                magnitude=magnitude, key=key,
            )  # fmt: skip
        shape = tuple(np.shape(x))
        axis = axis % len(shape)
        outer = int(np.prod(shape[:axis], dtype=np.int64))
        inner = int(np.prod(shape[axis + 1 :], dtype=np.int64))
        out = np.zeros(flat.size, dtype=bool)
        _select_units(  # one thread: per-unit growth is a rarely used mode
            flat.view(_UINT_OF_SIZE[flat.dtype.itemsize]),
            _flat(mask),
            p,
            np.asarray(ks, dtype=np.int64),
            outer,
            inner,
            8 * flat.dtype.itemsize,
            np.uint64(key.prefix()),
            out,
        )
        return out.reshape(shape)

    def unit_nonzero(self, x: Any, axis: int) -> np.ndarray:
        if not (
            isinstance(x, np.ndarray)
            and x.flags.c_contiguous
            and x.dtype.isnative
            and (x.dtype == np.bool_ or (x.dtype.kind == "f" and x.dtype.itemsize in (2, 4, 8)))
        ):
            return super().unit_nonzero(x, axis)
        shape = x.shape
        axis %= len(shape)
        pre = int(np.prod(shape[:axis], dtype=np.int64))
        post = int(np.prod(shape[axis + 1 :], dtype=np.int64))
        values = x.view(np.uint8) if x.dtype == np.bool_ else x
        if values.dtype.kind == "f" and values.dtype.itemsize == 2:  # float16: compare the bits
            values = values.view(np.uint16) & np.uint16(0x7FFF)  # -0.0 is zero too
        out = np.zeros(shape[axis], dtype=bool)
        _units_nonzero(values.reshape(pre, shape[axis], post), out)
        return out

    def position_hash(self, key: HashKey, like: Any) -> Any:
        shape = tuple(np.shape(like))
        out = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=np.uint32)
        _run(_chunk_hash, _spans(out.size, self.min_chunk), np.uint64(key.prefix()), out)
        return out.reshape(shape)

    def and_not(self, a: Any, b: Any) -> Any:
        out = np.empty(np.shape(a), dtype=bool)
        _run(_chunk_and_not, _spans(out.size, self.min_chunk), _flat(a), _flat(b), out.reshape(-1))
        return out

    def apply(self, weight: Any, old_mask: Any, new_mask: Any) -> Any:
        flat = _flat(weight)
        if flat.dtype.itemsize not in _UINT_OF_SIZE or flat.dtype.kind != "f":
            return super().apply(weight, old_mask, new_mask)
        out = np.empty_like(flat)
        uint = _UINT_OF_SIZE[flat.dtype.itemsize]
        spans = _spans(flat.size, self.min_chunk)
        _run(_chunk_apply, spans, flat.view(uint), _flat(old_mask), _flat(new_mask), out.view(uint))
        return out.reshape(np.shape(weight))
