"""Layer types: Hugging Face GPT-2 blocks are sparse by default with the right output axis, the tied
embedding stays dense, and users declare their own layer types.

A tiny GPT-2 is built from a ``GPT2Config`` with random weights (nothing is downloaded).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import sparsecore
import sparsecore.torch as st
from sparsecore import SparseCoreError
from sparsecore.torch import selection

transformers = pytest.importorskip("transformers")

BLOCK = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _gpt2(layers: int = 2, embd: int = 16) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=12, n_embd=embd, n_layer=layers, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture
def registry():
    """Restore the layer-type registry after a test that registers types."""
    saved = list(selection._LAYER_TYPES)
    yield
    selection._LAYER_TYPES[:] = saved


def _train(model, sparse, opt, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 40, (4, 12), generator=g)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_gpt2_blocks_are_sparse_by_default_with_output_axis_1():
    model = _gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sparse = st.attach(
        model, opt, density=0.2, update_every=2, total_steps=8, growth="momentum_neuron"
    )
    expected = [f"transformer.h.{i}.{name}.weight" for i in range(2) for name in BLOCK]
    assert sparse.names == expected
    assert all(t.axis == 1 for t in sparse.targets)  # Conv1D stores (in, out)
    assert type(sparse.targets[0].module).__name__ == "Conv1D"
    # the embedding tied to the output layer is treated as an embedding: dense
    assert "transformer.wte.weight" not in sparse.names
    assert "transformer.wpe.weight" not in sparse.names
    _train(model, sparse, opt, 8)
    assert len(sparse.history) == 3
    assert sparse.density() == pytest.approx(0.2, abs=1e-4)
    for t in sparse.targets:
        assert (t.param.detach()[~sparse.mask(t.name)] == 0).all()
    assert all(
        r.units == t.param.shape[1] for r, t in zip(sparse.history[-1].layers, sparse.targets)
    )


def test_conv1d_growth_splits_over_its_output_units():
    """momentum_neuron on a Conv1D weight equals the NumPy update with axis 1, not axis 0."""
    model = _gpt2(layers=1, embd=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = st.attach(
        model, opt, density=0.3, update_every=1000, total_steps=2000, growth="momentum_neuron",
        update_backend="torch",
    )  # fmt: skip
    _train(model, sparse, opt, 3)
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
    kwargs = dict(prune_rate=sparse.engine.prune_rate(sparse.steps), update_index=1, seed=0,
                  growth="momentum_neuron",
                  revive_dead_units=sparse.config.revive_dead_units)  # fmt: skip
    by_axis_1 = sparsecore.update(layers, **kwargs)
    by_axis_0 = sparsecore.update(
        [sparsecore.Layer(x.name, x.weight, x.mask, x.momentum, axis=0) for x in layers], **kwargs
    )
    sparse._update(sparse.steps)
    got = [sparse.mask(t.name).numpy() for t in sparse.targets]
    for g, a in zip(got, by_axis_1.masks):
        np.testing.assert_array_equal(g, a)
    assert any(not np.array_equal(g, b) for g, b in zip(got, by_axis_0.masks))


def test_the_tied_embedding_is_sparse_when_included_with_one_mask():
    model = _gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sparse = st.attach(model, opt, density=0.2, total_steps=10, include=["transformer.wte.weight"])
    assert sparse.names[0] == "transformer.wte.weight"
    target = sparse.targets[0]
    assert set(target.aliases) == {"transformer.wte.weight", "lm_head.weight"}
    assert model.lm_head.weight is model.transformer.wte.weight
    assert target.axis == 0  # rows: one per token (the output layer's units)


def test_a_model_without_conv1d_never_imports_transformers():
    script = textwrap.dedent(
        """
        import sys, torch
        import sparsecore.torch as st
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        st.attach(model, density=0.5, total_steps=10)
        print("transformers" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class InOut(nn.Module):
    """A user's linear layer that stores its weight as (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_users_declare_the_output_axis_of_their_layer_types(registry):
    model = nn.Sequential(InOut(6, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(SparseCoreError, match="no parameter"):
        st.attach(nn.Sequential(InOut(6, 4)), density=0.5, total_steps=10)
    # included without a declaration: axis 0, as for any unknown module
    sparse = st.attach(model, density=0.5, total_steps=10, include=[InOut])
    assert [t.axis for t in sparse.targets] == [0, 0]
    sparse.detach()
    st.register_layer_type(InOut, axis=1)
    sparse = st.attach(model, density=0.5, total_steps=10)
    assert sparse.names == ["0.weight", "2.weight"] and [t.axis for t in sparse.targets] == [1, 0]
    sparse.detach()
    # by qualified name, declaring the axis only (dense unless included); replaces the entry
    st.register_layer_type(f"{__name__}.InOut", axis=1, sparse_by_default=False)
    st.register_layer_type(InOut, axis=1, sparse_by_default=False)
    sparse = st.attach(model, density=0.5, total_steps=10)
    assert sparse.names == ["2.weight"]
    sparse.detach()
    sparse = st.attach(model, density=0.5, total_steps=10, include=[InOut])
    assert [t.axis for t in sparse.targets] == [1, 0]
    sparse.detach()


def test_bad_layer_type_declarations(registry):
    with pytest.raises(SparseCoreError, match="nn.Module subclass"):
        st.register_layer_type(int, axis=0)  # type: ignore[arg-type]
    with pytest.raises(SparseCoreError, match="axis must be an integer"):
        st.register_layer_type(InOut, axis=1.0)  # type: ignore[arg-type]
    st.register_layer_type(InOut, axis=5)
    with pytest.raises(SparseCoreError, match="declares output axis 5, out of range"):
        st.attach(nn.Sequential(InOut(3, 2)), density=0.5, total_steps=10)
