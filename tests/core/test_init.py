"""Initial masks: exact counts, ER/ERK densities computed by hand, reproducible positions."""

from __future__ import annotations

import numpy as np
import pytest

from sparsecore import (
    HashKey,
    SparseConfig,
    SparseCoreError,
    init_scales,
    initial_mask,
    initial_masks,
    layer_counts,
    layer_densities,
    layer_hash,
    target_count,
)


def test_uniform_exact_counts_by_largest_remainder() -> None:
    # N = round(0.5 * 13) = 6 (half to even); ideal 9*6/13 = 4.15, 4*6/13 = 1.85 -> 4 + 1, +1 to 1.85
    assert target_count([(3, 3), (2, 2)], 0.5) == 6
    assert layer_counts([(3, 3), (2, 2)], 0.5) == [4, 2]


def test_erk_by_hand() -> None:
    # ERK raw density sum(shape)/prod(shape): 150/5000 = 0.03 and 110/1000 = 0.11.
    # N = 600; ideal counts 600 * (150, 110) / 260 = 346.15, 253.85 -> 346, 254.
    assert layer_counts([(100, 50), (10, 100)], 0.1, "ERK") == [346, 254]
    dens = layer_densities([(100, 50), (10, 100)], 0.1, "ERK")
    assert dens == pytest.approx([346 / 5000, 254 / 1000])


def test_erk_includes_kernel_dims_and_er_does_not() -> None:
    shape = (16, 8, 3, 3)  # PyTorch OIHW
    other = (10, 100)
    # ER raw: (8 + 16) / (8 * 16) = 0.1875 vs (100 + 10) / 1000 = 0.11
    # ERK raw: 30 / 1152 = 0.0260 vs 110 / 1000 = 0.11
    er = layer_counts([shape, other], 0.2, "ER")
    erk = layer_counts([shape, other], 0.2, "ERK")
    n = target_count([shape, other], 0.2)
    assert sum(er) == sum(erk) == n == 430
    w_er = np.array([0.1875 * 1152, 0.11 * 1000])
    w_erk = np.array([30 / 1152 * 1152, 0.11 * 1000])
    assert er == pytest.approx((n * w_er / w_er.sum()).tolist(), abs=1)
    assert erk == pytest.approx((n * w_erk / w_erk.sum()).tolist(), abs=1)
    # Keras HWIO kernel: input channels at -2, output at -1 -> same ER density.
    assert layer_counts([(3, 3, 8, 16), other], 0.2, "ER", axes=[-1, 0]) == er


def test_dense_layers_are_filled_and_the_rest_resolved() -> None:
    # ERK wants (10, 1000) at 0.101 * eps >> 1: it is made dense, the rest goes to the big layer.
    counts = layer_counts([(1000, 1000), (10, 1000)], 0.5, "ERK")
    assert counts == [495000, 10000]
    # With a ceiling of 0.9 the small layer holds 9000 instead.
    assert layer_counts([(1000, 1000), (10, 1000)], 0.5, "ERK", max_density=0.9) == [496000, 9000]


def test_min_density_floor() -> None:
    shapes = [(1000, 1000), (1000, 10)]
    # Plain ERK: ideal 20200 * 2000 / 3010 = 13421.93 and 6778.07 -> 13421 + the leftover unit.
    assert layer_counts(shapes, 0.02, "ERK") == [13422, 6778]
    counts = layer_counts(shapes, 0.02, "ERK", min_density=0.015)
    assert counts[0] >= 15000 and counts[1] >= 150
    assert sum(counts) == target_count(shapes, 0.02)


def test_initial_mask_takes_largest_hashes() -> None:
    mask = initial_mask((7, 9), 10, seed=3, layer=2)
    hashes = layer_hash(HashKey(3, 0, 2), (7, 9)).reshape(-1)
    expected = np.zeros(63, dtype=bool)
    expected[np.argsort(hashes)[-10:]] = True
    assert np.array_equal(mask.reshape(-1), expected)


def test_initial_masks_exact_and_seeded() -> None:
    shapes = [(30, 20), (5, 4, 3, 3), (10, 30)]
    a = initial_masks(shapes, 0.1, "ERK", seed=1)
    b = initial_masks(shapes, 0.1, "ERK", seed=1)
    c = initial_masks(shapes, 0.1, "ERK", seed=2)
    assert sum(int(m.sum()) for m in a) == target_count(shapes, 0.1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert [m.shape for m in a] == shapes and all(m.dtype == bool for m in a)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density(density: float) -> None:
    with pytest.raises(SparseCoreError, match="density"):
        layer_counts([(3, 3)], density)


def test_bad_init_arguments() -> None:
    with pytest.raises(SparseCoreError, match="no layers"):
        layer_counts([], 0.5)
    with pytest.raises(SparseCoreError, match="init method"):
        layer_counts([(3, 3)], 0.5, "dense")
    with pytest.raises(SparseCoreError, match="max_density"):
        layer_counts([(3, 3)], 0.5, max_density=0.4)
    with pytest.raises(SparseCoreError, match="no elements"):
        layer_counts([(3, 0)], 0.5)


def test_er_reads_the_input_channels_of_every_layout() -> None:
    from sparsecore.init import _fan_in_out

    # PyTorch: Conv2d (out, in, kh, kw) axis 0; ConvTranspose2d (in, out, kh, kw) axis 1.
    assert _fan_in_out((16, 8, 3, 3), 0) == (8, 16)
    assert _fan_in_out((8, 16, 3, 3), 1) == (8, 16)
    assert _fan_in_out((16, 8, 5), 0) == (8, 16)
    assert _fan_in_out((8, 16, 5), 1) == (8, 16)
    # Keras: Conv2D (kh, kw, in, out) axis -1; Conv2DTranspose (kh, kw, out, in) axis -2.
    assert _fan_in_out((3, 3, 8, 16), -1) == (8, 16)
    assert _fan_in_out((3, 3, 16, 8), -2) == (8, 16)
    assert _fan_in_out((5, 16, 8), -2) == (8, 16)
    # Linear layers either way round; 1-D weights.
    assert _fan_in_out((10, 784), 0) == (784, 10)
    assert _fan_in_out((784, 10), -1) == (784, 10)
    assert _fan_in_out((7,), 0) == (1, 7)
    # The same layer in both frameworks' layouts gets the same ER count.
    torch_like = layer_counts([(16, 8, 3, 3), (10, 100)], 0.2, "ER", axes=[1, 0])
    keras_like = layer_counts([(3, 3, 16, 8), (100, 10)], 0.2, "ER", axes=[-2, -1])
    assert torch_like == keras_like


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_init_scales_restore_each_units_dense_scale(axis: int) -> None:
    """Ones times the factors: every unit with k of its n positions active has squared norm n
    (k weights of sqrt(n/k)), whatever k is; inactive positions are 0."""
    rng = np.random.default_rng(3)
    mask = rng.random((6, 5, 4)) < 0.3
    mask[(slice(None),) * (axis % 3) + (0,)] = False  # one unit without weights
    factors = init_scales(mask, axis)
    assert factors.shape == mask.shape and np.all(factors[~mask] == 0)
    units = np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1)
    rows = np.moveaxis(factors, axis, 0).reshape(units.shape)
    fan_in = units.shape[1]
    for unit, row in zip(units, rows):
        k = int(unit.sum())
        expected = fan_in if k else 0
        assert np.sum(row**2) == pytest.approx(expected)
        assert np.allclose(row[unit], np.sqrt(fan_in / max(k, 1)))


def test_init_scales_of_a_dense_layer_are_one_and_bad_axes_are_refused() -> None:
    assert np.array_equal(init_scales(np.ones((3, 4), bool), 1), np.ones((3, 4)))
    with pytest.raises(SparseCoreError, match="output axis 2 is out of range"):
        init_scales(np.ones((3, 4), bool), 2)


def test_scale_init_is_a_default_the_paper_recipe_and_old_configs_leave_out() -> None:
    assert SparseConfig().scale_init is True
    assert SparseConfig.from_options(recipe="paper").scale_init is False
    old = SparseConfig().to_dict()
    del old["scale_init"]
    assert SparseConfig.from_dict(old).scale_init is False
    with pytest.raises(SparseCoreError, match="scale_init"):
        SparseConfig(scale_init="yes")  # type: ignore[arg-type]
