"""Activation collection with forward hooks, on real models and real Fashion-MNIST images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sparsecore import SparseCoreError
from sparsecore.datasets import load_embedded_fashion_mnist
from sparsecore.torch.activations import collect_activations, default_layers, layer_selectivity
from sparsecore.torch.models import build_model


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, np.ndarray]:
    data = load_embedded_fashion_mnist().subset(200, 300)
    x = torch.from_numpy(data.test_images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, data.test_labels.astype(np.int64)


def lenet5() -> nn.Module:
    torch.manual_seed(0)
    return build_model("lenet5")


def test_default_layers_leave_out_the_classifier():
    assert default_layers(lenet5()) == ["conv1", "conv2", "fc3"]
    assert default_layers(build_model("lenet300")) == ["fc1", "fc2"]


def test_activations_equal_a_manual_forward(images):
    x, _ = images
    model = lenet5()
    model.train()
    acts = collect_activations(model, x, transform=torch.relu, batch_size=64)
    assert model.training  # mode restored
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    assert {k: v.shape for k, v in acts.items()} == {
        "conv1": (300, 20),
        "conv2": (300, 50),
        "fc3": (300, 500),
    }
    with torch.no_grad():
        h1 = F.relu(model.conv1(x))
        h2 = F.relu(model.conv2(F.max_pool2d(h1, 2)))
        h3 = F.relu(model.fc3(torch.flatten(F.max_pool2d(h2, 2), 1)))
    np.testing.assert_allclose(acts["conv1"], h1.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts["conv2"], h2.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts["fc3"], h3.numpy(), rtol=1e-5, atol=1e-6)
    assert (acts["fc3"] >= 0).all()
    # without the transform, the raw conv outputs (negative values included) are recorded
    raw = collect_activations(model, x[:10], ["conv1"])
    np.testing.assert_allclose(
        raw["conv1"], model.conv1(x[:10]).detach().mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6
    )


def test_batch_size_and_loader_do_not_change_the_result(images):
    x, y = images
    model = lenet5()
    a = collect_activations(model, x, ["conv2"], transform=torch.relu, batch_size=1000)
    b = collect_activations(model, x, ["conv2"], transform=torch.relu, batch_size=7)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.from_numpy(y)), batch_size=50
    )
    c = collect_activations(model, loader, ["conv2"], transform=torch.relu)
    np.testing.assert_allclose(a["conv2"], b["conv2"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["conv2"], c["conv2"], rtol=1e-5, atol=1e-6)


def test_selectivity_of_units_with_known_answers():
    # inputs are one-hot class codes; a linear layer with the identity makes unit c fire on class
    # c only (SI 1), one with all-ones weights fires equally on all (SI 0), zero weights are dead
    labels = torch.arange(10).repeat(5)
    x = F.one_hot(labels, 10).float()
    model = nn.Sequential(
        nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3), nn.ReLU(), nn.Linear(3, 2)
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(10))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.stack([torch.ones(10), torch.zeros(10), -torch.ones(10)]))
        model[2].bias.zero_()
    result = layer_selectivity(model, x, labels, ["1", "3"], num_classes=10)
    np.testing.assert_allclose(result["1"].index, np.ones(10))
    assert result["1"].preferred.tolist() == list(range(10))
    assert result["3"].index[0] == 0.0
    assert result["3"].dead.tolist() == [False, True, True]


def test_bad_arguments():
    model = lenet5()
    x = torch.zeros(4, 1, 28, 28)
    with pytest.raises(SparseCoreError, match="no module named 'conv9'"):
        collect_activations(model, x, ["conv9"])
    with pytest.raises(SparseCoreError, match="batch_size must be an integer >= 1, got 0"):
        collect_activations(model, x, batch_size=0)
    with pytest.raises(SparseCoreError, match="no data"):
        collect_activations(model, x[:0])
    with pytest.raises(SparseCoreError, match="layer 'conv1': activations must be non-negative"):
        layer_selectivity(model, x + 1, np.array([0, 1, 0, 1]), ["conv1"])
    assert all(not m._forward_hooks for m in model.modules())
