"""Reference models for 28x28 grayscale images (MNIST, Fashion-MNIST), looked up by name.

Plain ``nn.Module`` subclasses with no sparsity inside them: sparsity is attached from outside by
``sparsecore.torch.attach``, so the same model trains dense or sparse. LeNet-300-100 and
LeNet-5 (Caffe variant) are the models of the sparse momentum paper's MNIST experiments; the
VGG- and WRN-style nets are small convolutional stand-ins for the paper's CIFAR models, sized so
a CPU can train them on 28x28 inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .lm_models import LM_MODELS

__all__ = [
    "MODELS",
    "LeNet5",
    "LeNet300100",
    "SmallVGG",
    "SmallWRN",
    "build_model",
    "model_names",
]


class LeNet300100(nn.Module):
    """Fully connected 784-300-100-10 with ReLU (LeCun et al. 1998)."""

    def __init__(self, num_classes: int = 10, in_features: int = 28 * 28) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 in the Caffe variant: conv 20@5x5, pool, conv 50@5x5, pool, 800-500-10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc3 = nn.Linear(50 * 4 * 4, 500)
        self.fc4 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 28 -> 24 -> 12
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 12 -> 8 -> 4
        x = torch.flatten(x, 1)
        x = F.relu(self.fc3(x))
        return self.fc4(x)


class SmallVGG(nn.Module):
    """VGG-style: three blocks of two 3x3 conv + BN + ReLU, max-pooled, then a small classifier.

    ``width`` scales the channel counts (32, 64, 128 at width 1); 28 -> 14 -> 7 -> 3 pixels.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        channels = [max(1, round(c * width)) for c in (32, 64, 128)]
        layers: list[nn.Module] = []
        cin = 1
        for cout in channels:
            for _ in range(2):
                layers += [
                    nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                ]
                cin = cout
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * 3 * 3, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _PreActBlock(nn.Module):
    """Wide-ResNet basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 with a 1x1 shortcut on change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


class SmallWRN(nn.Module):
    """WRN-d-k for 28x28 grayscale (Zagoruyko & Komodakis 2016); default WRN-10-2.

    Depth 6n+4 gives n blocks in each of three groups of width 16k, 32k, 64k at strides 1, 2, 2
    (28 -> 28 -> 14 -> 7 pixels), then BN-ReLU, global average pooling and a linear classifier.
    """

    def __init__(self, num_classes: int = 10, depth: int = 10, widen_factor: int = 2) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WRN widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        cin = 16
        for group, cout in enumerate(widths):
            for i in range(n):
                stride = 2 if group > 0 and i == 0 else 1
                blocks.append(_PreActBlock(cin, cout, stride))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv1(x))
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


#: Model registry: name -> factory taking ``num_classes`` (and model-specific keywords).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300100,
    "lenet5": LeNet5,
    "vgg": SmallVGG,
    "wrn": SmallWRN,
    **LM_MODELS,  # character-level language models (sparsecore.torch.lm_models)
}


def model_names() -> list[str]:
    """Registered model names, in registry order."""
    return list(MODELS)


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """A fresh model by registry name (initialised from torch's global RNG: seed it first)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of {', '.join(model_names())}"
        ) from None
    return factory(num_classes=num_classes, **kwargs)
