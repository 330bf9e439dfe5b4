"""Where each sparse parameter's momentum comes from (ALGORITHM.md, "Momentum source").

- SGD (or RMSprop) with ``momentum > 0`` in the parameter's group: ``state['momentum_buffer']``.
- Adam family (a group with ``betas``): ``state['exp_avg']`` by default, or the reference's
  ``exp_avg / (sqrt(exp_avg_sq) + eps)`` with ``adam_momentum='normalized'``.
- Anything else, or no optimizer: the library's own exponential moving average of the gradient,
  ``P <- beta * P + (1 - beta) * g``, folded in once per optimizer step, kept in float32 for half
  precision parameters (a float16 average of small gradients would underflow). The Keras callback
  gives the same answer for optimizers without momentum.

:func:`describe` names the source in words; ``attach`` logs it once (logger ``sparsecore``, level
INFO) and the handle's ``momentum_source`` reads it.

The optimizer's buffers are read as they are: never masked, so momentum at inactive positions
keeps accumulating, which is what regrowth needs.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsecore.errors import SparseCoreError

SGD, ADAM, ADAM_NORMALIZED, OWN = "momentum_buffer", "exp_avg", "normalized", "own"


def group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, Any] | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def momentum_kind(group: dict[str, Any] | None, adam_momentum: str, optimizer: Any = None) -> str:
    """How the momentum of a parameter in optimizer ``group`` (None: no optimizer) is read.

    ``normalized`` applies to the Adam family that keeps a second moment (``exp_avg_sq``);
    Adamax keeps an infinity norm instead, so its first moment is read as it is."""
    if group is None:
        return OWN
    if "betas" in group:
        normalizes = adam_momentum == "normalized" and not isinstance(optimizer, torch.optim.Adamax)
        return ADAM_NORMALIZED if normalizes else ADAM
    if float(group.get("momentum", 0.0) or 0.0) > 0.0:
        return SGD
    return OWN


def momentum_beta(group: dict[str, Any] | None, kind: str, own_beta: float) -> float:
    """The decay of the momentum in use: it sets the dense-gradient window of sparse kernels."""
    if kind == SGD and group is not None:
        return float(group["momentum"])
    if kind in (ADAM, ADAM_NORMALIZED) and group is not None:
        return float(group["betas"][0])
    return own_beta


def describe(kinds: list[str], optimizer: torch.optim.Optimizer | None, beta: float) -> str:
    """The momentum source of a run in words (one phrase per distinct source, with the number
    of sparse layers it serves when they differ)."""
    name = None if optimizer is None else type(optimizer).__name__
    phrases = {
        SGD: f"{name}'s momentum buffer (momentum_buffer)",
        ADAM: f"{name}'s first moment (exp_avg)",
        ADAM_NORMALIZED: f"{name}'s exp_avg / (sqrt(exp_avg_sq) + eps)",
        OWN: f"the library's own gradient average (beta {beta:g}): "
        + ("no optimizer given" if name is None else f"{name} keeps no momentum"),
    }
    distinct = list(dict.fromkeys(kinds))
    if len(distinct) == 1:
        return phrases[distinct[0]]
    return "; ".join(
        f"{phrases[k]} for {kinds.count(k)} of {len(kinds)} sparse layers" for k in distinct
    )


def own_buffer(param: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype
    return torch.zeros(param.shape, dtype=dtype, device=param.device)


def read_momentum(
    name: str,
    param: torch.Tensor,
    kind: str,
    optimizer: torch.optim.Optimizer | None,
    own: torch.Tensor | None,
) -> torch.Tensor:
    """The momentum tensor of ``param`` (zeros if the optimizer has no state for it yet)."""
    if kind == OWN:
        assert own is not None
        return own
    assert optimizer is not None
    state = optimizer.state.get(param, {})
    if kind == SGD:
        buf = state.get("momentum_buffer")
        return torch.zeros_like(param) if buf is None else buf
    if "exp_avg" not in state:
        return torch.zeros_like(param)
    if kind == ADAM:
        return state["exp_avg"]
    if "exp_avg_sq" not in state:
        raise SparseCoreError(
            f"parameter {name!r}: adam_momentum='normalized' needs exp_avg_sq in the state of "
            f"{type(optimizer).__name__}, which keeps {sorted(state)}"
        )
    eps = next(
        (
            float(g.get("eps", 1e-8))
            for g in optimizer.param_groups
            if any(p is param for p in g["params"])
        ),
        1e-8,
    )
    exp_avg = state["exp_avg"].float()
    return exp_avg / (state["exp_avg_sq"].float().sqrt() + eps)
