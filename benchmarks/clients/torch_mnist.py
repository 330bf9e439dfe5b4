"""Client 1: the pytorch/examples ``mnist`` training script, on Fashion-MNIST read offline.

Our own version of the public example: two 3x3 convolutions (32 and 64 filters), max-pooling,
dropout, a 9216-128-10 classifier; Adadelta (lr 1.0) with ``StepLR(gamma=0.7)`` stepped every
epoch, batch 64, negative log-likelihood. The only sparsecore line is the ``attach`` call a user
would add after building the optimizer. Adadelta keeps no momentum, so sparse momentum reads the
library's own gradient average here.

    python benchmarks/clients/torch_mnist.py --epochs 1 --opt recipe=paper --out r.json
    python benchmarks/clients/torch_mnist.py --dense --width 0.316   # a narrowed dense network
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPOCHS = 14  # the example's own


class Net(nn.Module):
    """The example's network; ``width`` scales the two convolutions and the hidden layer."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, hidden = (max(1, round(n * width)) for n in (32, 64, 128))
        self.conv1 = nn.Conv2d(1, c1, 3, 1)
        self.conv2 = nn.Conv2d(c1, c2, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(12 * 12 * c2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def weight_count(model: nn.Module) -> int:
    """Weights of the layers sparsecore makes sparse (biases left out)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def dead_units(model: Net, x: torch.Tensor) -> dict[str, int]:
    """Per ReLU layer, units (filters, hidden units) whose input to the ReLU is never > 0."""
    maxima: dict[str, np.ndarray] = {}
    hooks = []
    for name in ("conv1", "conv2", "fc1"):
        module = getattr(model, name)

        def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
            dims = [0, 2, 3] if out.ndim == 4 else [0]
            maxima[name] = out.amax(dim=dims).numpy()

        hooks.append(module.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {name: common.count_dead(m) for name, m in maxima.items()}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            out = model(x[i : i + 1000])
            loss += F.nll_loss(out, y[i : i + 1000], reduction="sum").item()
            correct += int((out.argmax(1) == y[i : i + 1000]).sum())
    return loss / len(x), 100.0 * correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, density=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    parser.add_argument("--limit-train", type=int, default=None)
    args = parser.parse_args()
    epochs = args.epochs or EPOCHS
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x_train, y_train, x_test, y_test = common.load_images(args.limit_train, args.data)
    norm = lambda a: torch.from_numpy((a - common.FMNIST_MEAN) / common.FMNIST_STD)[:, None]  # noqa: E731
    xtr, ytr = norm(x_train), torch.from_numpy(y_train)
    xte, yte = norm(x_test), torch.from_numpy(y_test)

    model = Net(args.width)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    steps_per_epoch = -(-len(xtr) // args.batch_size)
    sparse = None
    if not args.dense:
        import sparsecore.torch

        options = common.sparse_options(args)
        sparse = sparsecore.torch.attach(
            model, optimizer, total_steps=epochs * steps_per_epoch, **options
        )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)

    order = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(xtr), generator=order)
        total, seen = 0.0, 0
        for i in range(0, len(xtr), args.batch_size):
            idx = perm[i : i + args.batch_size]
            optimizer.zero_grad()
            loss = F.nll_loss(model(xtr[idx]), ytr[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        scheduler.step()
        test_loss, test_acc = evaluate(model, xte, yte)
        row = {"epoch": epoch, "train_loss": total / seen, "test_loss": test_loss,
               "test_acc": test_acc}  # fmt: skip
        if sparse is not None:
            row["layer_densities"] = sparse.layer_densities()
        history.append(row)
        print(f"epoch {epoch}/{epochs} train loss {row['train_loss']:.4f} test loss "
              f"{test_loss:.4f} acc {test_acc:.2f}%", flush=True)  # fmt: skip

    result: dict = {
        "client": "torch_mnist",
        "epochs": history,
        "final": {"test_acc": history[-1]["test_acc"], "test_loss": history[-1]["test_loss"]},
        "weights": weight_count(model),
        "dead_units": dead_units(model, xte[:1000]),
    }
    if sparse is not None:
        result["density"] = sparse.density()
        result["config"] = sparse.config.to_dict()
        result["momentum_source"] = getattr(sparse, "momentum_source", None)
        last = sparse.last_report
        if last is not None:
            result["last_update"] = last.to_dict()
    common.write_result(args, result, started)


if __name__ == "__main__":
    main()
