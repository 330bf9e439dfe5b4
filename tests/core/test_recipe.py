"""The training recipe shared by the PyTorch and Keras jobs: defaults, validation, round trip."""

from __future__ import annotations

import pytest

from sparsecore.recipe import DEFAULT_LR, METHOD_OPTIONS, METHODS, Recipe


def test_defaults_are_the_papers_recipe() -> None:
    r = Recipe()
    assert (r.lr, r.momentum, r.nesterov, r.weight_decay, r.batch_size) == (
        0.1,
        0.9,
        True,
        5e-4,
        100,
    )
    assert r.lr_decay_at == (0.5, 0.75) and r.update_every is None
    assert DEFAULT_LR["lenet5"] == 0.01 and DEFAULT_LR["lenet300"] == 0.1
    assert set(METHOD_OPTIONS) | {"dense"} == set(METHODS)


def test_round_trip_keeps_tuples() -> None:
    r = Recipe(lr_decay_at=(0.3, 0.6), seed=4)
    d = r.to_dict()
    assert d["lr_decay_at"] == [0.3, 0.6]
    assert Recipe.from_dict(d) == r
    with pytest.raises(ValueError, match="unknown training options"):
        Recipe.from_dict({"sparsity": 0.9})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"density": 0.0}, "invalid density: 0.0"),
        ({"epochs": 0}, "invalid epochs"),
        ({"lr": float("nan")}, "invalid lr"),
        ({"prune_rate": 1.5}, "invalid prune_rate"),
        ({"lr_decay_at": (0.5, 1.0)}, "invalid lr_decay_at"),
        ({"method": "lottery"}, "unknown method 'lottery'"),
        ({"model": "resnet"}, "unknown model 'resnet'"),
    ],
)
def test_check_names_the_option_and_value(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Recipe(**change).check(["lenet300"])


def test_framework_specific_model_message() -> None:
    with pytest.raises(ValueError, match="model 'vgg' has no Keras version"):
        Recipe(model="vgg").check(["lenet300", "lenet5"], framework="Keras")


def test_sparse_options_are_the_same_keywords_for_both_jobs() -> None:
    """Recipe.sparse_options feeds attach() and SparseCallback alike: check the schedule rules."""
    from sparsecore import SparseConfig

    assert Recipe(method="dense").sparse_options(1000) is None
    paper = Recipe(epochs=10).sparse_options(1000)
    assert paper is not None
    assert (paper["update_every"], paper["update_at_epoch_end"], "stop_at" in paper) == (
        None,
        True,
        False,
    )
    assert (paper["prune"], paper["growth"], paper["redistribution"]) == (
        "magnitude",
        "momentum",
        "momentum",
    )
    stepwise = Recipe(epochs=10, update_every=50).sparse_options(1000)
    assert stepwise is not None
    # every 50 steps, none in the last epoch (steps 900..999)
    assert (stepwise["update_every"], stepwise["update_at_epoch_end"], stepwise["stop_at"]) == (
        50,
        False,
        900,
    )
    frozen = Recipe(epochs=10, stop_at=0.5, growth="momentum_neuron", max_density=0.4)
    options = frozen.sparse_options(1000)
    assert options is not None
    assert (options["stop_at"], options["growth"], options["max_density"]) == (
        500,
        "momentum_neuron",
        0.4,
    )
    static = Recipe(method="static", update_every=50).sparse_options(1000)
    assert static is not None
    assert (static["update_every"], static["update_at_epoch_end"]) == (None, False)
    assert "stop_at" not in static
    set_options = Recipe(method="set", redistribution="momentum").sparse_options(1000)
    assert set_options is not None and set_options["redistribution"] == "momentum"
    # every keyword is a SparseConfig option, so both adapters accept them; the job runs the
    # paper's recipe whatever the library's defaults are
    for opts in (paper, stepwise, options, static, set_options):
        config = SparseConfig.from_options(
            **{k: v for k, v in opts.items() if k not in ("dense_first", "dense_last")}
        )
        assert opts["recipe"] == "paper"
        assert (config.cover_units, config.revive_dead_units) == (False, False)
    plain = {k: v for k, v in paper.items() if k not in ("dense_first", "dense_last")}
    assert SparseConfig.from_options(**plain).init == "uniform"
    revived = Recipe(cover_units=True, revive_dead_units=True).sparse_options(1000)
    assert revived is not None and revived["cover_units"] and revived["revive_dead_units"]


def test_headline_counts_epochs_in_words_and_caveats_catch_a_dense_sparse_run():
    assert Recipe(epochs=1).headline() == (
        "sparsecore train: lenet300, method sparse, density 0.05, 1 epoch, seed 0"
    )
    assert Recipe(epochs=20, method="dense").headline("keras") == (
        "sparsecore train (keras): lenet300, method dense, 20 epochs, seed 0"
    )
    assert Recipe(density=0.05).caveats() == []
    assert Recipe(method="dense", density=1.0).caveats() == []
    (caveat,) = Recipe(method="set", density=1.0).caveats()
    assert "density 1 with method set keeps every weight" in caveat


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 2.5, r"invalid epochs: 2.5 \(an integer\)"),
        ("epochs", True, r"invalid epochs: True \(an integer\)"),
        ("density", True, r"invalid density: True \(a number\)"),
        ("lr", "0.1", r"invalid lr: '0.1' \(a number\)"),
        ("nesterov", "no", r"invalid nesterov: 'no' \(True or False\)"),
        ("limit_train", 10.0, r"invalid limit_train: 10.0 \(an integer\)"),
        ("lr_decay_at", (0.5, "x"), r"invalid lr_decay_at"),
    ],
)
def test_options_of_the_wrong_type_are_refused(field, value, message):
    """The Python API takes no type from argparse: a boolean, a string or 2.5 epochs must give
    the option's error, not a TypeError later in training."""
    with pytest.raises(ValueError, match=message):
        Recipe(**{field: value}).check(["lenet300"])
