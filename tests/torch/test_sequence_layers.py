"""Recurrent and attention layers: which of their weights are sparse, along which axis their
output units lie (one per gate row), and the guarantees of every sparse layer: exact density,
zeros outside the mask, the same update as the NumPy reference, resume equal to uninterrupted."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore
import sparsecore.torch as st
from sparsecore.torch.lm_models import LSTMLM, GPTMini

# Layers this small at these densities leave gate rows without weights: dead units, warned about.
pytestmark = pytest.mark.filterwarnings("ignore::sparsecore.DeadUnitsWarning")


class Seq(nn.Module):
    """An embedding, a 2-layer bidirectional projected LSTM, a GRU, attention, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.lstm = nn.LSTM(6, 5, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
        self.gru = nn.GRU(6, 4, batch_first=True)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(10, 12)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        a, _ = self.lstm(x)
        g, _ = self.gru(x)
        h, _ = self.attn(g, g, g, need_weights=False)
        return self.head(torch.cat([a, self.norm(h + g)], dim=-1))


LSTM_WEIGHTS = [
    f"lstm.weight_{kind}_l{layer}{suffix}"
    for layer in range(2)
    for suffix in ("", "_reverse")
    for kind in ("ih", "hh", "hr")
]


def _names(sparse) -> list[str]:
    names = list(sparse.names)
    sparse.detach()
    return names


def test_recurrent_weights_are_dense_unless_included_and_then_all_of_them():
    model = Seq()
    assert _names(st.attach(model, density=0.5, total_steps=10)) == [
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "head.weight",
    ]
    sparse = st.attach(model, density=0.5, total_steps=10, include=[nn.LSTM, nn.GRU])
    assert sparse.names == [
        *LSTM_WEIGHTS,
        "gru.weight_ih_l0",
        "gru.weight_hh_l0",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "head.weight",
    ]
    assert all(t.axis == 0 for t in sparse.targets)
    sparse.detach()
    # by name pattern, one direction only; biases are never selected by a type
    names = _names(st.attach(model, density=0.5, total_steps=10, include="lstm.weight_*_l1"))
    assert names[:3] == ["lstm.weight_ih_l1", "lstm.weight_hh_l1", "lstm.weight_hr_l1"]
    names = _names(st.attach(model, density=0.5, total_steps=10, include=nn.LSTM))
    assert not any("bias" in n for n in names)
    names = _names(
        st.attach(model, density=0.5, total_steps=10, include=nn.Embedding, exclude="attn.*")
    )
    assert names == ["emb.weight", "head.weight"]


def test_transformer_layers_are_sparse_in_every_projection_norms_and_biases_dense():
    enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    assert _names(st.attach(enc, density=0.3, total_steps=10)) == [
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]
    dec = nn.TransformerDecoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    assert _names(st.attach(dec, density=0.3, total_steps=10)) == [
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "multihead_attn.in_proj_weight",
        "multihead_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]
    # key and value sizes other than the embedding's: three separate projections
    cross = nn.MultiheadAttention(8, 2, kdim=5, vdim=3)
    assert _names(st.attach(cross, density=0.3, total_steps=10)) == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "out_proj.weight",
    ]


def test_gpt_style_blocks_of_linear_layers_with_a_tied_head():
    model = GPTMini(num_classes=20, width=16, blocks=2, heads=2, context=8)
    sparse = st.attach(model, density=0.2, total_steps=10)
    parts = ("attn.qkv", "attn.proj", "fc", "out")
    assert sparse.names == [f"blocks.{i}.{p}.weight" for i in range(2) for p in parts]
    sparse.detach()
    sparse = st.attach(model, density=0.2, total_steps=10, include="tokens.weight")
    assert set(sparse.targets[0].aliases) == {"tokens.weight", "head.weight"}
    assert len(sparse.names) == 9  # the tied pair is one layer with one mask
    sparse.detach()


def _sequence_data(steps: int, vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 9), generator=g) for _ in range(steps)]


def _lm_step(model, opt, tokens) -> None:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("growth", ["momentum", "momentum_neuron"])
def test_exact_density_and_zeros_while_training_with_gate_units(growth):
    torch.manual_seed(0)
    model = Seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(
        model, opt, density=0.15, update_every=3, total_steps=12, growth=growth,
        include=[nn.LSTM, nn.GRU], init="ER",
    )  # fmt: skip
    target = sparse.engine.target
    for tokens in _sequence_data(12, 12):
        _lm_step(model, opt, tokens)
        assert sum(int(m.sum()) for m in sparse.masks) == target
        for t in sparse.targets:
            assert (t.param.detach()[~sparse.mask(t.name)] == 0).all(), t.name
    assert len(sparse.history) == 3
    assert sum(r.pruned for r in sparse.history[-1].layers) > 0
    # every gate row is an output unit: 4 gates x hidden for the LSTM, 3 for the GRU, 3 x
    # embed for attention's stacked input projection
    units = {r.name: r.units for r in sparse.history[-1].layers}
    assert units["lstm.weight_ih_l0"] == 4 * 5 and units["lstm.weight_hr_l0"] == 3
    assert units["gru.weight_hh_l0"] == 3 * 4 and units["attn.in_proj_weight"] == 3 * 4
    assert model.lstm.bias_ih_l0.count_nonzero() == model.lstm.bias_ih_l0.numel()


def test_er_densities_read_the_fan_in_of_each_recurrent_matrix():
    model = LSTMLM(num_classes=30, embed=8, hidden=16, layers=1)
    sparse = st.attach(model, density=0.2, total_steps=10, include=nn.LSTM, init="ER")
    shapes = {t.name: tuple(t.param.shape) for t in sparse.targets}
    assert shapes == {
        "rnn.weight_ih_l0": (64, 8),
        "rnn.weight_hh_l0": (64, 16),
        "decoder.weight": (30, 16),
    }
    dens = sparse.layer_densities()
    er = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}  # (in + out)/(in * out)
    ratio = dens["rnn.weight_ih_l0"] / er["rnn.weight_ih_l0"]
    for name in shapes:
        assert dens[name] == pytest.approx(ratio * er[name], rel=0.02)


def test_gate_unit_growth_equals_the_numpy_reference_along_axis_0():
    torch.manual_seed(0)
    model = Seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = st.attach(
        model, opt, density=0.3, update_every=1000, total_steps=2000, growth="momentum_neuron",
        include=[nn.LSTM, nn.GRU], update_backend="torch",
    )  # fmt: skip
    for tokens in _sequence_data(3, 12):
        _lm_step(model, opt, tokens)
    layers = [
        sparsecore.Layer(
            t.name,
            t.param.detach().numpy().copy(),
            sparse.mask(t.name).numpy().copy(),
            opt.state[t.param]["momentum_buffer"].numpy().copy(),
            axis=t.axis,
        )
        for t in sparse.targets
    ]
    expected = sparsecore.update(
        layers, prune_rate=sparse.engine.prune_rate(sparse.steps), update_index=1, seed=0,
        growth="momentum_neuron", revive_dead_units=sparse.config.revive_dead_units,
    )  # fmt: skip
    sparse._update(sparse.steps)
    for t, want in zip(sparse.targets, expected.masks):
        np.testing.assert_array_equal(sparse.mask(t.name).numpy(), want, err_msg=t.name)


def _run_lm(model_fn, steps: int, include, stop: int | None = None):
    torch.manual_seed(0)
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    options = dict(density=0.2, update_every=2, total_steps=steps, include=include)
    sparse = st.attach(model, opt, **options)
    data = _sequence_data(steps, 20, seed=3)
    for i, tokens in enumerate(data):
        if stop is not None and i == stop:  # save, rebuild everything, load, go on
            buffer = io.BytesIO()
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sparse": sparse.state_dict(),
                },
                buffer,
            )
            sparse.detach()
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            torch.manual_seed(123)  # other initial weights: all must come from the checkpoint
            model = model_fn()
            opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True)
            sparse = st.attach(model, opt, **options)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            sparse.load_state_dict(saved["sparse"])
        _lm_step(model, opt, tokens)
    return model, sparse


@pytest.mark.parametrize(
    "model_fn,include",
    [
        (lambda: LSTMLM(num_classes=20, embed=8, hidden=12, layers=2), [nn.LSTM]),
        (lambda: GPTMini(num_classes=20, width=16, blocks=2, heads=2, context=8), None),
        (
            lambda: nn.Sequential(
                nn.Embedding(20, 16),
                nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                nn.Linear(16, 20),
            ),
            None,
        ),
    ],
    ids=["lstm", "gpt", "transformer-encoder"],
)
def test_resume_equals_uninterrupted(model_fn, include):
    whole, a = _run_lm(model_fn, 9, include)
    resumed, b = _run_lm(model_fn, 9, include, stop=5)
    assert a.names == b.names and len(a.history) == len(b.history) == 4
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    for ma, mb in zip(a.masks, b.masks):
        assert torch.equal(ma, mb)
    assert [r.to_dict() for r in a.history] == [r.to_dict() for r in b.history]
    assert copy.deepcopy(a.density()) == pytest.approx(0.2, abs=1e-3)
