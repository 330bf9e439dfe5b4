"""Class selectivity index on hand-made activations with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecore import SparseCoreError
from sparsecore.selectivity import (
    SelectivityAccumulator,
    class_means,
    class_selectivity,
    selectivity_from_means,
    unit_activations,
)


def hand_made() -> tuple[np.ndarray, np.ndarray]:
    """Three classes, two samples each; five units with known indices."""
    labels = np.array([0, 0, 1, 1, 2, 2])
    acts = np.array(
        [
            # only class 0 | constant | means 3,1,1 | dead | means 0,2,4 (samples differ)
            [1.0, 2.0, 2.0, 0.0, 0.0],
            [1.0, 2.0, 4.0, 0.0, 0.0],
            [0.0, 2.0, 1.0, 0.0, 1.0],
            [0.0, 2.0, 1.0, 0.0, 3.0],
            [0.0, 2.0, 0.5, 0.0, 4.0],
            [0.0, 2.0, 1.5, 0.0, 4.0],
        ]
    )
    return acts, labels


def test_known_indices():
    acts, labels = hand_made()
    res = class_selectivity(acts, labels)
    np.testing.assert_allclose(
        res.class_means,
        [[1, 2, 3, 0, 0], [0, 2, 1, 0, 2], [0, 2, 1, 0, 4]],
    )
    # unit 4: mu_max 4, mu_rest (0 + 2) / 2 = 1 -> 3/5
    expected = [1.0, 0.0, 0.5, np.nan, 0.6]
    np.testing.assert_allclose(res.index, expected, rtol=1e-12)
    assert res.dead.tolist() == [False, False, False, True, False]
    assert res.preferred.tolist() == [0, 0, 0, -1, 2]  # ties (unit 1) go to the first class
    np.testing.assert_allclose(res.live, [1.0, 0.0, 0.5, 0.6])
    s = res.summary()
    assert s["units"] == 5 and s["dead"] == 1
    assert s["mean"] == pytest.approx(0.525) and s["median"] == pytest.approx(0.55)


def test_conv_channels_are_averaged_over_space():
    # 4 samples, 2 classes, 2 channels of 3x3; channel 0 lights one pixel for class 1 only
    labels = np.array([0, 1, 0, 1])
    acts = np.zeros((4, 2, 3, 3))
    acts[1, 0, 1, 1] = 9.0
    acts[3, 0, 0, 0] = 9.0
    acts[:, 1] = 0.5  # channel 1: constant everywhere
    acts[0, 1, 2, 2] = 5.0  # ... except one class-0 pixel: spatial mean 1.0 on sample 0
    assert unit_activations(acts).shape == (4, 2)
    means = class_means(acts, labels)
    np.testing.assert_allclose(means, [[0.0, 0.75], [1.0, 0.5]])
    res = class_selectivity(acts, labels)
    np.testing.assert_allclose(res.index, [1.0, 0.25 / 1.25])
    assert res.preferred.tolist() == [1, 0]


def test_num_classes_and_ten_class_extremes():
    labels = np.repeat(np.arange(10), 3)
    one_hot = (labels[:, None] == np.arange(10)[None, :]).astype(float)  # unit c fires on class c
    res = class_selectivity(one_hot, labels, num_classes=10)
    np.testing.assert_allclose(res.index, np.ones(10))
    assert res.preferred.tolist() == list(range(10))
    # the opposite extreme: unit fires on every class but one -> mu_max 1, mu_rest 8/9
    res = class_selectivity(1.0 - one_hot, labels)
    np.testing.assert_allclose(res.index, np.full(10, (1 - 8 / 9) / (1 + 8 / 9)))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(12, 60),
    units=st.integers(1, 6),
    cuts=st.lists(st.integers(1, 59), max_size=4),
    scale=st.floats(0.01, 100.0),
)
def test_batches_scaling_and_relabelling(seed, n, units, cuts, scale):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(4), rng.integers(0, 4, n - 4)])
    acts = np.maximum(rng.standard_normal((n, units)), 0.0)
    acts[:, 0] = 0.0  # a dead unit
    whole = class_selectivity(acts, labels)
    # accumulating in arbitrary batches gives the same answer
    acc = SelectivityAccumulator(4)
    bounds = [0, *sorted({c for c in cuts if c < n}), n]
    for lo, hi in itertools.pairwise(bounds):
        acc.add(acts[lo:hi], labels[lo:hi])
    np.testing.assert_allclose(acc.result().index, whole.index, rtol=1e-12, equal_nan=True)
    # the index does not depend on the activation scale
    np.testing.assert_allclose(
        class_selectivity(acts * scale, labels).index, whole.index, rtol=1e-9, equal_nan=True
    )
    # renaming classes permutes the preferred class, not the index
    perm = np.array([2, 0, 3, 1])
    relabelled = class_selectivity(acts, perm[labels])
    np.testing.assert_allclose(relabelled.index, whole.index, rtol=1e-12, equal_nan=True)
    top2 = np.sort(whole.class_means, axis=0)[-2:]
    unique_max = ~whole.dead & (top2[1] > top2[0])  # ties may resolve to another class
    assert (relabelled.preferred[unique_max] == perm[whole.preferred[unique_max]]).all()
    assert whole.dead[0] and np.isnan(whole.index[0])
    assert ((whole.live >= 0) & (whole.live <= 1 + 1e-12)).all()


@pytest.mark.parametrize(
    ("acts", "labels", "kwargs", "message"),
    [
        (
            np.array([[1.0], [-0.5]]),
            np.array([0, 1]),
            {},
            "layer 'c1': activations must be non-negative",
        ),
        (np.ones((3, 2)), np.array([0, 1]), {}, r"labels of shape \(2,\) do not match 3 samples"),
        (np.ones((3, 2)), np.array([0, 2, 2]), {}, "class 1 has no samples"),
        (np.ones((3, 2)), np.array([0, 0, 0]), {}, "at least 2 classes"),
        (np.ones((3, 2)), np.array([0, 1, 5]), {"num_classes": 3}, "label 5 is out of range for 3"),
        (np.ones((3, 2)), np.array([0.0, 1.0, 1.0]), {}, "labels must be non-negative integers"),
        (np.full((2, 2), np.nan), np.array([0, 1]), {}, "NaN or Inf"),
        (np.ones(3), np.array([0, 1, 1]), {}, "shape \\(samples, units"),
        (
            np.ones((2, 2)),
            np.array([0, 1]),
            {"num_classes": 1},
            "num_classes must be an integer >= 2",
        ),
    ],
)
def test_bad_input(acts, labels, kwargs, message):
    with pytest.raises(SparseCoreError, match=message):
        class_selectivity(acts, labels, name="layer 'c1'", **kwargs)


def test_accumulator_rejects_unit_count_change_and_empty():
    acc = SelectivityAccumulator(name="fc")
    with pytest.raises(SparseCoreError, match="fc: no samples were added"):
        acc.result()
    acc.add(np.ones((2, 3)), np.array([0, 1]))
    with pytest.raises(SparseCoreError, match="batch has 4 units, earlier batches 3"):
        acc.add(np.ones((2, 4)), np.array([0, 1]))
    assert acc.result().units == 3  # the bad batch changed nothing


def test_means_need_two_classes():
    with pytest.raises(SparseCoreError, match="classes >= 2"):
        selectivity_from_means(np.ones((1, 3)))
