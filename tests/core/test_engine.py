"""The stateful engine: schedule, counters, history, skip on non-finite input, save and restore."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import sparsecore as sc
from sparsecore import Layer, SparseConfig, SparseCoreError, SparseEngine

SHAPES = [(20, 30), (10, 20), (4, 10)]
NAMES = ["fc1", "fc2", "out"]


def make_run(seed: int = 0, **options):
    config = SparseConfig(density=0.2, total_steps=100, update_every=10, seed=seed, **options)
    engine = SparseEngine(config, NAMES, SHAPES)
    rng = np.random.default_rng(seed)
    masks = engine.initial_masks()
    weights = [rng.normal(size=s).astype(np.float32) * m for s, m in zip(SHAPES, masks)]
    return engine, masks, weights, rng


def train(engine, masks, weights, rng, steps: range):
    """A toy 'training': random momentum each step, updates when due."""
    for step in steps:
        momentum = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
        if engine.due(step):
            layers = [Layer(n, w, m, p) for n, w, m, p in zip(NAMES, weights, masks, momentum)]
            result = engine.update(layers, step)
            weights = sc.apply_masks(layers, result.masks)
            masks = result.masks
    return masks, weights


def test_counts_and_initial_masks() -> None:
    engine, masks, _, _ = make_run()
    assert engine.target == round(0.2 * (600 + 200 + 40)) == sum(int(m.sum()) for m in masks)
    assert [int(m.sum()) for m in masks] == engine.counts


def test_updates_keep_n_and_record_history() -> None:
    engine, masks, weights, rng = make_run()
    masks, weights = train(engine, masks, weights, rng, range(1, 101))
    assert engine.updates == 9  # steps 10..90; none at the last step
    assert [r.step for r in engine.history] == list(range(10, 100, 10))
    assert [r.update for r in engine.history] == list(range(1, 10))
    assert all(r.total_nnz == engine.target for r in engine.history)
    rates = [r.prune_rate for r in engine.history]
    assert rates == sorted(rates, reverse=True) and rates[0] == pytest.approx(engine.prune_rate(10))
    ever = engine.history[-1].extra["ever_active_fraction"]
    assert engine.target / 840 < ever <= 1.0
    assert all(np.count_nonzero(w) <= int(m.sum()) for w, m in zip(weights, masks))


def test_resume_from_state_dict_is_exact() -> None:
    engine, masks, weights, rng = make_run(seed=3)
    masks, weights = train(engine, masks, weights, rng, range(1, 45))
    saved = pickle.dumps((engine.state_dict(), masks, weights, rng.bit_generator.state))
    final_masks, final_weights = train(engine, masks, weights, rng, range(45, 101))

    state, masks2, weights2, rng_state = pickle.loads(saved)
    fresh, _, _, rng2 = make_run(seed=3)
    fresh.load_state_dict(state)
    rng2.bit_generator.state = rng_state
    resumed_masks, resumed_weights = train(fresh, masks2, weights2, rng2, range(45, 101))
    assert fresh.updates == engine.updates
    assert all(np.array_equal(a, b) for a, b in zip(final_masks, resumed_masks))
    assert all(np.array_equal(a, b) for a, b in zip(final_weights, resumed_weights))
    assert [r.to_dict() for r in fresh.history] == [r.to_dict() for r in engine.history]


def test_state_dict_is_json_friendly_except_masks() -> None:
    engine, masks, weights, rng = make_run()
    train(engine, masks, weights, rng, range(1, 21))
    state = engine.state_dict()
    ever = state.pop("ever_active")
    json.dumps(state)
    assert len(ever) == 3


def test_state_for_other_layers_is_refused() -> None:
    engine, *_ = make_run()
    other = SparseEngine(SparseConfig(density=0.2), ["x"], [(5, 5)])
    with pytest.raises(SparseCoreError, match="layers"):
        engine.load_state_dict(other.state_dict())
    with pytest.raises(SparseCoreError, match="engine state field .config. is missing"):
        engine.load_state_dict({"names": NAMES})


def test_non_finite_momentum_raises_and_changes_nothing() -> None:
    engine, masks, weights, _ = make_run()
    momentum = [np.ones(s, np.float32) for s in SHAPES]
    momentum[1][0, 0] = np.nan
    layers = [Layer(n, w, m, p) for n, w, m, p in zip(NAMES, weights, masks, momentum)]
    before = [m.copy() for m in masks]
    with pytest.raises(sc.NonFiniteError, match="'fc2'.*momentum"):
        engine.update(layers, 10)
    assert engine.updates == 0 and engine.history == []
    assert all(np.array_equal(a, b) for a, b in zip(before, masks))


def test_non_finite_momentum_can_be_skipped() -> None:
    engine, masks, weights, _ = make_run(on_nonfinite="skip")
    momentum = [np.full(s, np.inf, np.float32) for s in SHAPES]
    layers = [Layer(n, w, m, p) for n, w, m, p in zip(NAMES, weights, masks, momentum)]
    result = engine.update(layers, 10)
    assert result.report.skipped and "NaN or Inf" in result.report.reason
    assert engine.updates == 0 and len(engine.history) == 1
    assert all(a is b for a, b in zip(result.masks, masks))


def test_layers_must_match_the_engine() -> None:
    engine, masks, weights, _ = make_run()
    momentum = [np.ones(s, np.float32) for s in SHAPES]
    layers = [Layer(n, w, m, p) for n, w, m, p in zip(NAMES, weights, masks, momentum)]
    with pytest.raises(SparseCoreError, match="do not match"):
        engine.update(layers[::-1], 10)
    bad = [m.copy() for m in masks]
    bad[0][:] = True
    layers[0] = Layer("fc1", weights[0], bad[0], momentum[0])
    with pytest.raises(SparseCoreError, match="keeps exactly"):
        engine.update(layers, 10)


def test_engine_argument_errors() -> None:
    with pytest.raises(SparseCoreError, match="no layers"):
        SparseEngine(SparseConfig(), [], [])
    with pytest.raises(SparseCoreError, match="unique"):
        SparseEngine(SparseConfig(), ["a", "a"], [(2, 2), (2, 2)])
    with pytest.raises(SparseCoreError, match="must match"):
        SparseEngine(SparseConfig(), ["a"], [(2, 2), (2, 2)])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.01}, "density"),
        ({"density": True}, "density"),
        ({"growth": "grad"}, "growth"),
        ({"prune_rate": 2.0}, "prune_rate"),
        ({"max_density": 0.01}, "exceeds max_density"),
        ({"min_density": 0.5, "max_density": 0.4}, "min_density"),
        ({"update_every": -5}, "update_every"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation(options: dict, match: str) -> None:
    with pytest.raises(SparseCoreError, match=match):
        SparseConfig(**options)


def test_config_replace_and_roundtrip() -> None:
    config = SparseConfig().replace(density=0.1, growth="random")
    assert SparseConfig.from_dict(config.to_dict()) == config
    with pytest.raises(SparseCoreError, match="unknown option"):
        config.replace(sparsity=0.9)
    assert "density" in sc.option_names()


def test_custom_growth_mode_plugs_in() -> None:
    @sc.register_growth("lowest_index_test")
    def lowest_index(backend, layer, mask, k, key):
        flat = np.flatnonzero(~mask.reshape(-1))[:k]
        out = np.zeros(mask.size, bool)
        out[flat] = True
        return out.reshape(mask.shape)

    @sc.register_growth("greedy_test")
    def greedy(backend, layer, mask, k, key):  # a broken mode: grows one too many
        return lowest_index(backend, layer, mask, k + 1, key)

    w = np.ones((2, 4), np.float32)
    mask = np.array([[0, 0, 1, 1], [1, 1, 0, 0]], bool)
    layer = Layer("c", w * mask, mask, np.ones((2, 4), np.float32))
    res = sc.update([layer], prune_rate=0.5, growth="lowest_index_test")
    assert res.masks[0][0, 0] and res.masks[0][0, 1]
    with pytest.raises(SparseCoreError, match="greedy_test.*exactly 2"):
        sc.update([layer], prune_rate=0.5, growth="greedy_test")
    assert SparseConfig(growth="lowest_index_test").growth == "lowest_index_test"


def test_custom_prune_mode_is_checked() -> None:
    """A user prune mode that removes inactive positions, or more than allowed, is refused."""

    @sc.register_prune("inactive_test")
    def inactive(backend, layer, rate, limit, key):  # picks one active and one inactive position
        out = np.zeros(layer.mask.shape, bool)
        out[0, 0] = True  # inactive
        out[0, 2] = True  # active
        return out

    @sc.register_prune("everything_test")
    def everything(backend, layer, rate, limit, key):
        return layer.mask.copy()

    w = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    mask = np.array([[0, 0, 1, 1], [1, 1, 0, 0]], bool)
    layer = Layer("c", w * mask, mask, np.ones((2, 4), np.float32))
    before = (layer.weight.copy(), layer.mask.copy())
    with pytest.raises(SparseCoreError, match="layer 'c'.*inactive_test.*inactive positions"):
        sc.update([layer], prune_rate=0.5, prune="inactive_test")
    with pytest.raises(SparseCoreError, match="layer 'c'.*removed 4 weights.*the 2 allowed"):
        sc.update([layer], prune_rate=0.5, prune="everything_test", min_density=0.25)
    assert np.array_equal(layer.weight, before[0]) and np.array_equal(layer.mask, before[1])
    # Within the limit it is accepted, and the report counts what changed.
    res = sc.update([layer], prune_rate=0.5, prune="everything_test", growth="random")
    r = res.report.layers[0]
    assert (r.pruned, r.grown, r.nnz_after) == (4, 4, 4)
    assert r.net_pruned == int((mask & ~res.masks[0]).sum())
    assert r.net_grown == int((res.masks[0] & ~mask).sum())
