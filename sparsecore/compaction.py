"""Channel compaction, framework-free: which units and channels of a sparse network carry nothing.

Sparse momentum leaves whole units empty: an output unit (a filter) with no active weight, or an
input channel that no active weight reads. Such channels can be removed from a dense computation
without changing its result, which is the speedup a dense library gets from sparse training
(the sparse momentum paper's "dense convolution" estimate). This module finds them exactly, over
an abstract graph of the network that the framework adapters build (``sparsecore.torch.compact``
from a ``torch.fx`` trace, ``sparsecore.keras.compact`` from a functional model).

Every tensor in the graph has a *channel* axis (features of a linear layer, channels of a
convolution). For each channel the analysis decides:

- **constant**: it holds one value for every sample and position. An output unit of a linear or
  convolution layer with no active weight holds its bias; one whose active weights read only
  constant channels holds a constant too, unless zero padding makes the border positions differ.
  Batch norm, elementwise activations and pooling keep a channel constant; a residual addition is
  constant where both operands are.
- **needed**: some output of the network depends on it (an active weight reads it, on the way to
  an output).
- **layout**: the channels a compact layer really computes (every needed channel that is not
  constant, and a few more where the graph forces them, see below), in ascending order.
- **side**: the constant channels whose value the compact network carries as a small vector
  ("on the side") to fold into the next layer: into its bias (a linear layer, a convolution
  without zero padding), or as a per-position bias map (a zero-padded convolution, where the
  border positions see fewer taps), or, with ``padded_constants="keep"``, by keeping the channel.

Tensors that must hold the same channels share one layout: the operands and result of an
addition, and the input and output of a channelwise operation. A layout is the union of what its
members need; a convolution that feeds an addition then computes a channel that it alone would
not need (its filter is empty, so the computed channel is its bias: exact). Grouped convolutions
keep or drop whole groups. Operations the analysis does not know (``opaque``) and the network's
outputs see every channel, in the original order. So the compact network equals the masked dense
one: every computed channel is computed from all of its inputs, and every removed channel either
feeds nothing or enters its consumers as its constant value.

The algorithm: a forward pass marks constant channels; then a fixed point alternates a backward
pass (needed: what the computed channels read) with the shared layouts (each the union of its
members' needed, non-constant channels, closed over groups and flattening); both only grow, so it
ends. A last backward pass marks the side values. Everything here is NumPy on boolean masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .errors import SparseCoreError

__all__ = [
    "KINDS",
    "PADDED_CONSTANTS",
    "CompactionPlan",
    "CompactionReport",
    "LayerCompaction",
    "Op",
    "OpPlan",
    "empty_outputs",
    "flatten_channels",
    "layer_reads",
    "plan_compaction",
    "unread_inputs",
]

#: Operation kinds of the abstract graph (see :class:`Op`).
KINDS = ("input", "weighted", "channelwise", "flatten", "add", "opaque", "output")
#: What to do with a constant channel that enters a zero-padded convolution.
PADDED_CONSTANTS = ("fold", "keep")

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Op:
    """One operation of the abstract graph; its output is one tensor with ``channels`` channels.

    ``kind``:

    - ``input``: a network input (every channel varies with the sample).
    - ``weighted``: a linear layer or a convolution, ``mask`` its active weights with the output
      units first, ``(out, in // groups, *taps)``. ``uniform``: a constant input channel adds the
      same amount at every output position (True for linear layers and unpadded convolutions,
      False where zero padding makes the borders see fewer taps).
    - ``channelwise``: output channel c depends on input channel c only (batch norm, activations,
      pooling, dropout). ``uniform``: a constant input channel gives a constant output channel
      (False for dropout in training, or average pooling that counts zero padding).
    - ``flatten``: ``(N, C, *spatial)`` to ``(N, C * positions)`` features; ``positions`` is the
      product of the spatial sizes, ``channels_last`` says whether the channel index varies
      fastest in the flattened features (Keras) or slowest (PyTorch).
    - ``add``: the elementwise sum of its inputs (same channels).
    - ``opaque``: anything else; it reads every channel of its inputs and its output varies.
    - ``output``: a network output (reads every channel, has none itself).

    ``inputs`` name the operations whose outputs this one reads *through its channel axis*;
    a tensor used only for its batch size needs no entry.
    """

    name: str
    kind: str
    inputs: tuple[str, ...] = ()
    channels: int = 0
    mask: BoolArray | None = None
    groups: int = 1
    uniform: bool = True
    positions: int = 1
    channels_last: bool = False


@dataclass(frozen=True)
class OpPlan:
    """What compaction keeps of one operation's output (channel indices are ascending)."""

    name: str
    constant: BoolArray
    needed: BoolArray
    layout: IntArray
    side: IntArray
    #: weighted operations: the input channels the compact layer reads from its input tensor
    in_layout: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: weighted operations: input channels entering as constants (from the producer's side)
    fold: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: weighted operations: the groups kept (all of range(groups) when nothing is dropped)
    groups_kept: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass(frozen=True)
class CompactionPlan:
    """The result of :func:`plan_compaction`: one :class:`OpPlan` per operation, by name."""

    ops: Mapping[str, OpPlan]
    graph: tuple[Op, ...]
    padded_constants: str

    def __getitem__(self, name: str) -> OpPlan:
        return self.ops[name]

    def side_positions(self, producer: str, channels: Iterable[int]) -> IntArray:
        """Where ``channels`` sit in the side vector of ``producer`` (they must all be there)."""
        side = self.ops[producer].side
        wanted = np.asarray(list(channels), dtype=np.int64)
        pos = np.searchsorted(side, wanted)
        if wanted.size and (
            np.any(pos >= side.size) or np.any(side[np.minimum(pos, side.size - 1)] != wanted)
        ):
            raise AssertionError(f"channels {wanted} are not all on the side of {producer!r}")
        return pos.astype(np.int64)

    def layers(self) -> list[LayerCompaction]:
        """Per weighted operation: its shape before and after, and why channels went."""
        out = []
        for op in self.graph:
            if op.kind == "weighted":
                out.append(_layer_summary(op, self))
        return out

    def report(self) -> CompactionReport:
        """The removals as a :class:`CompactionReport`."""
        return CompactionReport(layers=tuple(self.layers()))


@dataclass(frozen=True)
class LayerCompaction:
    """One linear or convolution layer before and after compaction.

    Output units removed: ``empty`` (no active weight: the unit holds its bias), ``constant``
    (its active weights read only constant channels), ``unread`` (nothing downstream reads it).
    Input channels removed: ``folded`` (constant: its value enters the bias, or a per-position
    bias map) and ``dropped`` (no kept unit reads it, or the producer removed it as unread).
    ``added``: output units computed although this layer alone would not need them (a residual
    addition or a group that needs them).
    """

    name: str
    out_channels: int
    in_channels: int
    kept_out: int
    kept_in: int
    empty: int
    constant: int
    unread: int
    folded: int
    dropped: int
    added: int
    groups: int = 1
    groups_kept: int = 1

    @property
    def removed_out(self) -> int:
        return self.out_channels - self.kept_out

    @property
    def removed_in(self) -> int:
        return self.in_channels - self.kept_in


@dataclass(frozen=True)
class CompactionReport:
    """What compaction removed, per layer, with totals and a readable table.

    ``verified`` (set by the adapters): the largest absolute difference between the compact and
    the original network's outputs on the example input, and the largest absolute output (its
    scale); None when not measured.
    """

    layers: tuple[LayerCompaction, ...]
    max_abs_difference: float | None = None
    output_scale: float | None = None
    notes: tuple[str, ...] = ()

    def layer(self, name: str) -> LayerCompaction:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the compaction report")

    @property
    def units(self) -> int:
        """Output units (features, filters) of all layers together."""
        return sum(layer.out_channels for layer in self.layers)

    @property
    def units_removed(self) -> int:
        return sum(layer.removed_out for layer in self.layers)

    def fraction_removed(self) -> float:
        """Removed output units over all output units (0 for a model without layers)."""
        return self.units_removed / self.units if self.units else 0.0

    def table(self) -> str:
        """One line per layer: shapes before and after and the reasons for each removal."""
        head = (
            f"{'layer':<22}{'out':>6}{'kept':>6}{'empty':>7}{'const':>7}{'unread':>8}"
            f"{'in':>6}{'kept':>6}{'folded':>8}{'dropped':>9}"
        )
        rows = [head]
        for x in self.layers:
            rows.append(
                f"{x.name:<22}{x.out_channels:>6}{x.kept_out:>6}{x.empty:>7}{x.constant:>7}"
                f"{x.unread:>8}{x.in_channels:>6}{x.kept_in:>6}{x.folded:>8}{x.dropped:>9}"
            )
        rows.append(
            f"units removed: {self.units_removed} of {self.units} "
            f"({100 * self.fraction_removed():.1f}%)"
        )
        if self.max_abs_difference is not None:
            rows.append(
                f"checked on the example input: largest difference {self.max_abs_difference:.3g} "
                f"(outputs up to {self.output_scale:.3g})"
            )
        rows.extend(self.notes)
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


# -- one layer on its own ----------------------------------------------------------------------
def _as_mask(mask: npt.ArrayLike, name: str = "layer") -> BoolArray:
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise SparseCoreError(f"mask of {name!r} must have dtype bool, got {m.dtype}")
    if m.ndim < 2:
        raise SparseCoreError(
            f"mask of {name!r} must have the output units first and at least 2 dimensions, "
            f"got shape {m.shape}"
        )
    return m


def layer_reads(mask: npt.ArrayLike, groups: int = 1, name: str = "layer") -> BoolArray:
    """``reads[o, c]``: an active weight of output unit ``o`` reads input channel ``c``.

    ``mask`` has the output units first: ``(out, in // groups, *taps)``; the result is
    ``(out, in)`` with the group structure spelled out (False across groups).
    """
    m = _as_mask(mask, name)
    out, per_group = m.shape[0], m.shape[1]
    if groups < 1 or out % groups:
        raise SparseCoreError(f"{name!r}: groups {groups!r} does not divide {out} output units")
    local: BoolArray = np.any(m.reshape(out, per_group, -1), axis=2)
    reads = np.zeros((out, per_group * groups), dtype=bool)
    per_out = out // groups
    for g in range(groups):
        rows = slice(g * per_out, (g + 1) * per_out)
        reads[rows, g * per_group : (g + 1) * per_group] = local[rows]
    return reads


def empty_outputs(mask: npt.ArrayLike, name: str = "layer") -> BoolArray:
    """Output units (rows, filters) with no active weight; ``mask`` has the outputs first."""
    m = _as_mask(mask, name)
    return np.logical_not(m.reshape(m.shape[0], -1).any(axis=1))


def unread_inputs(mask: npt.ArrayLike, groups: int = 1, name: str = "layer") -> BoolArray:
    """Input channels that no active weight reads (``in = mask.shape[1] * groups`` of them)."""
    return np.logical_not(layer_reads(mask, groups, name).any(axis=0))


def flatten_channels(channels: int, positions: int, channels_last: bool) -> IntArray:
    """The input channel of every feature of a flattened ``(N, channels, *spatial)`` tensor."""
    if channels_last:
        return np.tile(np.arange(channels, dtype=np.int64), positions)
    return np.repeat(np.arange(channels, dtype=np.int64), positions)


# -- the whole graph ----------------------------------------------------------------------------
class _Classes:
    """Union-find over operation names: tensors that must hold the same channels."""

    def __init__(self, names: Iterable[str]) -> None:
        self.parent = {n: n for n in names}

    def find(self, name: str) -> str:
        root = name
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[name] != root:
            self.parent[name], name = root, self.parent[name]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _check_graph(ops: Sequence[Op]) -> dict[str, Op]:
    by_name: dict[str, Op] = {}
    for op in ops:
        if op.kind not in KINDS:
            raise SparseCoreError(
                f"operation {op.name!r}: kind must be one of {KINDS}, got {op.kind!r}"
            )
        if op.name in by_name:
            raise SparseCoreError(f"operation name {op.name!r} appears twice in the graph")
        for i in op.inputs:
            if i not in by_name:
                raise SparseCoreError(
                    f"operation {op.name!r} reads {i!r}, which is not an earlier operation"
                )
        if op.channels < 0:
            raise SparseCoreError(
                f"operation {op.name!r}: channels must be >= 0, got {op.channels}"
            )
        ins = [by_name[i] for i in op.inputs]
        if op.kind in ("weighted", "channelwise", "flatten") and len(ins) != 1:
            raise SparseCoreError(
                f"{op.kind} operation {op.name!r} reads exactly one tensor, got {list(op.inputs)}"
            )
        if op.kind == "input" and ins:
            raise SparseCoreError(f"input {op.name!r} cannot read other operations")
        if op.kind == "weighted":
            m = _as_mask(op.mask if op.mask is not None else np.zeros(0, bool), op.name)
            if m.shape[0] != op.channels:
                raise SparseCoreError(
                    f"layer {op.name!r}: mask has {m.shape[0]} output units, the op says "
                    f"{op.channels} channels"
                )
            if m.shape[1] * op.groups != ins[0].channels:
                raise SparseCoreError(
                    f"layer {op.name!r}: mask reads {m.shape[1]} x {op.groups} group(s) input "
                    f"channels, its input {ins[0].name!r} has {ins[0].channels}"
                )
            layer_reads(m, op.groups, op.name)  # checks the groups
        elif op.kind == "channelwise" and op.channels != ins[0].channels:
            raise SparseCoreError(
                f"channelwise {op.name!r} has {op.channels} channels, its input {ins[0].channels}"
            )
        elif op.kind == "flatten" and op.channels != ins[0].channels * op.positions:
            raise SparseCoreError(
                f"flatten {op.name!r}: {op.channels} features != {ins[0].channels} channels x "
                f"{op.positions} positions"
            )
        elif op.kind == "add":
            if len(ins) < 2 or any(i.channels != op.channels for i in ins):
                raise SparseCoreError(
                    f"add {op.name!r} needs two or more inputs of {op.channels} channels, got "
                    f"{[(i.name, i.channels) for i in ins]}"
                )
        elif op.kind == "output" and op.channels:
            raise SparseCoreError(f"output {op.name!r} has no channels of its own")
        by_name[op.name] = op
    if not any(op.kind == "output" for op in ops):
        raise SparseCoreError("the graph has no output operation")
    return by_name


def _group_slices(op: Op, in_channels: int) -> list[tuple[slice, slice]]:
    """Per group: (output units, input channels)."""
    per_out = op.channels // op.groups
    per_in = in_channels // op.groups
    return [
        (slice(g * per_out, (g + 1) * per_out), slice(g * per_in, (g + 1) * per_in))
        for g in range(op.groups)
    ]


def plan_compaction(ops: Sequence[Op], *, padded_constants: str = "fold") -> CompactionPlan:
    """Decide, for every operation of the graph, which channels the compact network computes.

    ``ops`` in topological order (every input named before it is read). ``padded_constants``:
    ``"fold"`` turns a constant channel that enters a zero-padded convolution into a per-position
    bias map of that convolution; ``"keep"`` computes such a channel instead. See the module
    docstring for what is found and why the result is exact.
    """
    if padded_constants not in PADDED_CONSTANTS:
        raise SparseCoreError(
            f"padded_constants must be one of {PADDED_CONSTANTS}, got {padded_constants!r}"
        )
    ops = tuple(ops)
    by_name = _check_graph(ops)
    reads = {
        op.name: layer_reads(op.mask, op.groups, op.name)
        for op in ops
        if op.kind == "weighted" and op.mask is not None
    }
    consumers: dict[str, list[Op]] = {op.name: [] for op in ops}
    for op in ops:
        for i in op.inputs:
            consumers[i].append(op)

    constant = _constant_channels(ops, by_name, reads)

    classes = _Classes(by_name)
    for op in ops:
        if op.kind in ("channelwise", "add"):
            for i in op.inputs:
                classes.union(op.name, i)
    full = {classes.find(op.name) for op in ops if op.kind in ("input", "opaque")}
    for op in ops:
        if op.kind in ("opaque", "output"):
            full.update(classes.find(i) for i in op.inputs)

    needed = {op.name: np.zeros(op.channels, dtype=bool) for op in ops}
    present = {op.name: np.zeros(op.channels, dtype=bool) for op in ops}
    while True:
        grew = _needed_pass(ops, by_name, reads, needed, present)
        grew |= _layout_pass(
            ops, by_name, reads, classes, full, constant, needed, present, padded_constants
        )
        if not grew:
            break

    side = _side_pass(ops, by_name, reads, constant, present, padded_constants)
    plans: dict[str, OpPlan] = {}
    for op in ops:
        kw: dict[str, IntArray] = {}
        if op.kind == "weighted":
            src = op.inputs[0]
            kw["in_layout"] = np.flatnonzero(present[src]).astype(np.int64)
            kw["fold"] = np.flatnonzero(
                _folds(op, reads, constant, present, padded_constants)
            ).astype(np.int64)
            kw["groups_kept"] = np.asarray(
                [
                    g
                    for g, (outs, _) in enumerate(_group_slices(op, by_name[src].channels))
                    if present[op.name][outs].any()
                ],
                dtype=np.int64,
            )
        plans[op.name] = OpPlan(
            name=op.name,
            constant=constant[op.name],
            needed=needed[op.name],
            layout=np.flatnonzero(present[op.name]).astype(np.int64),
            side=np.flatnonzero(side[op.name]).astype(np.int64),
            **kw,
        )
    return CompactionPlan(ops=plans, graph=ops, padded_constants=padded_constants)


def _constant_channels(
    ops: Sequence[Op], by_name: Mapping[str, Op], reads: Mapping[str, BoolArray]
) -> dict[str, BoolArray]:
    constant: dict[str, BoolArray] = {}
    for op in ops:
        if op.kind == "weighted":
            r = reads[op.name]
            src = constant[op.inputs[0]]
            empty = np.logical_not(r.any(axis=1))
            only_constant = np.logical_not((r & ~src[None, :]).any(axis=1))
            constant[op.name] = empty | (only_constant & op.uniform)
        elif op.kind == "channelwise":
            src = constant[op.inputs[0]]
            constant[op.name] = src.copy() if op.uniform else np.zeros(op.channels, dtype=bool)
        elif op.kind == "flatten":
            src_op = by_name[op.inputs[0]]
            constant[op.name] = constant[src_op.name][
                flatten_channels(src_op.channels, op.positions, op.channels_last)
            ]
        elif op.kind == "add":
            c = np.ones(op.channels, dtype=bool)
            for i in op.inputs:
                c &= constant[i]
            constant[op.name] = c
        else:
            constant[op.name] = np.zeros(op.channels, dtype=bool)
    return constant


def _or_into(target: BoolArray, value: BoolArray) -> bool:
    """``target |= value``; whether anything changed."""
    new = value & ~target
    if new.any():
        target |= new
        return True
    return False


def _needed_pass(
    ops: Sequence[Op],
    by_name: Mapping[str, Op],
    reads: Mapping[str, BoolArray],
    needed: dict[str, BoolArray],
    present: Mapping[str, BoolArray],
) -> bool:
    """Backward: a channel is needed when a needed or computed channel reads it."""
    grew = False
    for op in reversed(ops):
        if op.kind in ("opaque", "output"):
            for i in op.inputs:
                grew |= _or_into(needed[i], np.ones(by_name[i].channels, dtype=bool))
        elif op.kind == "weighted":
            demand = needed[op.name] | present[op.name]
            grew |= _or_into(needed[op.inputs[0]], np.any(reads[op.name][demand], axis=0))
        elif op.kind in ("channelwise", "add"):
            for i in op.inputs:
                grew |= _or_into(needed[i], needed[op.name])
        elif op.kind == "flatten":
            src = by_name[op.inputs[0]]
            per_channel = np.zeros(src.channels, dtype=bool)
            idx = flatten_channels(src.channels, op.positions, op.channels_last)
            np.logical_or.at(per_channel, idx, needed[op.name])
            grew |= _or_into(needed[src.name], per_channel)
    return grew


def _layout_pass(
    ops: Sequence[Op],
    by_name: Mapping[str, Op],
    reads: Mapping[str, BoolArray],
    classes: _Classes,
    full: set[str],
    constant: Mapping[str, BoolArray],
    needed: Mapping[str, BoolArray],
    present: dict[str, BoolArray],
    padded_constants: str,
) -> bool:
    """Shared layouts: the union of the members' needed variable channels, closed over groups,
    flattening and the other rules, until nothing changes. Writes every member's ``present``."""
    grew_any = False
    while True:
        required: dict[str, BoolArray] = {}
        for op in ops:
            root = classes.find(op.name)
            want = present[op.name] | (needed[op.name] & ~constant[op.name])
            if root in full:
                want = np.ones(op.channels, dtype=bool)
            if root in required:
                required[root] |= want
            else:
                required[root] = want.copy()
        for op in ops:
            if op.kind != "weighted":
                continue
            src = by_name[op.inputs[0]]
            out_root, in_root = classes.find(op.name), classes.find(src.name)
            r = reads[op.name]
            outs_now = required[out_root]
            if op.groups > 1:
                for outs, ins in _group_slices(op, src.channels):
                    if outs_now[outs].any() or required[in_root][ins].any():
                        required[out_root][outs] = True
                        required[in_root][ins] = True
                continue
            if padded_constants == "keep" and not op.uniform:
                required[in_root] |= r[outs_now].any(axis=0) & constant[src.name]
            if outs_now.any() and not required[in_root].any() and src.channels:
                required[in_root][0] = True  # the compact layer needs a tensor to read
        for op in ops:
            if op.kind != "flatten":
                continue
            src = by_name[op.inputs[0]]
            out_root, in_root = classes.find(op.name), classes.find(src.name)
            idx = flatten_channels(src.channels, op.positions, op.channels_last)
            per_channel = np.zeros(src.channels, dtype=bool)
            np.logical_or.at(per_channel, idx, required[out_root])
            required[in_root] |= per_channel
            required[out_root] |= required[in_root][idx]
        grew = False
        for op in ops:
            grew |= _or_into(present[op.name], required[classes.find(op.name)])
        grew_any |= grew
        if not grew:
            return grew_any


def _folds(
    op: Op,
    reads: Mapping[str, BoolArray],
    constant: Mapping[str, BoolArray],
    present: Mapping[str, BoolArray],
    padded_constants: str,
) -> BoolArray:
    """Input channels of a weighted op that enter as constants: read by a computed unit,
    constant, and not in the input tensor."""
    src = op.inputs[0]
    if op.groups > 1:
        return np.zeros(present[src].shape, dtype=bool)
    read = reads[op.name][present[op.name]].any(axis=0)
    folds = read & constant[src] & ~present[src]
    if folds.any() and padded_constants == "keep" and not op.uniform:
        raise AssertionError(f"{op.name!r}: constants to fold into a padded layer under 'keep'")
    return folds


def _side_pass(
    ops: Sequence[Op],
    by_name: Mapping[str, Op],
    reads: Mapping[str, BoolArray],
    constant: Mapping[str, BoolArray],
    present: Mapping[str, BoolArray],
    padded_constants: str,
) -> dict[str, BoolArray]:
    """Backward: the constant channels whose values the compact network must carry."""
    side = {op.name: np.zeros(op.channels, dtype=bool) for op in ops}
    for op in reversed(ops):
        if op.kind == "weighted":
            source = op.inputs[0]
            side[source] |= _folds(op, reads, constant, present, padded_constants)
            side[source] |= np.any(reads[op.name][side[op.name]], axis=0)
        elif op.kind in ("channelwise", "add"):
            for i in op.inputs:
                side[i] |= side[op.name]
        elif op.kind == "flatten":
            src = by_name[op.inputs[0]]
            idx = flatten_channels(src.channels, op.positions, op.channels_last)
            np.logical_or.at(side[src.name], idx, side[op.name])
    for op in ops:
        if (side[op.name] & ~constant[op.name]).any():
            raise AssertionError(f"{op.name!r}: a varying channel was put on the side")
    return side


def _layer_summary(op: Op, plan: CompactionPlan) -> LayerCompaction:
    p = plan[op.name]
    assert op.mask is not None
    r = layer_reads(op.mask, op.groups, op.name)
    empty = ~r.any(axis=1)
    kept_out = np.zeros(op.channels, dtype=bool)
    kept_out[p.layout] = True
    kept_in = np.zeros(r.shape[1], dtype=bool)
    kept_in[p.in_layout] = True
    folded = np.zeros(r.shape[1], dtype=bool)
    folded[p.fold] = True
    removed_out = ~kept_out
    own_need = p.needed & ~p.constant
    return LayerCompaction(
        name=op.name,
        out_channels=op.channels,
        in_channels=r.shape[1],
        kept_out=int(kept_out.sum()),
        kept_in=int(kept_in.sum()),
        empty=int((removed_out & empty).sum()),
        constant=int((removed_out & ~empty & p.constant).sum()),
        unread=int((removed_out & ~p.constant).sum()),
        folded=int(folded.sum()),
        dropped=int((~kept_in & ~folded).sum()),
        added=int((kept_out & ~own_need).sum()),
        groups=op.groups,
        groups_kept=int(p.groups_kept.size),
    )
