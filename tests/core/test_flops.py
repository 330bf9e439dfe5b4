"""FLOP accounting on hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest

from sparsecore.flops import layer_flops, model_flops


def test_linear_by_hand() -> None:
    mask = np.array([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=bool)
    f = layer_flops("fc", mask, batch=2)
    # dense: 2 FLOPs x 2 samples x 12 weights; backward = input grad + weight grad.
    assert (f.dense_forward, f.dense_backward) == (48, 96)
    assert (f.sparse_forward, f.sparse_backward) == (20, 40)
    # window step: input grad on 5 weights, weight grad on all 12.
    assert f.sparse_backward_dense_wgrad == 20 + 48
    # row 1 is empty; every column has a weight: 2 x 4 compact layer.
    assert (f.compact_forward, f.compact_backward) == (32, 64)
    first = layer_flops("fc", mask, batch=2, input_grad=False)
    assert (first.dense_backward, first.sparse_backward, first.compact_backward) == (48, 20, 32)
    assert first.sparse_backward_dense_wgrad == 48


def test_conv_by_hand_with_groups() -> None:
    mask = np.zeros((4, 2, 3, 3), dtype=bool)  # groups=2: out 0-1 read in 0-1, out 2-3 read 2-3
    mask[0, 1, 0, 0] = mask[0, 1, 2, 2] = True  # group 0: out 0, local in 1
    mask[3, 0, 1, 1] = mask[3, 1, 1, 1] = mask[2, 0, 0, 1] = True  # group 1: outs 2,3; ins 0,1
    f = layer_flops("conv", mask, batch=3, output_hw=(5, 4), groups=2)
    per = 2 * 3 * 20
    assert f.dense_forward == per * 72
    assert f.sparse_forward == per * 5
    # compact: group 0 is 1 out x 1 in, group 1 is 2 outs x 2 ins; 9 taps each.
    assert f.compact_forward == per * (1 * 1 + 2 * 2) * 9
    assert f.compact_backward == 2 * f.compact_forward
    assert f.kind == "conv2d"


def test_model_totals_and_speedup() -> None:
    rng = np.random.default_rng(0)
    a = layer_flops("a", rng.random((30, 20)) < 0.1, batch=4)
    b = layer_flops("b", np.ones((10, 30), dtype=bool), batch=4)
    m = model_flops([a, b])
    assert m.total("dense") == a.dense + b.dense
    assert m.speedup("sparse") == pytest.approx((a.dense + b.dense) / (a.sparse + b.sparse))
    assert m.speedup("sparse", "_forward") == pytest.approx(
        (a.dense_forward + b.dense_forward) / (a.sparse_forward + b.sparse_forward)
    )
    assert "total" in m.table()
    empty = model_flops([layer_flops("z", np.zeros((3, 3), dtype=bool), batch=1)])
    assert empty.speedup() == float("inf")


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"mask": np.ones((2, 2), dtype=np.float32), "batch": 1}, TypeError, "dtype bool"),
        ({"mask": np.ones((2, 2), dtype=bool), "batch": -1}, ValueError, "batch"),
        ({"mask": np.ones((2, 2, 3, 3), dtype=bool), "batch": 1}, ValueError, "output_hw"),
        ({"mask": np.ones(3, dtype=bool), "batch": 1}, ValueError, "2-D"),
        (
            {
                "mask": np.ones((3, 1, 3, 3), dtype=bool),
                "batch": 1,
                "output_hw": (2, 2),
                "groups": 2,
            },
            ValueError,
            "groups",
        ),
    ],
)
def test_bad_input(kwargs: dict, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words) as info:
        layer_flops("L7", **kwargs)
    assert "L7" in str(info.value)


def test_compact_counts_from_a_compaction_plan() -> None:
    """With the kept channels of a compaction plan, compact FLOPs are those of the kept shape,
    which can be smaller (units nothing reads) or larger (units an addition forces back) than
    the layer's own non-empty rows and columns."""
    mask = np.array([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=bool)
    own = layer_flops("fc", mask, batch=2)
    assert own.compact_forward == 2 * 2 * (2 * 4)
    plan = layer_flops("fc", mask, batch=2, kept_outputs=[2], kept_inputs=[0, 1, 2])
    assert plan.compact_forward == 2 * 2 * (1 * 3)
    assert plan.compact_backward == 2 * plan.compact_forward
    forced = layer_flops("fc", mask, batch=2, kept_outputs=[0, 1, 2], kept_inputs=[0, 1, 2, 3])
    assert forced.compact_forward == forced.dense_forward
    conv = np.ones((4, 2, 3, 3), dtype=bool)  # groups=2: 2 outs x 2 ins each
    grouped = layer_flops(
        "conv", conv, batch=1, output_hw=(2, 2), groups=2, kept_outputs=[2, 3], kept_inputs=[2, 3]
    )
    assert grouped.compact_forward == 2 * 4 * (2 * 2) * 9  # one group of 2 x 2 kept
    with pytest.raises(ValueError, match="both"):
        layer_flops("fc", mask, batch=2, kept_outputs=[0])
    with pytest.raises(ValueError, match="kept_inputs"):
        layer_flops("fc", mask, batch=2, kept_outputs=[0], kept_inputs=[4])
