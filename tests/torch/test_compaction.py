"""sparsecore.torch.compact: the compact model computes what the masked model computes.

Exactness over random networks (hypothesis): masks with empty rows and columns, strides, groups,
zero and reflect padding, batch norm in training and evaluation mode (running statistics of the
removed channels included), residual additions, flattening into linear layers, float32 and
float64; then the API: masks from attach(), the report, what compact leaves untouched, bad input.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import sparsecore.torch as sct
from sparsecore.errors import SparseCoreError
from sparsecore.torch.compaction import compact, compaction_plan
from sparsecore.torch.models import LeNet300100, build_model

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def assert_same(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Equal up to ``TOL`` relative to the output's scale (its largest magnitude)."""
    got, want = got.detach(), want.detach()
    scale = max(float(want.abs().max()), 1e-30)
    err = float((got - want).abs().max())
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g}, scale {scale:.3g}"


class _Residual(nn.Module):
    """x + branch(x), the branch keeping the channel count (a residual block)."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class _Net(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.head(torch.flatten(x, 1))


def _conv_block(cin: int, spec: dict) -> tuple[list[nn.Module], int]:
    cout = spec["out"] * spec["groups"]
    layers: list[nn.Module] = [
        nn.Conv2d(
            cin,
            cout,
            spec["kernel"],
            stride=spec["stride"],
            padding=spec["padding"],
            groups=spec["groups"],
            bias=spec["bias"],
            padding_mode=spec["padding_mode"],
        )
    ]
    if spec["bn"]:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True) if spec["relu"] else nn.Tanh())
    if spec["pool"]:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return layers, cout


conv_specs = st.fixed_dictionaries(
    {
        "out": st.integers(1, 6),
        "groups": st.sampled_from([1, 1, 2]),
        "kernel": st.sampled_from([1, 3]),
        "stride": st.sampled_from([1, 2]),
        "padding": st.sampled_from([0, 1]),
        "padding_mode": st.sampled_from(["zeros", "zeros", "reflect"]),
        "bias": st.booleans(),
        "bn": st.booleans(),
        "relu": st.booleans(),
        "pool": st.booleans(),
    }
)


@st.composite
def networks(draw: st.DrawFn) -> dict:
    return {
        "in_channels": draw(st.sampled_from([2, 4])),
        "size": draw(st.integers(6, 9)),
        "convs": draw(st.lists(conv_specs, min_size=1, max_size=3)),
        "residual": draw(st.sampled_from([None, "pad", "1x1"])),
        "hidden": draw(st.lists(st.integers(2, 12), max_size=2)),
        "bn1d": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "density": draw(st.sampled_from([0.1, 0.3, 0.7])),
        "empty_rows": draw(st.sampled_from([0.0, 0.3, 0.6])),
        "empty_cols": draw(st.sampled_from([0.0, 0.3])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "batch": draw(st.integers(2, 5)),
        "padded_constants": draw(st.sampled_from(["fold", "keep"])),
    }


def _build(spec: dict) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    cin, size = spec["in_channels"], spec["size"]
    layers: list[nn.Module] = []
    for conv in spec["convs"]:
        conv = dict(conv)
        if cin % conv["groups"]:
            conv["groups"] = 1
        if size + 2 * conv["padding"] < conv["kernel"]:  # keep every layer valid for the size
            conv["kernel"], conv["padding"] = 1, 0
        if size <= conv["padding"]:  # reflection needs more pixels than it pads
            conv["padding_mode"] = "zeros"
        size = (size + 2 * conv["padding"] - conv["kernel"]) // conv["stride"] + 1
        conv["pool"] = conv["pool"] and size >= 2
        size = -(-size // 2) if conv["pool"] else size
        block, cin = _conv_block(cin, conv)
        layers += block
    if spec["residual"] is not None:
        pad = spec["residual"] == "pad"
        layers.append(
            _Residual(
                nn.Sequential(
                    nn.Conv2d(cin, cin, 3 if pad else 1, padding=1 if pad else 0),
                    nn.BatchNorm2d(cin),
                )
            )
        )
        layers.append(nn.ReLU())
    features = nn.Sequential(*layers)
    x = torch.randn(spec["batch"], spec["in_channels"], spec["size"], spec["size"], generator=gen)
    with torch.no_grad():
        flat = features(x).flatten(1).shape[1]
    head: list[nn.Module] = []
    width = flat
    for h in spec["hidden"]:
        head.append(nn.Linear(width, h))
        if spec["bn1d"]:
            head.append(nn.BatchNorm1d(h))
        head.append(nn.ReLU())
        width = h
    head.append(nn.Linear(width, 3))
    model = _Net(features, nn.Sequential(*head)).to(spec["dtype"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                mask = torch.rand(m.weight.shape, generator=gen) < spec["density"]
                rows = torch.rand(m.weight.shape[0], generator=gen) < spec["empty_rows"]
                cols = torch.rand(m.weight.shape[1], generator=gen) < spec["empty_cols"]
                mask[rows] = False
                mask[:, cols] = False
                m.weight.mul_(mask.to(m.weight.dtype))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.normal_(generator=gen)
                m.bias.normal_(generator=gen)
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    x = x.to(spec["dtype"])
    x2 = torch.randn(x.shape, generator=gen).to(spec["dtype"])
    return model, x, x2


def assert_as_accurate(
    got: torch.Tensor, masked: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """``got`` is no further from ``exact`` (the masked model in float64) than the masked model
    in ``dtype`` is, plus ``TOL`` of the output's scale."""
    got, masked, exact = got.detach().double(), masked.detach().double(), exact.detach()
    scale = max(float(exact.abs().max()), 1e-30)
    err = float((got - exact).abs().max())
    own = float((masked - exact).abs().max())
    assert err <= TOL[dtype] * scale + own, (
        f"{what}: error {err:.3g} (masked {own:.3g}), scale {scale:.3g}"
    )


@settings(deadline=None)
@given(networks())
def test_compact_equals_masked_model(spec: dict) -> None:
    """Against the masked model computed in float64. In float32 the masked model's own rounding
    can exceed 1e-5 of the output (training-mode batch norm of a channel that is constant, or
    nearly so, amplifies the rounding of ``value - batch mean`` by up to ``1 / sqrt(eps)``); the
    compact model must be as accurate, to 1e-5."""
    model, x, x2 = _build(spec)
    exact = copy.deepcopy(model).double()
    small, report = compact(model, x, padded_constants=spec["padded_constants"])
    dtype = spec["dtype"]
    assert report.max_abs_difference is not None
    for step, mode in enumerate(["train", "train", "eval"]):
        for m in (model, exact, small):
            m.train(mode == "train")
        xs = x2 + step
        got, masked, want = small(xs), model(xs), exact(xs.double())
        assert_as_accurate(got, masked, want, dtype, f"{mode} step {step}")
    # training-mode steps moved the running statistics (of removed channels too) the same way
    for m in (model, exact, small):
        m.eval()
    assert_as_accurate(small(x), model(x), exact(x.double()), dtype, "eval after training steps")


def test_models_of_the_training_job_compact_exactly() -> None:
    """LeNet-300-100, LeNet-5, VGG and WRN with a third of each layer's units emptied."""
    for name in ["lenet300", "lenet5", "vgg", "wrn"]:
        torch.manual_seed(0)
        model = build_model(name)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    keep = torch.rand_like(m.weight) < 0.1
                    keep[: m.weight.shape[0] // 3] = False
                    m.weight.mul_(keep)
                if isinstance(m, nn.BatchNorm2d):
                    m.bias.normal_()
                    m.running_mean.normal_()
        x = torch.randn(2, 1, 28, 28)
        small, report = compact(model, x)
        assert report.units_removed > report.units // 4, name
        for mode in (True, False):
            model.train(mode)
            small.train(mode)
            assert_same(small(x), model(x), torch.float32, f"{name} training={mode}")


def _lenet300(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return LeNet300100(), torch.randn(16, 1, 28, 28)


def test_masks_come_from_attach_and_the_model_is_left_untouched() -> None:
    model, x = _lenet300()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = sct.attach(model, opt, density=0.05, update_every=5, total_steps=40)
    y = torch.randint(0, 10, (16,))
    for _ in range(12):  # two mask updates
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert len(sparse.history) == 2
    mask = sparse.mask("fc1.weight")
    with torch.no_grad():  # an active unit whose weights are exactly 0 adds nothing: it goes
        row = int(mask.any(dim=1).nonzero()[0])
        model.fc1.weight[row] = 0.0
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    small, report = compact(sparse, x)
    _, report_too = compact(model, x)  # the model finds its handle itself
    assert report.layers == report_too.layers
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(
        (p.grad is None and grads[n] is None) or torch.equal(p.grad, grads[n])
        for n, p in model.named_parameters()
    )
    empty_rows = int((~mask.any(dim=1)).sum()) + 1
    assert report.layer("fc1").empty == empty_rows
    assert report.layer("fc1").kept_out + empty_rows + report.layer("fc1").unread == 300
    assert "active in attach()'s masks" in report.table()
    assert type(small).__name__ == "CompactLeNet300100"
    assert small.fc1.weight.shape == (report.layer("fc1").kept_out, 784)
    assert small.fc2.weight.shape[1] == report.layer("fc1").kept_out
    small.eval()
    model.eval()
    assert_same(small(x), model(x), torch.float32, "attached LeNet-300-100")
    opt.step()  # the run goes on after compaction
    sparse.detach()
    with pytest.raises(SparseCoreError, match="detached"):
        compact(sparse, x)


def test_compact_model_fine_tunes_and_saves(tmp_path) -> None:
    spec = {
        "in_channels": 2,
        "size": 8,
        "convs": [
            {"out": 6, "groups": 1, "kernel": 3, "stride": 1, "padding": 1,
             "padding_mode": "zeros", "bias": False, "bn": True, "relu": True, "pool": True},
        ],
        "residual": "pad",
        "hidden": [8],
        "bn1d": True,
        "seed": 3,
        "density": 0.3,
        "empty_rows": 0.5,
        "empty_cols": 0.0,
        "dtype": torch.float32,
        "batch": 4,
        "padded_constants": "fold",
    }  # fmt: skip
    model, x, _ = _build(spec)
    small, report = compact(model, x)
    assert report.units_removed > 0
    assert {n for n, _ in small.named_buffers() if n.startswith("constants.")}, "no folds"
    assert not any(n.startswith("constants.") for n, _ in small.named_parameters())
    small.train()
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    target = torch.randn(4, 3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(small(x), target)
        loss.backward()
        losses.append(loss.item())
        assert all(p.grad is not None for p in small.parameters())
        opt.step()
    assert losses[-1] < losses[0]
    path = tmp_path / "small.pt"
    torch.save(small, path)
    again = torch.load(path, weights_only=False)
    small.eval()
    again.eval()
    assert torch.equal(again(x), small(x))


def test_any_image_size_with_per_position_bias_maps() -> None:
    """A fully convolutional model: the compact one takes other image sizes too (the bias map of
    a zero-padded convolution is computed for the input it gets)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    with torch.no_grad():
        model[0].weight[:4] = 0  # four empty filters: constants entering a padded convolution
        model[1].bias.normal_()
    small, report = compact(model, torch.randn(2, 3, 8, 8))
    assert report.layer("3").folded == 4
    for size in (8, 11, 5):
        x = torch.randn(3, 3, size, size)
        for mode in (True, False):
            model.train(mode)
            small.train(mode)
            assert_same(small(x), model(x), torch.float32, f"size {size} training={mode}")


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(8 * 9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = torch.cat([y, F.dropout(y, 0.5, self.training)], dim=1)  # not analysed: kept whole
        return self.fc(y.view(y.size(0), -1))


def test_unknown_operations_are_kept_whole_and_functional_dropout_follows_the_mode() -> None:
    torch.manual_seed(0)
    model = _Branchy()
    with torch.no_grad():
        model.conv.weight[1] = 0
        model.fc.weight[:, :9] = 0  # channel 0 unread: still computed, torch.cat needs it
    model.train()  # traced in training mode: F.dropout's training=True is frozen by the trace
    x = torch.randn(5, 2, 3, 3)
    small, report = compact(model, x)
    assert "cat" in report.table()
    assert report.layer("conv").removed_out == 0
    model.eval()
    small.eval()
    assert_same(small(x), model(x), torch.float32, "evaluation after a training-mode trace")


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class _ModeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 2 if self.training else self.fc(x)


def test_bad_input_is_refused_with_a_clear_error() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(SparseCoreError, match="torch.fx"):
        compact(_Untraceable(), x)
    with pytest.raises(SparseCoreError, match="self.training"):
        compact(_ModeBranch().train(), x)  # traced in training mode, checked in evaluation
    with pytest.raises(SparseCoreError, match="nn.Module"):
        compact("model", x)
    with pytest.raises(SparseCoreError, match="example_input"):
        compact(nn.Linear(4, 2), [1.0, 2.0])
    with pytest.raises(SparseCoreError, match="padded_constants"):
        compact(nn.Linear(4, 2), x, padded_constants="maybe")


def test_count_flops_counts_the_compact_network() -> None:
    """Cross-layer removals in the FLOP estimate: fc1 keeps only the units fc2 reads and that
    have weights; fc2's input loses fc1's empty units (folded) and unread ones."""
    from sparsecore.torch.flops import count_flops

    model, x = _lenet300()
    with torch.no_grad():
        model.fc1.weight[:100] = 0  # empty units: constant relu(bias), folded into fc2
        model.fc2.weight[:, 200:] = 0  # units 200-299 unread
    flops = count_flops(model, x)
    layers = {layer.name: layer for layer in flops.layers}
    batch = 16
    assert layers["fc1"].compact_forward == 2 * batch * 100 * 784
    assert layers["fc2"].compact_forward == 2 * batch * 100 * 100
    assert layers["fc3"].compact_forward == 2 * batch * 10 * 100
    assert layers["fc3"].compact_backward == 2 * layers["fc3"].compact_forward
    plan, _ = compaction_plan(model, x)
    assert plan["fc1"].layout.tolist() == list(range(100, 200))


class _ManyOps(nn.Module):
    """Every kind of operation the trace recognises, around layers with empty units."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.PReLU()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)  # counts the padding: not constant
        self.drop = nn.Dropout(p=0.0)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.fc1 = nn.Linear(6 * 4 * 4, 10)
        self.bn1 = nn.BatchNorm1d(10)
        self.fc2 = nn.Linear(10 + 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.act1(self.c1(x)), 0.1)
        y = self.bn(self.c2(y)).relu_()
        y = self.drop(self.pool(y * 2.0) + 1.0)
        y = F.gelu(self.c3(F.avg_pool2d(y, 3, 2, 1, count_include_pad=False)))
        y = F.interpolate(y, scale_factor=1.0)
        pooled = y.mean((2, 3))
        flat = torch.relu(self.bn1(self.fc1(y.view(y.shape[0], -1))))
        return self.fc2(torch.cat([flat, pooled], dim=1))


def test_many_operations_compact_exactly() -> None:
    torch.manual_seed(4)
    model = _ManyOps()
    with torch.no_grad():
        model.c1.weight[:3] = 0  # empty filters: PReLU, leaky ReLU of their bias
        model.c2.weight[:, 5:] = 0  # unread channels of c1
        model.c3.weight[:2] = 0
        model.fc1.weight[:4] = 0
        model.bn.running_mean.normal_()
    x = torch.randn(4, 3, 8, 8)
    small, report = compact(model, x)
    assert report.layer("c1").removed_out == 6  # 3 empty (folded into c2) + 3 unread
    assert report.layer("c2").folded == 3
    # fc1's empty units reach torch.cat, which is not analysed: computed (their bias), not removed
    assert report.layer("fc1").removed_out == 0 and report.layer("fc1").added == 4
    assert "kept whole (not analysed): cat" in report.table()
    assert not any(p.requires_grad for n, p in small.named_parameters() if "constants" in n)
    for mode in (True, False, True, False):
        model.train(mode)
        small.train(mode)
        assert_same(small(x), model(x), torch.float32, f"training={mode}")


class _ViewFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.fc = nn.Linear(6 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x)).contiguous()
        y = y.view(y.shape[0], -1)  # reads the batch size only: no channel needed
        return self.fc(y.reshape(y.size(0), y.dim() * 12).to(y.dtype))


def test_batch_size_queries_need_no_channel() -> None:
    torch.manual_seed(0)
    model = _ViewFlatten()
    with torch.no_grad():
        model.conv.weight[:2] = 0
    x = torch.randn(3, 2, 4, 4)
    small, report = compact(model, x)
    assert report.layer("conv").removed_out == 2 and report.layer("fc").folded == 8
    x = torch.randn(5, 2, 4, 4)
    assert_same(small(x), model(x), torch.float32, "another batch size")
