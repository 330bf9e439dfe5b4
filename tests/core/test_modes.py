"""Mode metadata given at registration (``reads=``): what the engine demands and checks, for
user modes as for built-in ones; and a configuration's validity, whatever was imported first."""

from __future__ import annotations

import math

import numpy as np
import pytest
from subprocesses import run_python

import sparsecore as sc
from sparsecore.modes import GROWTH, IMPORTANCE, NEEDS_GRAD, NEEDS_MOMENTUM, PRUNE, signals_read

f32 = np.float32


@pytest.fixture
def registered():
    """Names registered by a test, unregistered after it."""
    names: list[tuple[dict, str]] = []
    yield names
    for table, name in names:
        table.pop(name, None)


def layer(momentum: bool = True, grad: bool = False) -> sc.Layer:
    rng = np.random.default_rng(0)
    mask = rng.random((4, 6)) < 0.5
    return sc.Layer(
        "fc",
        (rng.normal(size=(4, 6)) * mask).astype(f32),
        mask,
        rng.normal(size=(4, 6)).astype(f32) if momentum else None,
        rng.normal(size=(4, 6)).astype(f32) if grad else None,
    )


def largest_momentum_times_grad(backend, layer, mask, k, key):
    score = np.abs(layer.momentum * layer.grad).astype(f32)
    return backend.select(score, mask, k, among_active=False, largest=True, magnitude=False,
                          key=key)  # fmt: skip


BUILTIN_NAMES = ("momentum", "magnitude", "nonzero", "SET", "gradient", "random", "momentum_neuron")


def test_the_builtin_modes_declare_what_they_read() -> None:
    reads = {
        (table.kind, name): set(table.info(name).reads)
        for table in (IMPORTANCE, PRUNE, GROWTH)
        for name in BUILTIN_NAMES
        if name in table
    }
    assert reads == {
        ("importance", "momentum"): {"momentum"},
        ("importance", "magnitude"): {"weight"},
        ("importance", "nonzero"): set(),
        ("prune", "magnitude"): {"weight"},
        ("prune", "SET"): {"weight"},
        ("growth", "momentum"): {"momentum"},
        ("growth", "gradient"): {"grad"},
        ("growth", "random"): set(),
        ("growth", "momentum_neuron"): {"momentum"},
    }
    # the tables the adapters read are derived from these registrations
    assert {"momentum", "momentum_neuron"} <= NEEDS_MOMENTUM["growth"]
    assert "momentum" in NEEDS_MOMENTUM["importance"] and "gradient" in NEEDS_GRAD["growth"]
    assert signals_read(prune="SET", growth="random", redistribution="none") == {"weight"}


def test_a_user_mode_that_reads_momentum_is_checked_like_a_builtin(registered) -> None:
    returned = sc.register_growth(
        "momentum_grad_test", largest_momentum_times_grad, reads=("momentum", "grad")
    )
    registered.append((GROWTH, "momentum_grad_test"))
    assert returned is largest_momentum_times_grad
    assert "momentum_grad_test" in NEEDS_MOMENTUM["growth"]
    assert "momentum_grad_test" in NEEDS_GRAD["growth"]
    options = dict(prune_rate=0.5, growth="momentum_grad_test", redistribution="none")
    result = sc.update([layer(grad=True)], **options)
    assert result.report.layers[0].grown == result.report.layers[0].pruned
    with pytest.raises(sc.SparseCoreError, match="'fc': this update needs its grad"):
        sc.update([layer(grad=False)], **options)
    with pytest.raises(sc.SparseCoreError, match="'fc': this update needs its momentum"):
        sc.update([layer(momentum=False, grad=True)], **options)
    bad = layer(grad=True)
    bad.momentum[1, 1] = math.nan
    with pytest.raises(sc.NonFiniteError, match="'fc': momentum contains NaN or Inf"):
        sc.update([bad], **options)
    # without the declaration nothing is demanded: the mode itself fails on the missing array
    sc.register_growth("undeclared_test")(largest_momentum_times_grad)
    registered.append((GROWTH, "undeclared_test"))
    assert "undeclared_test" not in NEEDS_MOMENTUM["growth"]
    with pytest.raises(TypeError):
        sc.update([layer(grad=False)], prune_rate=0.5, growth="undeclared_test")


def test_the_decorator_takes_reads_too(registered) -> None:
    @sc.register_importance("mean_grad_test", reads=("grad",))
    def mean_grad(backend, layer, nnz):
        return backend.abs_sum(layer.grad, None) / layer.grad.size

    registered.append((IMPORTANCE, "mean_grad_test"))
    assert IMPORTANCE["mean_grad_test"] is mean_grad
    assert IMPORTANCE.info("mean_grad_test").reads == {"grad"}
    assert IMPORTANCE.info("mean_grad_test").rule is None  # a user mode is never fused
    with pytest.raises(sc.SparseCoreError, match="needs its grad"):
        sc.update([layer()], prune_rate=0.5, redistribution="mean_grad_test")
    with_grad = layer(grad=True)
    result = sc.update([with_grad], prune_rate=0.5, redistribution="mean_grad_test")
    assert result.report.layers[0].importance == pytest.approx(np.abs(with_grad.grad).mean())


@pytest.mark.parametrize(
    ("reads", "match"),
    [
        ("momentum", r"reads must be a tuple .* reads=\('momentum',\)"),
        (("hessian",), r"reads names unknown signal\(s\) \['hessian'\]"),
        (3, "reads must be a tuple"),
    ],
)
def test_bad_reads_are_refused_and_register_nothing(reads, match) -> None:
    with pytest.raises(sc.SparseCoreError, match=f"prune mode 'bad_reads_test': {match}"):
        sc.register_prune("bad_reads_test", lambda *a: None, reads=reads)
    assert "bad_reads_test" not in PRUNE


def test_assigning_to_a_table_registers_and_del_unregisters(registered) -> None:
    def keep(backend, layer, rate, max_prune, key):
        return backend.zeros_mask(layer.mask)

    PRUNE["assigned_test"] = keep
    registered.append((PRUNE, "assigned_test"))
    assert PRUNE.info("assigned_test").fn is keep and PRUNE.info("assigned_test").reads == set()
    assert sc.SparseConfig(prune="assigned_test").prune == "assigned_test"
    del PRUNE["assigned_test"]
    with pytest.raises(sc.SparseCoreError, match="unknown prune mode 'assigned_test'"):
        PRUNE.info("assigned_test")
    with pytest.raises(sc.SparseCoreError, match="prune must be one of"):
        sc.SparseConfig(prune="assigned_test")


FIRST_IMPORTS = [
    "import sparsecore.config",
    "import sparsecore.modes",
    "import sparsecore.engine",
    "import sparsecore.steps",
    "import sparsecore.fusion",
    "import sparsecore",
]


@pytest.mark.parametrize("first", FIRST_IMPORTS)
def test_config_validity_does_not_depend_on_what_was_imported_first(first, tmp_path) -> None:
    code = (
        f"{first}\n"
        "import json\n"
        "from dataclasses import fields\n"
        "from sparsecore.config import SparseConfig\n"
        "from sparsecore.modes import GROWTH, IMPORTANCE, NEEDS_GRAD, NEEDS_MOMENTUM, PRUNE\n"
        "ok = {}\n"
        "for option, names in [('prune', ['magnitude', 'SET']), ('growth', ['momentum', "
        "'gradient', 'random', 'momentum_neuron']), ('redistribution', ['momentum', "
        "'magnitude', 'nonzero', 'none'])]:\n"
        "    for name in names:\n"
        "        SparseConfig(**{option: name})\n"
        "        ok[option] = ok.get(option, []) + [name]\n"
        "tables = {t.kind: sorted(t) for t in (IMPORTANCE, PRUNE, GROWTH)}\n"
        "needs = [sorted(NEEDS_MOMENTUM['growth']), sorted(NEEDS_GRAD['growth'])]\n"
        "rules = sorted(str(t.info(n).rule) for t in (IMPORTANCE, PRUNE, GROWTH) for n in t)\n"
        "print(json.dumps([ok, tables, needs, rules]))\n"
    )
    ok, tables, needs, rules = run_python(code, tmp_path)
    assert tables == {
        "importance": ["magnitude", "momentum", "nonzero"],
        "prune": ["SET", "magnitude"],
        "growth": ["gradient", "momentum", "momentum_neuron", "random"],
    }
    assert needs == [["momentum", "momentum_neuron"], ["gradient"]]
    assert "None" not in rules and len(rules) == 9
    assert ok["redistribution"] == ["momentum", "magnitude", "nonzero", "none"]
