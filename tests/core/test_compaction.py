"""sparsecore.compaction: which channels carry nothing, on hand-made graphs and random ones.

The random graphs (linear layers, ReLU, residual additions, an unknown operation) are evaluated
in NumPy twice: as the full masked network, and as the compact network the plan describes (each
operation's layout, the folded constants, the side values). Both must agree; channels the plan
calls constant must be constant, and channels it calls unneeded must not matter.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecore.compaction import (
    Op,
    empty_outputs,
    flatten_channels,
    layer_reads,
    plan_compaction,
    unread_inputs,
)
from sparsecore.errors import SparseCoreError


def test_one_layer_by_hand() -> None:
    mask = np.zeros((4, 2, 3, 3), dtype=bool)  # groups=2: outs 0-1 read ins 0-1, outs 2-3 ins 2-3
    mask[0, 1, 0, 0] = True  # out 0 reads in 1
    mask[3, 0, 2, 2] = True  # out 3 reads in 2
    reads = layer_reads(mask, groups=2)
    assert reads.shape == (4, 4)
    assert np.argwhere(reads).tolist() == [[0, 1], [3, 2]]
    assert empty_outputs(mask).tolist() == [False, True, True, False]
    assert unread_inputs(mask, groups=2).tolist() == [True, False, False, True]
    assert flatten_channels(2, 3, channels_last=False).tolist() == [0, 0, 0, 1, 1, 1]
    assert flatten_channels(2, 3, channels_last=True).tolist() == [0, 1, 0, 1, 0, 1]


def _mlp(m1: np.ndarray, m2: np.ndarray) -> list[Op]:
    return [
        Op("x", "input", (), m1.shape[1]),
        Op("fc1", "weighted", ("x",), m1.shape[0], mask=m1),
        Op("relu", "channelwise", ("fc1",), m1.shape[0]),
        Op("fc2", "weighted", ("relu",), m2.shape[0], mask=m2),
        Op("out", "output", ("fc2",)),
    ]


def test_mlp_by_hand() -> None:
    m1 = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=bool)  # unit 1 empty
    m2 = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)  # unit 2 of fc1 unread
    plan = plan_compaction(_mlp(m1, m2))
    fc1, relu, fc2 = plan["fc1"], plan["relu"], plan["fc2"]
    assert fc1.constant.tolist() == [False, True, False]
    assert fc1.needed.tolist() == [True, True, False]
    assert fc1.layout.tolist() == [0] and relu.layout.tolist() == [0]
    assert fc1.in_layout.tolist() == [0, 1, 2, 3]  # the network's input keeps every channel
    assert fc2.in_layout.tolist() == [0] and fc2.fold.tolist() == [1]
    assert relu.side.tolist() == [1] and fc1.side.tolist() == [1]
    assert fc2.layout.tolist() == [0, 1]  # outputs keep every unit, in order
    report = plan.report()
    row = report.layer("fc1")
    assert (row.kept_out, row.empty, row.unread, row.kept_in) == (1, 1, 1, 4)
    row = report.layer("fc2")
    assert (row.kept_in, row.folded, row.dropped) == (1, 1, 1)
    assert report.units_removed == 2 and report.units == 5
    assert "units removed: 2 of 5" in report.table()


def test_constant_through_reads_of_constants_and_zero_padding() -> None:
    """A unit that reads only constant channels is constant, unless zero padding makes the
    borders differ; then 'fold' folds a per-position map and 'keep' computes the channel."""
    first = np.zeros((2, 1, 3, 3), dtype=bool)
    first[0] = True  # channel 1 of the first layer is empty: constant
    second = np.zeros((2, 2, 3, 3), dtype=bool)
    second[0, 1, 1, 1] = True  # unit 0 reads only the constant channel
    second[1, 0, 0, 0] = True

    def graph(uniform: bool) -> list[Op]:
        return [
            Op("x", "input", (), 1),
            Op("c1", "weighted", ("x",), 2, mask=first, uniform=False),
            Op("c2", "weighted", ("c1",), 2, mask=second, uniform=uniform),
            Op("out", "output", ("c2",)),
        ]

    valid = plan_compaction(graph(True))
    assert valid["c2"].constant.tolist() == [True, False]
    assert valid["c2"].fold.tolist() == [1]
    padded = plan_compaction(graph(False))
    assert padded["c2"].constant.tolist() == [False, False]
    assert padded["c2"].fold.tolist() == [1] and padded["c1"].layout.tolist() == [0]
    kept = plan_compaction(graph(False), padded_constants="keep")
    assert kept["c2"].fold.size == 0 and kept["c1"].layout.tolist() == [0, 1]


def test_residual_addition_shares_one_layout() -> None:
    """Both operands of an addition hold the same channels; a layer that alone would drop a
    channel computes it (an empty filter: its bias) because the other operand needs it."""
    stem = np.ones((3, 2), dtype=bool)
    branch = np.zeros((3, 3), dtype=bool)
    branch[0, 0] = branch[1, 1] = True  # unit 2 empty, but the stem's channel 2 varies
    head = np.ones((2, 3), dtype=bool)
    ops = [
        Op("x", "input", (), 2),
        Op("stem", "weighted", ("x",), 3, mask=stem),
        Op("branch", "weighted", ("stem",), 3, mask=branch),
        Op("sum", "add", ("stem", "branch"), 3),
        Op("head", "weighted", ("sum",), 2, mask=head),
        Op("out", "output", ("head",)),
    ]
    plan = plan_compaction(ops)
    assert plan["branch"].constant.tolist() == [False, False, True]
    for name in ("stem", "branch", "sum"):
        assert plan[name].layout.tolist() == [0, 1, 2], name
    assert plan.report().layer("branch").added == 1


def test_groups_are_kept_or_dropped_whole() -> None:
    mask = np.zeros((4, 1, 1, 1), dtype=bool)  # depthwise-like: 4 groups of 1 in, 1 out
    mask[1] = mask[3] = True
    follow = np.zeros((2, 4, 1, 1), dtype=bool)
    follow[:, 1] = follow[:, 2] = True  # reads channel 1 (varies) and 2 (empty filter)

    def graph(first: str) -> list[Op]:
        stem = [Op("pw0", "weighted", ("x",), 4, mask=np.ones((4, 3, 1, 1), bool))]
        return [
            Op("x", "input", (), 4 if first == "x" else 3),
            *(stem if first == "pw0" else []),
            Op("dw", "weighted", (first,), 4, mask=mask, groups=4),
            Op("pw", "weighted", ("dw",), 2, mask=follow),
            Op("out", "output", ("pw",)),
        ]

    plan = plan_compaction(graph("pw0"))
    assert plan["dw"].groups_kept.tolist() == [1]
    assert plan["dw"].layout.tolist() == [1] and plan["dw"].in_layout.tolist() == [1]
    assert plan["pw0"].layout.tolist() == [1]
    assert plan["pw"].fold.tolist() == [2]  # the empty filter's bias, folded
    assert plan.report().layer("dw").groups_kept == 1
    # the network's input keeps all its channels, so every group reads its channel
    plan = plan_compaction(graph("x"))
    assert plan["dw"].groups_kept.tolist() == [0, 1, 2, 3]
    assert plan["dw"].layout.tolist() == [0, 1, 2, 3]


def test_flatten_maps_channels_to_features() -> None:
    conv = np.zeros((3, 1, 1, 1), dtype=bool)
    conv[0] = conv[2] = True  # channel 1 empty
    for channels_last in (False, True):
        features = flatten_channels(3, 4, channels_last)
        fc = np.ones((2, 12), dtype=bool)
        fc[:, features == 2] = False  # channel 2's features unread
        ops = [
            Op("x", "input", (), 1),
            Op("conv", "weighted", ("x",), 3, mask=conv),
            Op("flat", "flatten", ("conv",), 12, positions=4, channels_last=channels_last),
            Op("fc", "weighted", ("flat",), 2, mask=fc),
            Op("out", "output", ("fc",)),
        ]
        plan = plan_compaction(ops)
        assert plan["conv"].layout.tolist() == [0]
        assert plan["fc"].in_layout.tolist() == np.flatnonzero(features == 0).tolist()
        assert plan["fc"].fold.tolist() == np.flatnonzero(features == 1).tolist()


def test_opaque_operations_and_outputs_see_every_channel() -> None:
    m = np.zeros((3, 2), dtype=bool)
    m[0, 0] = True
    ops = [
        Op("x", "input", (), 2),
        Op("fc", "weighted", ("x",), 3, mask=m),
        Op("softmax", "opaque", ("fc",), 3),
        Op("out", "output", ("softmax",)),
    ]
    plan = plan_compaction(ops)
    assert plan["fc"].layout.tolist() == [0, 1, 2]
    assert plan.report().layer("fc").removed_out == 0


@pytest.mark.parametrize(
    ("ops", "words"),
    [
        ([Op("x", "input", (), 2)], "no output"),
        ([Op("x", "input", (), 2), Op("x", "output", ("x",))], "twice"),
        ([Op("x", "input", (), 2), Op("o", "output", ("y",))], "not an earlier"),
        ([Op("x", "magic", (), 2), Op("o", "output", ("x",))], "kind"),
        (
            [
                Op("x", "input", (), 2),
                Op("fc", "weighted", ("x",), 3, mask=np.ones((3, 5), dtype=bool)),
                Op("o", "output", ("fc",)),
            ],
            "reads 5",
        ),
        (
            [
                Op("x", "input", (), 2),
                Op("fc", "weighted", ("x",), 3, mask=np.ones((3, 2))),
                Op("o", "output", ("fc",)),
            ],
            "dtype bool",
        ),
        (
            [
                Op("x", "input", (), 2),
                Op("c", "weighted", ("x",), 3, mask=np.ones((3, 1, 1, 1), bool), groups=2),
                Op("o", "output", ("c",)),
            ],
            "groups",
        ),
        ([Op("x", "input", (), 2), Op("a", "add", ("x",), 2), Op("o", "output", ("a",))], "add"),
    ],
)
def test_bad_graphs_are_refused(ops: list[Op], words: str) -> None:
    with pytest.raises(SparseCoreError, match=words):
        plan_compaction(ops)


def test_bad_policy_is_refused() -> None:
    with pytest.raises(SparseCoreError, match="padded_constants"):
        plan_compaction([Op("x", "input", (), 1), Op("o", "output", ("x",))], padded_constants="x")


# -- random graphs, evaluated in NumPy -----------------------------------------------------------
@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[Op], dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ops = [Op("x", "input", (), draw(st.integers(1, 5)))]
    params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i in range(draw(st.integers(1, 7))):
        src = ops[draw(st.integers(0, len(ops) - 1))]
        kind = draw(st.sampled_from(["weighted", "weighted", "relu", "add", "opaque", "dropout"]))
        name = f"op{i}"
        if kind == "weighted":
            out = draw(st.integers(1, 6))
            mask = rng.random((out, src.channels)) < draw(st.sampled_from([0.2, 0.5, 0.9]))
            mask[rng.random(out) < 0.3] = False
            mask[:, rng.random(src.channels) < 0.3] = False
            ops.append(Op(name, "weighted", (src.name,), out, mask=mask))
            params[name] = (
                rng.standard_normal((out, src.channels)) * mask,
                rng.standard_normal(out),
            )
        elif kind == "add":
            same = [op for op in ops if op.channels == src.channels and op is not src]
            if not same:
                continue
            other = same[draw(st.integers(0, len(same) - 1))]
            ops.append(Op(name, "add", (src.name, other.name), src.channels))
        elif kind == "opaque":
            ops.append(Op(name, "opaque", (src.name,), src.channels))
        else:
            ops.append(Op(name, "channelwise", (src.name,), src.channels, uniform=kind == "relu"))
    used = {i for op in ops for i in op.inputs}
    last = [op.name for op in ops if op.name not in used]
    ops.append(Op("out", "output", tuple(last)))
    return ops, params


def _full(ops: list[Op], params: dict, x: np.ndarray, noise: dict | None = None) -> dict:
    """The masked network, with optional noise added to chosen channels of chosen operations."""
    values: dict[str, np.ndarray] = {}
    for op in ops:
        if op.kind == "input":
            v = x
        elif op.kind == "weighted":
            w, b = params[op.name]
            v = values[op.inputs[0]] @ w.T + b
        elif op.kind == "add":
            v = values[op.inputs[0]] + values[op.inputs[1]]
        elif op.kind == "channelwise" and op.uniform:
            v = np.maximum(values[op.inputs[0]], 0)
        elif op.kind in ("channelwise", "opaque"):
            # an operation whose constant outputs the analysis may not rely on
            v = values[op.inputs[0]] * 1.5 + 0.25
        else:
            continue
        if noise and op.name in noise:
            v = v.copy()
            v[:, noise[op.name]] += np.random.default_rng(1).standard_normal(
                (v.shape[0], int(noise[op.name].sum()))
            )
        values[op.name] = v
    return values


def _compact(ops: list[Op], params: dict, plan, x: np.ndarray) -> dict:
    """The compact network as the plan describes it: main columns, folds and side values."""
    main: dict[str, np.ndarray] = {}
    side: dict[str, np.ndarray] = {}
    for op in ops:
        p = plan[op.name]
        if op.kind == "input":
            main[op.name] = x[:, p.layout]
            side[op.name] = np.zeros(0)
        elif op.kind == "weighted":
            src = op.inputs[0]
            w, b = params[op.name]
            sp = plan[src]
            assert p.in_layout.tolist() == sp.layout.tolist()
            fold = w[p.layout][:, p.fold] @ side[src][plan.side_positions(src, p.fold)]
            main[op.name] = main[src] @ w[p.layout][:, p.in_layout].T + b[p.layout] + fold
            side[op.name] = b[p.side] + w[p.side][:, sp.side] @ side[src]
        elif op.kind == "add":
            a, c = op.inputs
            assert plan[a].layout.tolist() == plan[c].layout.tolist() == p.layout.tolist()
            main[op.name] = main[a] + main[c]
            side[op.name] = (
                side[a][plan.side_positions(a, p.side)] + side[c][plan.side_positions(c, p.side)]
            )
        elif op.kind == "channelwise":
            src = op.inputs[0]
            assert plan[src].layout.tolist() == p.layout.tolist()
            f = (lambda v: np.maximum(v, 0)) if op.uniform else (lambda v: v * 1.5 + 0.25)
            main[op.name] = f(main[src])
            side[op.name] = f(side[src][plan.side_positions(src, p.side)])
        elif op.kind == "opaque":
            src = op.inputs[0]
            assert plan[src].layout.size == op.channels
            main[op.name] = main[src] * 1.5 + 0.25
            side[op.name] = np.zeros(0)
    return main


@settings(deadline=None)
@given(graphs())
def test_random_graphs_compact_exactly(graph) -> None:
    ops, params = graph
    plan = plan_compaction(ops)
    x = np.random.default_rng(0).standard_normal((7, ops[0].channels))
    full = _full(ops, params, x)
    compact = _compact(ops, params, plan, x)
    outputs = ops[-1].inputs
    for name in outputs:
        np.testing.assert_allclose(compact[name], full[name], rtol=1e-12, atol=1e-12)
    for op in ops[:-1]:
        p = plan[op.name]
        # every computed channel is computed exactly, not only the needed ones
        np.testing.assert_allclose(compact[op.name], full[op.name][:, p.layout], atol=1e-12)
        # constant channels hold one value for every sample
        v = full[op.name][:, p.constant]
        np.testing.assert_allclose(v, np.broadcast_to(v[:1], v.shape), atol=1e-12)
        # channels nobody needs do not reach an output
        unneeded = ~p.needed
        if unneeded.any():
            noisy = _full(ops, params, x, {op.name: unneeded})
            for name in outputs:
                np.testing.assert_allclose(noisy[name], full[name], rtol=1e-12, atol=1e-12)
        assert set(np.flatnonzero(p.needed & ~p.constant)) <= set(p.layout.tolist())
        assert set(p.side.tolist()) <= set(np.flatnonzero(p.constant).tolist())
