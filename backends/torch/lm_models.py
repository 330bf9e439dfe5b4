"""Character-level language models for ``sparsecore train --model lstm-lm | gpt-mini``.

Plain ``nn.Module`` subclasses with no sparsity inside them, like the image models: inputs are
token ids ``(batch, context)``, outputs logits ``(batch, context, vocab)``, each position
predicting the next character. Sized so that an epoch of the embedded text takes well under a
minute on two CPU cores:

* :class:`LSTMLM`: embedding 64, a 2-layer LSTM of 256 units, a linear decoder (about 0.9M
  weights, 0.8M of them in the LSTM);
* :class:`GPTMini`: a GPT-style decoder written with ``nn.Linear`` (pre-norm blocks, causal
  self-attention through one fused query/key/value projection, a 4x MLP), width 128, 4 blocks,
  4 heads, learned positions, output layer tied to the token embedding (about 0.8M weights).

Which weights the job makes sparse: every linear projection and, for the LSTM, every recurrent
weight (``weight_ih_l*``, ``weight_hh_l*``); embeddings, the tied output layer, norms and biases
stay dense (:data:`JOB_INCLUDE`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["JOB_INCLUDE", "LM_MODELS", "LSTMLM", "GPTMini"]


class LSTMLM(nn.Module):
    """Embedding -> multi-layer LSTM -> linear decoder over the vocabulary."""

    def __init__(
        self,
        num_classes: int = 97,
        embed: int = 64,
        hidden: int = 256,
        layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed)
        self.rnn = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True, dropout=dropout)
        self.decoder = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.decoder(out)


class _Attention(nn.Module):
    """Causal multi-head self-attention with one fused (3 * width, width) projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class GPTMini(nn.Module):
    """A small GPT: token + position embeddings, pre-norm blocks, tied output layer."""

    def __init__(
        self,
        num_classes: int = 97,
        width: int = 128,
        blocks: int = 4,
        heads: int = 4,
        context: int = 128,
    ) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(num_classes, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(_Block(width, heads) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes, bias=False)
        self.head.weight = self.tokens.weight  # tied: one matrix, dense as the embedding
        self.apply(self._init)
        for block in self.blocks.modules():  # GPT-2's scaled init of the residual projections
            if isinstance(block, _Block):
                for proj in (block.attn.proj, block.out):
                    nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * blocks))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"input of {t} tokens is longer than the context {self.context}")
        pos = torch.arange(t, device=tokens.device)
        x = self.tokens(tokens) + self.positions(pos)
        return self.head(self.norm(self.blocks(x)))


#: The language models of the job, by name.
LM_MODELS = {"lstm-lm": LSTMLM, "gpt-mini": GPTMini}

#: What the job makes sparse besides the default selection: the LSTM's recurrent weights.
JOB_INCLUDE: dict[str, list[type[nn.Module]]] = {"lstm-lm": [nn.LSTM], "gpt-mini": []}
