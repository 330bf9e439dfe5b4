"""ablate_below in real PyTorch training: attach() and ``sparsecore train``, masks and reports."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sparsecore.torch as st
from sparsecore.cli import main
from sparsecore.reporting import main as report_main


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 60), nn.ReLU(), nn.Linear(60, 40), nn.ReLU(), nn.Linear(40, 5)
    )


def _units_with_weights(sparse) -> list[int]:
    return [int(sparse.mask(t.name).any(dim=1).sum()) for t in sparse.targets]


def _run(ablate_below: float):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(
        model, opt, density=0.1, update_every=4, total_steps=40, ablate_below=ablate_below
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 5, (64,), generator=g)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, sparse


def test_attach_with_ablation_empties_units_and_keeps_the_count():
    _, plain = _run(0.0)
    model, sparse = _run(0.7)
    target = sparse.engine.target
    assert all(r.total_nnz == target for r in sparse.history)
    assert sum(int(sparse.mask(t.name).sum()) for t in sparse.targets) == target
    last = sparse.history[-1].layers
    assert last[0].ablated > 0 and last[-1].ablated == 0
    ours, theirs = _units_with_weights(sparse), _units_with_weights(plain)
    assert ours[0] < theirs[0] and ours[-1] == 5  # every output unit stays
    # an ablated unit's weights are exactly 0 in the model, and its row in the mask is empty
    fc1 = model[0].weight.detach()
    empty = ~sparse.mask(sparse.targets[0].name).any(dim=1)
    assert int(empty.sum()) >= last[0].ablated and bool((fc1[empty] == 0).all())


TINY = ["--limit-train", "400", "--limit-test", "200", "--threads", "1", "--no-progress"]


def test_train_ablate_below_reaches_the_engine_and_the_report(tmp_path: Path, capsys):
    run = tmp_path / "run"
    args = ["--method", "sparse", "--density", "0.1", "--epochs", "3", "--ablate-below", "0.7"]
    assert main(["train", "--data", "embedded", "--out", str(run), *TINY, *args]) == 0
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["sparse"]["engine"]["config"]["ablate_below"] == 0.7
    assert json.loads((run / "summary.json").read_text())["config"]["ablate_below"] == 0.7
    updates = json.loads((run / "mask_updates.json").read_text())
    fc1 = [u["layers"][0]["ablated"] for u in updates]
    assert fc1[-1] > 0 and all(u["layers"][-1]["ablated"] == 0 for u in updates)
    masks = ckpt["sparse"]["masks"]
    assert 300 - int(masks[0].any(dim=1).sum()) >= fc1[-1]  # those units have no weight
    capsys.readouterr()
    assert report_main([str(run), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "ablated units" in text and f"{fc1[-1]}/300" in text


def test_train_refuses_a_bad_ablate_below(tmp_path: Path, capsys):
    run = tmp_path / "run"
    args = ["--method", "sparse", "--epochs", "1", "--ablate-below", "1.5"]
    assert main(["train", "--data", "embedded", "--out", str(run), *TINY, *args]) == 2
    assert "invalid ablate_below: 1.5" in capsys.readouterr().err
    assert not (run / "checkpoint.pt").exists()
