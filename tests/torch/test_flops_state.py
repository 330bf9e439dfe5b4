"""Counting FLOPs changes nothing in the model: a training run that writes its telemetry (which
counts them) must equal the same run resumed from its checkpoint."""

import torch
from torch import nn

from sparsecore.torch.flops import count_flops


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def test_count_flops_leaves_statistics_and_modes_as_they_were():
    model = _model().train()
    model[3].eval()  # a submodule in another mode than its parent stays in it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 1, 8, 8) * 3 + 1  # far from the running statistics' initial 0 and 1
    flops = count_flops(model, x)
    assert flops.total("dense") > 0
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # running mean/var and batch count unchanged
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True, True]


def test_a_batch_norm_forward_in_training_mode_would_move_them():
    """The check above is not vacuous: the same forward pass in training mode moves them."""
    model = _model().train()
    mean = model[1].running_mean.clone()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8) * 3 + 1)
    assert not torch.equal(mean, model[1].running_mean)
