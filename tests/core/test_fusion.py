"""The fused-update protocol (sparsecore.fusion): chosen by the modes' rules, never by comparing
functions; the engine checks the inputs once and builds the same masks and report either way.

A complete fused update is written here against the protocol on the NumPy reference's
operations: the engine must give exactly the step-by-step result through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

import sparsecore as sc
from sparsecore import fusion
from sparsecore.backend import FusedLayer, LayerScan
from sparsecore.backend_numpy import NumpyBackend
from sparsecore.hashing import HashKey
from sparsecore.modes import GROWTH, IMPORTANCE, PRUNE

REFERENCE = NumpyBackend()


class ReferenceFusion:
    """A fused update of the paper's rules on the reference's operations (the protocol only)."""

    prune = frozenset({"magnitude"})
    growth = frozenset({"momentum"})

    def __init__(self, importance: dict[str, str | None]) -> None:
        self.importance = importance
        self.calls: list[str] = []

    def scan(self, layers: Sequence[sc.Layer], *, source: str | None) -> list[LayerScan] | None:
        self.calls.append(f"scan:{source}")
        out = []
        for layer in layers:
            x = None if source is None else getattr(layer, source)
            read = [layer.momentum] + ([] if x is None else [x])
            finite = all(bool(np.isfinite(a).all()) for a in read)
            active = 0.0 if x is None else float(np.abs(x[layer.mask]).sum(dtype=np.float64))
            total = 0.0 if x is None else float(np.abs(x).sum(dtype=np.float64))
            out.append(LayerScan(int(layer.mask.sum()), active, total, finite))
        return out

    def prune_regrow(
        self,
        layers: Sequence[sc.Layer],
        nnz: Sequence[int],
        prune_counts: Sequence[int],
        grow_counts: Sequence[int],
        keys: Sequence[HashKey],
    ) -> list[FusedLayer] | None:
        self.calls.append("prune_regrow")
        if not all(np.isfinite(layer.weight).all() for layer in layers):
            return None
        out = []
        for layer, r, g, key in zip(layers, prune_counts, grow_counts, keys):
            be = REFERENCE
            pruned = be.select(layer.weight, layer.mask, r, among_active=True, largest=False,
                               magnitude=True, key=key)  # fmt: skip
            kept = be.and_not(layer.mask, pruned)
            grown = be.select(layer.momentum, kept, g, among_active=False, largest=True,
                              magnitude=True, key=key)  # fmt: skip
            new = kept | grown
            out.append(
                FusedLayer(
                    new,
                    be.apply(layer.weight, layer.mask, new),
                    int((layer.mask & ~new).sum()),
                    int((new & ~layer.mask).sum()),
                )
            )
        return out


class FusingBackend(NumpyBackend):
    """The reference with a fused update offered through ``fused_update()``; counts the
    finiteness checks the engine makes on it."""

    def __init__(self, importance: dict[str, str | None] | None = None) -> None:
        super().__init__()
        self.fused = ReferenceFusion(
            {"momentum": "momentum", "magnitude": "weight", "nonzero": None}
            if importance is None
            else importance
        )
        self.finite_checks = 0

    def fused_update(self) -> ReferenceFusion:
        return self.fused

    def all_finite(self, x):
        self.finite_checks += 1
        return super().all_finite(x)


def layers(seed: int = 0, shapes=((8, 10), (6, 8), (5, 3, 3))) -> list[sc.Layer]:
    rng = np.random.default_rng(seed)
    out = []
    for i, shape in enumerate(shapes):
        mask = rng.random(shape) < 0.3
        weight = (rng.normal(size=shape) * mask).astype(np.float32)
        momentum = (rng.normal(size=shape) * (rng.random(shape) < 0.6)).astype(np.float32)
        out.append(sc.Layer(f"l{i}", weight, mask, momentum))
    return out


def same(a: sc.UpdateResult, b: sc.UpdateResult) -> None:
    assert a.report == b.report
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))


def test_the_protocol_is_what_the_engine_asks_for() -> None:
    assert isinstance(ReferenceFusion({}), fusion.FusedUpdate)
    assert fusion.fused_update_of(REFERENCE) is None  # the reference offers none
    backend = FusingBackend()
    assert fusion.fused_update_of(backend) is backend.fused


@pytest.mark.parametrize("redistribution", ["momentum", "magnitude", "nonzero", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fused_update_gives_the_step_by_step_result(redistribution, seed) -> None:
    backend = FusingBackend()
    options = dict(prune_rate=0.4, redistribution=redistribution, max_density=0.5, min_density=0.05)
    fused = sc.update(layers(seed), backend=backend, update_index=seed + 1, **options)
    stepwise = sc.update(layers(seed), backend=REFERENCE, update_index=seed + 1, **options)
    same(fused, stepwise)
    source = {"momentum": "momentum", "magnitude": "weight"}.get(redistribution)
    assert backend.fused.calls == [f"scan:{source}", "prune_regrow"]
    assert fused.weights is not None and stepwise.weights is None
    want = sc.apply_masks(layers(seed), stepwise.masks, REFERENCE)
    assert all(np.array_equal(w, v) for w, v in zip(fused.weights, want))
    # the inputs are checked once, before either path; the fused passes find NaN/Inf themselves
    assert backend.finite_checks == 0


@pytest.mark.parametrize(
    "options",
    [
        {"growth": "random"},
        {"growth": "momentum_neuron"},
        {"prune": "SET"},
        {"redistribution": "magnitude"},  # not declared by this fused update
        {"ablate_below": 0.5},  # an option the fused passes do not implement
    ],
)
def test_modes_and_options_it_does_not_declare_run_step_by_step(options) -> None:
    backend = FusingBackend(importance={"momentum": "momentum"})
    result = sc.update(layers(), prune_rate=0.5, backend=backend, **options)
    assert backend.fused.calls == [] and result.weights is None
    same(result, sc.update(layers(), prune_rate=0.5, backend=REFERENCE, **options))


def test_a_user_function_under_a_builtin_name_is_never_fused() -> None:
    """The choice reads the rule the registration recorded, not the name alone: a wrapper
    registered as "magnitude" runs as given; the built-in function registered again is fused."""
    builtin = PRUNE["magnitude"]
    calls: list[str] = []

    def counting(backend, layer, rate, max_prune, key):
        calls.append(layer.name)
        return builtin(backend, layer, rate, max_prune, key)

    backend = FusingBackend()
    try:
        sc.register_prune("magnitude")(counting)
        assert PRUNE.info("magnitude").rule is None
        result = sc.update(layers(), prune_rate=0.5, backend=backend)
        assert calls == ["l0", "l1", "l2"] and backend.fused.calls == []
        assert result.weights is None
    finally:
        sc.register_prune("magnitude")(builtin)
    assert PRUNE.info("magnitude").rule == "magnitude"
    assert sc.update(layers(), prune_rate=0.5, backend=backend).weights is not None


def test_a_builtin_registered_under_another_name_is_fused_by_its_rule() -> None:
    backend = FusingBackend()
    sc.register_growth("momentum_alias_test", GROWTH["momentum"])
    try:
        info = GROWTH.info("momentum_alias_test")
        assert (info.rule, info.reads) == ("momentum", frozenset({"momentum"}))
        result = sc.update(layers(), prune_rate=0.5, growth="momentum_alias_test", backend=backend)
        assert result.weights is not None
        same(result, sc.update(layers(), prune_rate=0.5, backend=REFERENCE))
    finally:
        del GROWTH["momentum_alias_test"]


def test_scan_declines_and_the_update_goes_step_by_step() -> None:
    backend = FusingBackend()
    backend.fused.scan = lambda layers, source: None  # type: ignore[method-assign]
    result = sc.update(layers(), prune_rate=0.5, backend=backend)
    assert result.weights is None and backend.finite_checks > 0  # the stepwise path checks
    same(result, sc.update(layers(), prune_rate=0.5, backend=REFERENCE))


@pytest.mark.parametrize("where", ["weight", "momentum"])
@pytest.mark.parametrize("redistribution", ["momentum", "none"])
def test_nan_found_by_the_passes_raises_the_step_by_step_error(where, redistribution) -> None:
    """Whichever pass finds it (the scan reads momentum, prune_regrow the weights), the error
    names the layer and the array exactly as the step-by-step checks do; nothing changes."""
    bad = layers()
    getattr(bad[1], where)[0, 3] = math.nan
    with pytest.raises(sc.NonFiniteError) as want:
        sc.update(bad, prune_rate=0.5, redistribution=redistribution, backend=REFERENCE)
    before = [(x.weight.copy(), x.mask.copy()) for x in bad]
    with pytest.raises(sc.NonFiniteError) as got:
        sc.update(bad, prune_rate=0.5, redistribution=redistribution, backend=FusingBackend())
    assert str(got.value) == str(want.value) and f"'l1': {where} contains NaN" in str(got.value)
    assert all(np.array_equal(x.weight, w, equal_nan=True) and np.array_equal(x.mask, m)
               for x, (w, m) in zip(bad, before))  # fmt: skip


def test_a_nan_weight_outranks_a_budget_error_as_step_by_step() -> None:
    """redistribution='none' with no room to regrow raises a budget error, but a NaN weight
    (which the scan does not read) is reported first on both paths."""
    bad = layers()
    options = dict(prune_rate=0.5, redistribution="none", max_density=0.3)
    with pytest.raises(sc.SparseCoreError, match="max_density leaves room"):
        sc.update(bad, backend=FusingBackend(), **options)
    bad[2].weight[0, 0, 0] = math.inf
    with pytest.raises(sc.NonFiniteError, match="'l2': weight"):
        sc.update(bad, backend=REFERENCE, **options)
    with pytest.raises(sc.NonFiniteError, match="'l2': weight"):
        sc.update(bad, backend=FusingBackend(), **options)


def test_the_builtin_fused_backends_are_offered_through_the_protocol() -> None:
    from sparsecore.backend import get_backend

    numba = get_backend("numba")
    offered = fusion.fused_update_of(numba)
    assert isinstance(offered, fusion.MagnitudeMomentumFusion) and offered.backend is numba
    assert offered.prune == {"magnitude"} and offered.growth == {"momentum"}
    chosen = fusion.choose(numba, PRUNE.info("magnitude"), GROWTH.info("momentum"),
                           IMPORTANCE.info("magnitude"))  # fmt: skip
    assert chosen is not None and chosen.source == "weight"
    assert fusion.choose(numba, PRUNE.info("SET"), GROWTH.info("momentum"), None) is None


def test_the_first_bad_layer_is_named_on_both_paths() -> None:
    """A NaN weight in an earlier layer is named before a later layer's wrong shape, as if each
    layer were checked in full in turn, though the fused path checks NaN/Inf in its passes."""
    bad = layers()
    bad[0].weight[1, 1] = math.nan
    bad[2] = sc.Layer("l2", bad[2].weight, bad[2].mask, np.zeros((2, 2), np.float32))
    for backend in (REFERENCE, FusingBackend()):
        with pytest.raises(sc.NonFiniteError, match="'l0': weight contains NaN"):
            sc.update(bad, prune_rate=0.5, backend=backend)
    bad[0].weight[1, 1] = 0.0
    for backend in (REFERENCE, FusingBackend()):
        with pytest.raises(sc.SparseCoreError, match="'l2': momentum shape"):
            sc.update(bad, prune_rate=0.5, backend=backend)
