"""The backend interface: every operation of every backend equals the brute-force model.

One suite for all NumPy-array backends: the reference (``numpy``, its own O(n) selection), the
compiled one (``numba``), the CuPy backend's code on NumPy (``bit-pattern``), and ``minimal`` (tests/helpers/minimal_backend.py), which implements only
the required primitives, so that it checks the defaults written once in ``sparsecore.backend`` and
``sparsecore.selection``. A backend's fast override of an operation passes the same properties as
the default it replaces. The torch backend runs the same checks in tests/torch/test_torch_backend.py.
"""

from __future__ import annotations

import ast
import inspect
import sys
import types
from importlib import metadata

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from minimal_backend import MinimalBackend, overridden
from spec_model import brute_select

import sparsecore as sc
from sparsecore import backend as backend_module
from sparsecore import selection
from sparsecore.backend import REQUIRED_PRIMITIVES, ArrayBackend
from sparsecore.cupy import BitPatternBackend
from sparsecore.hashing import HashKey, layer_hash

BACKENDS = {
    "numpy": sc.get_backend("numpy"),
    "numba": sc.get_backend("numba"),
    "bit-pattern": BitPatternBackend(np),  # the CuPy backend's code, on NumPy
    "minimal": MinimalBackend(),
}
NAMES = list(BACKENDS)

scores_with_ties = st.one_of(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 9), st.integers(1, 40)),
        elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0]),
    ),
    hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 50)), elements=st.floats(-3, 3, width=32)),
    hnp.arrays(np.float16, st.tuples(st.integers(1, 5), st.integers(1, 30)), elements=st.sampled_from([0.0, 0.5, -0.5, 1e-3])),
    hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4)), elements=st.integers(-2, 2)),
    hnp.arrays(np.uint32, st.tuples(st.integers(1, 8), st.integers(1, 20)), elements=st.integers(0, 3)),
)  # fmt: skip


def _key(data: st.DataObject) -> HashKey:
    return HashKey(
        data.draw(st.integers(0, 99)), data.draw(st.integers(0, 9)), data.draw(st.integers(0, 5))
    )


def test_the_minimal_backend_implements_only_the_required_primitives() -> None:
    backend = MinimalBackend()
    assert overridden(backend) == []
    assert set(REQUIRED_PRIMITIVES) <= {n for n in vars(MinimalBackend)} | {"name"}
    lines = inspect.getsource(sys.modules[MinimalBackend.__module__]).count("\n")
    assert lines < 150, lines


def test_a_missing_primitive_is_named() -> None:
    class Partial(ArrayBackend):
        name = "partial"

        def owns(self, x: object) -> bool:
            return True

        def shape(self, x: np.ndarray) -> tuple[int, ...]:
            return x.shape

        def dtype_kind(self, x: np.ndarray) -> str:
            return x.dtype.kind

    with pytest.raises(NotImplementedError, match="'partial'.*'sum'"):
        Partial().count(np.ones(3, bool))


@pytest.mark.parametrize("name", NAMES)
@given(x=scores_with_ties, data=st.data())
def test_select_matches_the_model(name: str, x: np.ndarray, data: st.DataObject) -> None:
    be = BACKENDS[name]
    mask = data.draw(hnp.arrays(bool, x.shape))
    among_active, largest, magnitude = (data.draw(st.booleans()) for _ in range(3))
    sign = data.draw(st.sampled_from(["any", "positive", "nonpositive"]))
    if x.dtype.kind == "u":  # the random growth: hashes ranked as they are
        magnitude, sign = False, "any"
    candidates = mask if among_active else ~mask
    if sign != "any":
        candidates = candidates & ((x > 0) if sign == "positive" else ~(x > 0))
    k = data.draw(st.integers(0, int(candidates.sum())))
    key = _key(data)
    got = be.select(
        x, mask, k, among_active=among_active, largest=largest, magnitude=magnitude, key=key,
        sign=sign,
    )  # fmt: skip
    scores = np.abs(x) if magnitude else x
    assert got.shape == x.shape and got.dtype == bool
    assert np.array_equal(got, brute_select(scores, candidates, k, largest=largest, key=key))


@pytest.mark.parametrize("name", NAMES)
@given(x=scores_with_ties.filter(lambda a: a.dtype.kind == "f"), data=st.data())
def test_select_per_unit_matches_the_model(name: str, x: np.ndarray, data: st.DataObject) -> None:
    be = BACKENDS[name]
    mask = data.draw(hnp.arrays(bool, x.shape))
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    among_active, largest, magnitude = (data.draw(st.booleans()) for _ in range(3))
    candidates = mask if among_active else ~mask
    per_unit = np.moveaxis(candidates, axis, 0).reshape(x.shape[axis], -1).sum(axis=1)
    ks = np.array([data.draw(st.integers(0, int(c))) for c in per_unit], dtype=np.int64)
    key = _key(data)
    got = be.select_per_unit(
        x, mask, ks, axis=axis, among_active=among_active, largest=largest,
        magnitude=magnitude, key=key,
    )  # fmt: skip
    scores = np.abs(x) if magnitude else x
    expected = np.zeros(x.shape, dtype=bool)
    units = np.indices(x.shape)[axis % x.ndim]  # the unit of every position
    for j, k in enumerate(ks):
        expected |= brute_select(
            scores, candidates & (units == j), int(k), largest=largest, key=key
        )
    assert np.array_equal(got, expected)


floats = st.one_of(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 7), st.integers(1, 30)), elements=st.floats(-3, 3, width=32)),
    hnp.arrays(np.float16, st.tuples(st.integers(1, 5), st.integers(1, 9)), elements=st.sampled_from([0.0, -0.0, 0.5, -2.0, 6e-8])),
    hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)), elements=st.floats(-1e3, 1e3)),
)  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
@given(x=floats, data=st.data())
def test_reductions_and_element_wise_operations_match(
    name: str, x: np.ndarray, data: st.DataObject
) -> None:
    be = BACKENDS[name]
    mask = data.draw(hnp.arrays(bool, x.shape))
    other = data.draw(hnp.arrays(bool, x.shape))
    axis = data.draw(st.integers(0, x.ndim - 1))
    key = _key(data)
    per = x.size // x.shape[axis]

    def units(a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a, axis, 0).reshape(x.shape[axis], per)

    assert be.count(mask) == int(mask.sum())
    assert be.counts([mask, other]) == [int(mask.sum()), int(other.sum())]
    assert be.count_positive(x, mask) == int((mask & (x > 0)).sum())
    exact = np.abs(x[mask].astype(np.float64)).sum()
    assert be.abs_sum(x, mask) == pytest.approx(exact, rel=1e-12, abs=1e-300)
    assert be.abs_sum(x, None) == pytest.approx(np.abs(x.astype(np.float64)).sum(), rel=1e-12)
    np.testing.assert_allclose(
        be.unit_abs_sum(x, axis), np.abs(units(x).astype(np.float64)).sum(1), rtol=1e-12
    )
    for active in (True, False):
        assert be.unit_count(mask, axis, active).tolist() == (units(mask) == active).sum(1).tolist()
    assert be.unit_nonzero(x, axis).tolist() == (units(x) != 0).any(1).tolist()
    assert [u.tolist() for u in be.units_nonzero([mask, x], [axis, axis])] == [
        units(mask).any(1).tolist(),
        (units(x) != 0).any(1).tolist(),
    ]
    assert be.all_finite(x)
    assert np.array_equal(
        be.position_hash(key, x).astype(np.int64), layer_hash(key, x.shape).astype(np.int64)
    )
    assert np.array_equal(be.and_not(mask, other), mask & ~other)
    assert np.array_equal(be.logical_or(mask, other), mask | other)
    zeros = be.zeros_mask(x)
    assert zeros.shape == x.shape and zeros.dtype == bool and not zeros.any()
    applied = be.apply(x, mask, other)
    expected = np.where(mask & other, x, np.zeros((), x.dtype))
    assert applied.dtype == x.dtype and np.array_equal(
        applied.view(np.uint8), expected.view(np.uint8)
    )
    filled = be.signed_fill(x, mask, 0.25, key)
    odd = layer_hash(key, x.shape) & 1 == 1
    assert filled.dtype == x.dtype
    assert np.array_equal(filled, np.where(mask, np.where(odd, 0.25, -0.25), x).astype(x.dtype))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_nan_and_inf(name: str, bad: float) -> None:
    x = np.ones((3, 70), np.float32)
    x[2, 65] = bad
    assert not BACKENDS[name].all_finite(x)


MODES = [
    dict(),
    dict(prune="SET", growth="random", redistribution="magnitude"),
    dict(growth="gradient", redistribution="nonzero"),
    dict(growth="momentum_neuron", redistribution="none", min_density=0.1),
    dict(revive_dead_units=True),
    dict(ablate_below=0.5),
]


def _layers(seed: int) -> list[sc.Layer]:
    rng = np.random.default_rng(seed)
    layers = []
    for i, shape in enumerate([(12, 9), (7, 3, 4), (20, 5)]):
        mask = rng.random(shape) < 0.35
        mask[0] = False  # a dead unit
        weight = (rng.standard_normal(shape) * mask).astype(np.float32)
        momentum = rng.standard_normal(shape).astype(np.float32)
        momentum[(rng.random(shape) < 0.3)] = 0.0  # ties
        grad = rng.standard_normal(shape).astype(np.float32)
        layers.append(sc.Layer(f"l{i}", weight, mask, momentum, grad, axis=i % 2))
    return layers


@pytest.mark.parametrize(
    "options", MODES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "paper"
)
def test_an_engine_update_on_the_primitives_alone_equals_the_reference(options: dict) -> None:
    for seed in range(3):
        layers = _layers(seed)
        ref = sc.update(layers, prune_rate=0.4, seed=seed, backend="numpy", **options)
        minimal = MinimalBackend()
        got = sc.update(layers, prune_rate=0.4, seed=seed, backend=minimal, **options)
        for a, b in zip(ref.masks, got.masks):
            assert np.array_equal(a, b)
        for a, b in zip(sc.new_weights(layers, ref), sc.new_weights(layers, got, minimal)):
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


# -- the registry -------------------------------------------------------------------------------


def _imports(module: types.ModuleType) -> set[str]:
    """Every module ``module`` imports (inside functions too), as absolute names."""
    tree = ast.parse(inspect.getsource(module))
    package = module.__name__.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


def test_the_interface_imports_no_backend_and_no_engine() -> None:
    for module in (backend_module, selection):
        names = _imports(module)
        assert not {
            n
            for n in names
            if n.startswith(
                (
                    "sparsecore.backend_",
                    "sparsecore.numba",
                    "sparsecore.engine",
                    "sparsecore.builtin",
                )
            )
        }, names
        source = inspect.getsource(module)
        for adapter in ("sparsecore.torch", "sparsecore.keras", "sparsecore.cupy"):
            assert adapter not in source, (module.__name__, adapter)


def test_the_numba_backend_imports_no_engine_and_no_registry() -> None:
    import sparsecore.numba_backend as package

    for info in ("backend", "bits", "fused", "passes", "selection", "threads", "warm_up"):
        module = sys.modules[f"{package.__name__}.{info}"]
        names = _imports(module)
        assert not {
            n for n in names if n.startswith(("sparsecore.engine", "sparsecore.builtin"))
        }, (info, names)


def test_the_framework_backends_are_announced_as_entry_points() -> None:
    entries = {
        e.name: e.value for e in metadata.entry_points(group=backend_module.ENTRY_POINT_GROUP)
    }
    assert entries["torch"] == "sparsecore.torch.backend:TorchBackend"
    assert entries["keras"] == "sparsecore.keras.backend:KerasBackend"
    assert entries["cupy"] == "sparsecore.cupy.backend:CupyBackend"


class _FakeArray:
    pass


def test_a_registered_factory_is_created_once_and_only_when_its_framework_is_imported() -> None:
    created = []

    class FakeBackend(MinimalBackend):
        name = "fakeframework"

        def owns(self, x: object) -> bool:
            return isinstance(x, _FakeArray)

    def factory() -> ArrayBackend:
        created.append(1)
        return FakeBackend()

    array = _FakeArray()
    sc.backend.register_backend_factory("fakeframework", factory, framework="fakeframework")
    try:
        with pytest.raises(sc.SparseCoreError, match="no sparsecore backend"):
            sc.backend_for(array)  # its framework is not imported: not even created
        assert created == []
        sys.modules["fakeframework"] = types.ModuleType("fakeframework")
        assert sc.backend_for(array).name == "fakeframework"
        assert sc.get_backend("fakeframework") is sc.backend_for(array)
        assert created == [1]
    finally:
        sys.modules.pop("fakeframework", None)
        backend_module._FACTORIES.pop("fakeframework", None)
        backend_module._REGISTRY.pop("fakeframework", None)


def test_an_unknown_name_lists_the_known_backends() -> None:
    with pytest.raises(
        sc.SparseCoreError, match=r"unknown backend 'nope'.*'numba'.*'numpy'.*'torch'"
    ):
        sc.get_backend("nope")


def test_the_former_numba_module_path_still_imports() -> None:
    from sparsecore import backend_numba, numba_backend

    assert backend_numba.NumbaBackend is numba_backend.NumbaBackend
    assert backend_numba.warm_up is numba_backend.warm_up
