"""Exact-value tests of the selection and budget code, each written to fail under a specific
plausible mistake (a mutant) that broader property tests could let through. docs/mutation.md
lists which mutant each test kills."""

from __future__ import annotations

import numpy as np
import pytest

import sparsecore as sc
from sparsecore.backend_numpy import NumpyBackend
from sparsecore.hashing import HashKey, position_hash
from sparsecore.modes import round_half_even
from sparsecore.redistribute import capacities, importance_shares, split_budget

NP = NumpyBackend()
pick = NP.pick


def hash_order(key: HashKey, positions: np.ndarray) -> np.ndarray:
    """Positions sorted by hash, larger first (Python's sort, independent of the library)."""
    hashes = position_hash(key, positions)
    return np.array(sorted(positions.tolist(), key=lambda p: -int(hashes[positions == p][0])))


# -- (a) tie order ---------------------------------------------------------------------------------


@pytest.mark.parametrize("largest", [True, False])
def test_tie_order_takes_the_larger_hashes_first(largest: bool) -> None:
    """Kills: hash order reversed, index used instead of hash, tie group cut at the wrong end."""
    positions = np.arange(3, 40, dtype=np.int64)
    scores = np.ones(positions.size)
    key = HashKey(9, 4, 2)
    for k in (1, 5, positions.size - 1):
        chosen = pick(scores, positions, k, largest=largest, key=key)
        assert sorted(chosen.tolist()) == sorted(hash_order(key, positions)[:k].tolist())


def test_only_the_boundary_ties_use_the_hash() -> None:
    """Kills: strict comparisons turned non-strict (the tied group then counts the better ones)."""
    scores = np.array([5.0, 1.0, 1.0, 1.0, 4.0, 0.0, 1.0])
    positions = np.arange(7, dtype=np.int64)
    key = HashKey(1, 1, 0)
    chosen = set(pick(scores, positions, 4, largest=True, key=key).tolist())
    tied = np.array([1, 2, 3, 6])
    assert chosen == {0, 4, *hash_order(key, tied)[:2].tolist()}
    chosen = set(pick(scores, positions, 3, largest=False, key=key).tolist())
    assert chosen == {5, *hash_order(key, tied)[:2].tolist()}


def test_pick_edges() -> None:
    """Kills: ``k <= 0`` / ``k >= n`` shortcuts off by one."""
    positions = np.array([4, 7, 9], dtype=np.int64)
    scores = np.array([3.0, 1.0, 2.0])
    key = HashKey(0, 1, 0)
    assert pick(scores, positions, 0, largest=True, key=key).size == 0
    assert sorted(pick(scores, positions, 3, largest=True, key=key).tolist()) == [4, 7, 9]
    assert pick(scores, positions, 1, largest=True, key=key).tolist() == [4]
    assert pick(scores, positions, 1, largest=False, key=key).tolist() == [7]
    assert sorted(pick(scores, positions, 2, largest=False, key=key).tolist()) == [7, 9]


# -- (b) the integer split -------------------------------------------------------------------------


def test_split_is_exact_largest_remainder() -> None:
    """Kills: off-by-one in the leftover count or the floor; leftovers to the smallest fraction."""
    big = [100, 100, 100]
    assert split_budget(7, [0.5, 0.3, 0.2], big).tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4
    assert split_budget(10, [1.0, 1.0, 1.0], big).tolist() == [4, 3, 3]  # tie -> lower index
    assert split_budget(2, [0.2, 0.2, 0.6], big).tolist() == [1, 0, 1]  # .4 .4 1.2: tie -> lower
    assert split_budget(1, [1.0, 1.0, 1.0], big).tolist() == [1, 0, 0]
    assert split_budget(0, [1.0, 2.0, 3.0], big).tolist() == [0, 0, 0]


def test_split_water_filling_rounds() -> None:
    """Kills: a filled layer kept open, ``>=`` turned into ``>`` at the capacity test."""
    assert split_budget(10, [0.9, 0.05, 0.05], [2, 100, 100]).tolist() == [2, 4, 4]
    assert split_budget(10, [0.5, 0.5], [5, 100]).tolist() == [5, 5]  # ideal == cap exactly
    assert split_budget(6, [0.0, 0.0], [2, 4]).tolist() == [2, 4]  # zero weights: by capacity
    assert split_budget(3, [0.0, 1.0, 0.0], [5, 0, 5]).tolist() == [2, 0, 1]  # closed layer


def test_split_total_is_exact_on_awkward_fractions() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 8))
        caps = rng.integers(0, 50, n)
        total = int(rng.integers(0, caps.sum() + 1))
        out = split_budget(total, rng.random(n) ** 3, caps)
        assert int(out.sum()) == total and (out <= caps).all() and (out >= 0).all()


def test_shares_fall_back_to_size() -> None:
    assert importance_shares([0.0, 0.0], [1, 3]).tolist() == [0.25, 0.75]
    assert importance_shares([1.0, 3.0], [100, 1]).tolist() == [0.25, 0.75]


# -- (c) the capacity ------------------------------------------------------------------------------


def test_capacity_is_a_density_ceiling_not_a_fraction_of_free_slots() -> None:
    """Kills: ``max_density`` applied to the free slots (the reference's 0.99-of-free rule)."""
    assert capacities([100, 10], [30, 9], 0.5).tolist() == [20, 0]
    assert capacities([100], [30], 1.0).tolist() == [70]
    assert capacities([7], [3], 0.5).tolist() == [0]  # floor(3.5) - 3 = 0


def test_update_never_grows_a_layer_past_max_density() -> None:
    rng = np.random.default_rng(1)
    mask_a = np.zeros((10, 10), dtype=bool)
    mask_a.flat[:40] = True
    mask_b = np.zeros((10, 10), dtype=bool)
    mask_b.flat[:10] = True
    layers = [
        sc.Layer("a", rng.standard_normal((10, 10)) * mask_a, mask_a, 100 * np.ones((10, 10))),
        sc.Layer("b", rng.standard_normal((10, 10)) * mask_b, mask_b, 0.01 * np.ones((10, 10))),
    ]
    result = sc.update(layers, prune_rate=0.5, max_density=0.45, backend=NP)
    assert [int(m.sum()) for m in result.masks] == [45, 5]
    assert [r.capacity for r in result.report.layers] == [25, 40]


# -- prune counts ------------------------------------------------------------------------------------


def test_round_half_even() -> None:
    assert [round_half_even(x) for x in (0.5, 1.5, 2.5, 2.4999, 2.5001)] == [0, 2, 2, 2, 3]


def test_magnitude_prune_count_and_min_density() -> None:
    """Kills: r not rounded half-even, ``max_prune`` ignored or off by one."""
    weight = np.arange(1.0, 11.0).reshape(2, 5)  # 10 active weights
    layer = sc.Layer("w", weight, np.ones((2, 5), dtype=bool), np.ones((2, 5)))
    key = HashKey(0, 1, 0)
    pruned = sc.modes.PRUNE["magnitude"](NP, layer, 0.25, 10, key)  # 2.5 -> 2
    assert np.flatnonzero(pruned).tolist() == [0, 1]
    pruned = sc.modes.PRUNE["magnitude"](NP, layer, 0.35, 10, key)  # 3.5 -> 4
    assert np.flatnonzero(pruned).tolist() == [0, 1, 2, 3]
    pruned = sc.modes.PRUNE["magnitude"](NP, layer, 0.5, 3, key)  # capped by max_prune
    assert np.flatnonzero(pruned).tolist() == [0, 1, 2]


def test_set_prune_split_under_min_density() -> None:
    """Kills: the scaled-down SET split losing or adding a weight, or swapping the signs."""
    weight = np.array([[0.1, 0.2, 0.3, 0.4, -0.1, -0.2, -0.3, -0.4]])
    layer = sc.Layer("w", weight, np.ones_like(weight, dtype=bool), np.ones_like(weight))
    key = HashKey(0, 1, 0)
    full = sc.modes.PRUNE["SET"](NP, layer, 0.5, 8, key)
    assert np.flatnonzero(full).tolist() == [0, 1, 4, 5]
    capped = sc.modes.PRUNE["SET"](NP, layer, 0.5, 3, key)
    assert int(capped.sum()) == 3
    assert np.flatnonzero(capped).tolist() == [0, 4, 5]  # r_pos = 3*2//4 = 1, r_neg = 2


def test_empty_layer_importance_uses_all_positions() -> None:
    momentum = np.array([[1.0, -3.0], [0.0, 4.0]])
    empty = sc.Layer("e", np.zeros((2, 2)), np.zeros((2, 2), dtype=bool), momentum)
    assert sc.modes.IMPORTANCE["momentum"](NP, empty, 0) == 2.0
    some = sc.Layer("s", np.ones((2, 2)), np.array([[True, True], [False, False]]), momentum)
    assert sc.modes.IMPORTANCE["momentum"](NP, some, 2) == 2.0
    assert sc.modes.IMPORTANCE["magnitude"](NP, some, 2) == 1.0
    assert sc.modes.IMPORTANCE["nonzero"](NP, some, 2) == 2.0


# -- added after the first mutation run: each kills surviving mutants named in docs/mutation.md --


def test_single_layer_share_is_one() -> None:
    assert importance_shares([2.5], [10]).tolist() == [1.0]
    assert importance_shares([], []).size == 0


def test_budget_errors_say_what_is_wrong() -> None:
    with pytest.raises(sc.SparseCoreError, match="2 weights but 3 capacities"):
        split_budget(1, [1.0, 1.0], [1, 1, 1])
    with pytest.raises(sc.SparseCoreError, match=r"capacities >= 0.*capacity=\[-1, 5\]"):
        split_budget(0, [1.0, 1.0], [-1, 5])
    with pytest.raises(sc.SparseCoreError, match="finite and >= 0"):
        importance_shares([1.0, -1.0], [1, 1])
    with pytest.raises(sc.SparseCoreError, match="only 3 free slots"):
        split_budget(4, [1.0, 1.0], [1, 2])


def test_budgets_and_capacities_are_integers() -> None:
    assert split_budget(5, [0.3, 0.7], [10, 10]).dtype == np.int64
    assert capacities([10, 20], [1, 2], 0.5).dtype == np.int64


def test_fraction_ties_go_to_lower_index_among_many_layers() -> None:
    """Kills: an unstable sort of the fractional parts (NumPy's default quicksort reorders ties
    beyond 16 elements)."""
    out = split_budget(20, [1.0] * 40, [100] * 40)
    assert out.tolist() == [1] * 20 + [0] * 20


def test_fraction_ties_keep_index_order_in_a_mixed_large_split() -> None:
    """Kills: an unstable sort of the fractional parts. The fractions (0.25/0.5/0.75, exact in
    binary) tie in large groups and the leftover cuts through one of them; the expected split is
    computed here with Python's stable sort."""
    fractions = np.random.default_rng(0).choice([0.25, 0.5, 0.75], 172)
    weights = 1.0 + fractions
    weights[-1] += np.ceil(weights.sum()) - weights.sum()  # an integral total keeps ideals exact
    total = int(weights.sum())
    floors = np.floor(weights).astype(np.int64)
    leftover = total - int(floors.sum())
    order = sorted(range(weights.size), key=lambda i: -(weights[i] - floors[i]))
    expected = floors.copy()
    expected[order[:leftover]] += 1
    assert split_budget(total, weights, [1000] * weights.size).tolist() == expected.tolist()


def test_dtype_kind_folds_unsigned_into_integer() -> None:
    assert NP.dtype_kind(np.zeros(2, np.uint8)) == "i"
    assert NP.dtype_kind(np.zeros(2, np.int16)) == "i"
    assert NP.dtype_kind(np.zeros(2, np.float16)) == "f"
    assert NP.dtype_kind(np.zeros(2, bool)) == "b"


def test_unit_reductions_by_hand() -> None:
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4) - 10.0
    mask = x > 0
    for axis in (0, 1, 2, -1):
        others = tuple(a for a in range(3) if a != axis % 3)
        assert NP.unit_abs_sum(x, axis).tolist() == np.abs(x).sum(axis=others).tolist()
        active = mask.sum(axis=others)
        assert NP.unit_count(mask, axis, active=True).tolist() == active.tolist()
        free = x.size // x.shape[axis] - active
        assert NP.unit_count(mask, axis, active=False).tolist() == free.tolist()


def test_unit_abs_sum_accumulates_in_float64() -> None:
    x = np.ones((2, 40000), dtype=np.float32)
    x[:, 0] = 1e8  # float32 accumulation would lose every following 1.0
    assert NP.unit_abs_sum(x, 0).tolist() == [1e8 + 39999.0] * 2
    assert NP.unit_abs_sum(x, 0).dtype == np.float64


def test_registering_a_mode() -> None:
    with pytest.raises(sc.SparseCoreError, match="growth mode 'broken' must be a function"):
        sc.register_growth("broken")(42)

    def keep_nothing(backend, layer, rate, max_prune, key):
        return backend.zeros_mask(layer.mask)

    assert sc.register_prune("keep_nothing_for_test")(keep_nothing) is keep_nothing
    assert sc.modes.PRUNE["keep_nothing_for_test"] is keep_nothing
    mask = np.eye(3, dtype=bool)
    layer = sc.Layer("l", np.eye(3), mask, np.ones((3, 3)))
    result = sc.update([layer], prune_rate=0.5, prune="keep_nothing_for_test", backend=NP)
    assert np.array_equal(result.masks[0], mask)
    del sc.modes.PRUNE["keep_nothing_for_test"]


def test_set_prune_scaled_split_keeps_the_sign_proportions() -> None:
    """Kills: the min-density scaling computed from the other sign's count."""
    weight = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, -0.1, -0.2]])
    layer = sc.Layer("w", weight, np.ones_like(weight, dtype=bool), np.ones_like(weight))
    full = sc.modes.PRUNE["SET"](NP, layer, 0.5, 8, HashKey(0, 1, 0))
    assert np.flatnonzero(full).tolist() == [0, 1, 2, 6]  # r_pos = 3, r_neg = 1
    capped = sc.modes.PRUNE["SET"](NP, layer, 0.5, 2, HashKey(0, 1, 0))
    assert np.flatnonzero(capped).tolist() == [0, 6]  # r_pos = 2*3//4 = 1, r_neg = 1


def test_importance_of_a_layer_with_one_active_weight() -> None:
    """Kills: the empty-layer rule (mean over all positions) applied beyond nnz == 0."""
    momentum = np.array([[1.0, -3.0], [0.0, 4.0]])
    one = sc.Layer("o", np.eye(2), np.array([[False, True], [False, False]]), momentum)
    assert sc.modes.IMPORTANCE["momentum"](NP, one, 1) == 3.0


def test_neuron_growth_caps_each_unit_at_its_free_slots() -> None:
    """Kills: a unit's capacity taken as its active count instead of its free slots."""
    mask = np.array([[True, True, True, False], [False, False, False, False]])
    momentum = np.array([[9.0, 9.0, 9.0, 9.0], [0.1, 0.2, 0.3, 0.4]])
    layer = sc.Layer("n", mask * 1.0, mask, momentum)
    grown = sc.modes.GROWTH["momentum_neuron"](NP, layer, mask, 3, HashKey(0, 1, 0))
    assert np.flatnonzero(grown).tolist() == [3, 6, 7]  # unit 0 has one free slot


# -- added after the third mutation run ------------------------------------------------------------


def test_float32_importance_gives_the_shares_of_its_exact_values() -> None:
    """Kills: the scores left in float32 (1/3 and 2/3 would then be float32 roundings)."""
    shares = importance_shares(np.array([1.0, 2.0], dtype=np.float32), [1, 1])
    assert shares.tolist() == [1 / 3, 2 / 3]


def test_float32_weights_split_like_their_exact_values() -> None:
    """Kills: the ideals computed in float32. float32(1/3) = 0.3333333432674408 exactly, so the
    ideals are 22 / 1.3333333432... = 16.4999999 and 5.5000001: the leftover unit goes to the
    second layer. In float32 both ideals round to x.5 and the tie would go to the first layer."""
    weights = np.array([1.0, 1 / 3], dtype=np.float32)
    assert split_budget(22, weights, [100, 100]).tolist() == [16, 6]
    assert split_budget(22, weights.astype(np.float64), [100, 100]).tolist() == [16, 6]


def test_zero_weights_split_by_capacity_over_the_open_layers_only() -> None:
    """Kills: a filled (closed) layer still counted in the by-capacity split of the rest."""
    # layer 0 takes everything and fills at 4; the other 6 go 7:5 -> 3.5, 2.5 -> tie, lower index
    assert split_budget(10, [1.0, 0.0, 0.0], [4, 7, 5]).tolist() == [4, 4, 2]
    # layer 0 fills at 3, layer 1 has no room, layer 2 takes the 7 left and is full
    assert split_budget(10, [1.0, 0.0, 0.0], [3, 0, 7]).tolist() == [3, 0, 7]


@pytest.mark.parametrize(
    ("register", "table", "kind"),
    [
        (sc.register_importance, sc.modes.IMPORTANCE, "importance"),
        (sc.register_prune, sc.modes.PRUNE, "prune"),
        (sc.register_growth, sc.modes.GROWTH, "growth"),
    ],
)
def test_each_register_fills_its_own_table(register, table, kind) -> None:
    """Kills: a mode registered in the wrong table, under the wrong name or as None, and an error
    that does not name the kind of mode."""

    def mode(*args):
        raise AssertionError("never called")

    tables = (sc.modes.IMPORTANCE, sc.modes.PRUNE, sc.modes.GROWTH)
    before = [dict(t) for t in tables]
    try:
        assert register("mode_for_test")(mode) is mode
        assert table["mode_for_test"] is mode
        assert [len(t) - len(b) for t, b in zip(tables, before)] == [
            int(t is table) for t in tables
        ]
    finally:
        table.pop("mode_for_test", None)
    with pytest.raises(sc.SparseCoreError, match=f"^{kind} mode 'bad' must be a function, got 3$"):
        register("bad")(3)
    assert "bad" not in table


def test_set_prune_with_nothing_to_prune() -> None:
    """Kills: the min-density scaling entered at equality (``>=``): with nothing to prune and
    nothing allowed (0 >= 0) it divides by r_pos + r_neg = 0."""
    weight = np.array([[0.1, -0.2, 0.3, -0.4]])
    layer = sc.Layer("w", weight, np.ones_like(weight, dtype=bool), np.ones_like(weight))
    for rate, max_prune in ((0.0, 0), (0.0, 4), (0.1, 0)):
        pruned = sc.modes.PRUNE["SET"](NP, layer, rate, max_prune, HashKey(0, 1, 0))
        assert not pruned.any()
