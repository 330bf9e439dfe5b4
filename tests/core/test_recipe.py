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
