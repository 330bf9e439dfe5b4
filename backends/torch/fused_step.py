"""The SGD step of sparse CPU parameters fused with their re-masking, bit for bit as ``torch.optim.SGD``.

Why: after every optimizer step the weights outside the mask must be exactly 0 again. Done as a
separate in-place multiply, that is one more pass over every sparse weight and its 0/1 mask after
SGD's own three passes (``buf *= momentum``, ``buf += grad``, ``param -= lr * buf``). On a small
CPU model the extra pass costs several percent of a training step (benchmarks/overhead_torch.py).
Here one Numba loop reads each weight, gradient, momentum and mask entry once and writes weight
and momentum once: less memory traffic than SGD alone, masking included.

Exactness: the loop computes what ``torch.optim.SGD`` computes, in the same order and with the
same roundings. PyTorch's CPU ``add(x, alpha=a)`` is one fused multiply-add with ``a`` rounded to
the parameter's dtype (checked by the tests for every length, tails included), and the loop uses
the same fused multiply-add (LLVM's ``llvm.fma``, exact on any CPU). The weights and momentum
buffers that come out equal those of SGD followed by masking, bit for bit, except that an
inactive weight is always +0 (the multiply leaves -0 where the step had made it negative).
Because the loop writes 0 outside the mask whatever the weight held, a weight changed behind the
library's back (``param.data.copy_(...)``) is cleaned on the next step, as with the multiply.

When it applies (everything else takes the plain path: SGD's own step, then the multiply):
``type(optimizer) is torch.optim.SGD`` (a subclass may change the step), a parameter on the CPU
in float32 or float64 with a dense contiguous gradient of its dtype and no momentum buffer yet or
one of its own dtype and layout (the loop writes it through a pointer), a group with a float
learning rate, ``maximize=False``, ``differentiable=False`` and no ``fused`` kernel, and a step
called without a closure (a closure recomputes the gradients inside the step).

How: a step pre-hook takes the gradients of those parameters and sets ``param.grad = None``, so
SGD skips them (it skips every parameter without a gradient); the post-hook runs the fused loop,
stores the momentum buffer in ``optimizer.state[param]`` exactly where SGD keeps it, and puts the
gradients back. Optimizer checkpoints, learning-rate schedulers and ``GradScaler`` see an
ordinary SGD.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

_FLOATS = (torch.float32, torch.float64)


def optimizer_fusable(optimizer: Any) -> bool:
    """Whether ``optimizer``'s steps can be taken over for sparse parameters (see module doc)."""
    return type(optimizer) is torch.optim.SGD and available()


_AVAILABLE: bool | None = None


def available() -> bool:
    """Whether the fused loop can run here (checked once per process).

    Numba must import and compile it, and a self-check must find that PyTorch's own SGD step
    rounds as the loop does: PyTorch's CPU kernels compute ``x + alpha * y`` as one fused
    multiply-add wherever the CPU has one (x86 with AVX2 or AVX-512, ARM), which is what the loop
    reproduces; on a CPU without, they would round twice. Where either fails, steps take the
    plain path and a warning says why, once.
    """
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            _kernels()
            problem = _self_check()
        except Exception as err:  # ImportError, or any failure of Numba itself
            problem = f"{type(err).__name__}: {err}"
        _AVAILABLE = problem is None
        if problem is not None:
            warnings.warn(
                f"sparsecore.torch: the fused SGD + re-masking step is off ({problem}); SGD "
                f"steps are followed by a separate re-masking multiply instead",
                RuntimeWarning,
                stacklevel=2,
            )
    return _AVAILABLE


def _self_check() -> str | None:
    """None if the loop matches PyTorch's SGD arithmetic + masking bit for bit on random data
    (every option in use at once, float32 and float64), else what differs.

    The reference is the sequence of tensor operations ``torch.optim.SGD`` runs on a CPU tensor,
    written out here rather than run through an optimizer, so that no optimizer hook fires.
    """
    gen = torch.Generator().manual_seed(0)
    lr, momentum, weight_decay, dampening = 0.0371, 0.9, 0.01, 0.1
    group = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening)
    for dtype in _FLOATS:
        mask = torch.rand(67, generator=gen) < 0.5
        ref = torch.randn(67, generator=gen, dtype=dtype) * mask
        mine, state = ref.clone(), dict[str, Any]()
        buf: torch.Tensor | None = None
        for _ in range(2):
            grad = torch.randn(67, generator=gen, dtype=dtype)
            d = grad.add(ref, alpha=weight_decay)
            if buf is None:
                buf = d.clone()
            else:
                buf.mul_(momentum).add_(d, alpha=1 - dampening)
            ref.add_(buf, alpha=-lr).mul_(mask)
            masked_sgd_step(mine, grad, mask, state, group)
        assert buf is not None
        if not (torch.equal(mine, ref) and torch.equal(state["momentum_buffer"], buf)):
            return f"PyTorch's {dtype} SGD arithmetic rounds differently on this CPU"
    return None


def group_fusable(group: dict[str, Any]) -> bool:
    """Whether a parameter group's SGD options are ones the fused loop reproduces exactly."""
    return (
        isinstance(group.get("lr"), (float, int))
        and not group.get("maximize", False)
        and not group.get("differentiable", False)
        and not group.get("fused", False)
        and isinstance(group.get("momentum", 0.0), (float, int))
        and isinstance(group.get("weight_decay", 0.0), (float, int))
        and isinstance(group.get("dampening", 0.0), (float, int))
    )


def param_fusable(param: torch.Tensor) -> bool:
    """Whether this parameter and its current gradient can take the fused step now.

    Runs for every sparse parameter at every step, so it reads the cheapest attributes
    (``is_cpu`` rather than ``device.type``; dtypes are singletons, so ``is`` compares them).
    """
    grad = param.grad
    return (
        grad is not None
        and param.is_cpu
        and param.dtype in _FLOATS
        and param.is_contiguous()
        and _laid_out_like(grad, param)
    )


def buffer_fusable(buf: torch.Tensor | None, param: torch.Tensor) -> bool:
    """Whether SGD's ``momentum_buffer`` of ``param`` can be written by the loop: none yet, or a
    tensor laid out like the parameter (the loop writes it through a pointer, so anything
    else, say a buffer cast to another dtype, takes the plain path)."""
    return buf is None or _laid_out_like(buf, param)


def _laid_out_like(t: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether the loop can read or write ``t`` element for element with ``param`` (a contiguous
    CPU parameter): a dense contiguous CPU tensor of its dtype and shape."""
    return (
        t.is_cpu
        and t.dtype is param.dtype
        and t.layout == torch.strided
        and t.is_contiguous()
        and t.shape == param.shape
    )


class GroupPlan(NamedTuple):
    """A parameter group's SGD options as the loop takes them (read once per step)."""

    neg_lr: float
    weight_decay: float
    momentum: float
    damp1: float  # 1 - dampening
    flags: int  # MOMENTUM, NESTEROV, WEIGHT_DECAY


def plan_group(group: dict[str, Any]) -> GroupPlan:
    """The loop's view of a group that :func:`group_fusable` accepted."""
    k = _kernels()
    momentum = float(group.get("momentum", 0.0))
    weight_decay = float(group.get("weight_decay", 0.0))
    flags = 0
    if momentum != 0.0:
        flags |= k.MOMENTUM
        if group.get("nesterov", False):
            flags |= k.NESTEROV
    if weight_decay != 0.0:
        flags |= k.WEIGHT_DECAY
    damp1 = 1.0 - float(group.get("dampening", 0.0))
    return GroupPlan(-float(group["lr"]), weight_decay, momentum, damp1, flags)


class ParamPlan(NamedTuple):
    """What stays the same for one parameter from step to step: its loop, pointers and own
    momentum coefficient. Valid while the parameter, mask and own tensors are these ones."""

    param: torch.Tensor
    mask: torch.Tensor
    own: torch.Tensor | None
    loop: Any
    p_ptr: int
    mask_ptr: int
    n: int
    own_ptr: int
    own_coeff: float
    own_flags: int

    def valid_for(self, param: torch.Tensor, mask: torch.Tensor, own: torch.Tensor | None) -> bool:
        """Whether the plan still describes these tensors (``param.data`` may have been
        replaced since, which moves its memory)."""
        return (
            self.param is param
            and self.mask is mask
            and self.own is own
            and self.p_ptr == param.data_ptr()
            and self.n == param.numel()
        )


def plan_param(
    param: torch.Tensor,
    mask: torch.Tensor,
    own: torch.Tensor | None = None,
    own_weight: float = 0.0,
) -> ParamPlan:
    """The plan of ``param`` (see :func:`masked_sgd_step` for the arguments)."""
    k = _kernels()
    own_coeff, own_flags = 0.0, 0
    if own is not None:
        # torch.lerp rounds the weight to the dtype, then uses w (|w| < 0.5) or w - 1, which is
        # exact in that dtype for w in [0.5, 2] (Sterbenz), so computing it in double is too
        w = float(np.float32(own_weight)) if param.dtype == torch.float32 else float(own_weight)
        small = abs(w) < 0.5
        own_coeff = w if small else w - 1.0
        own_flags = k.OWN | (k.SMALL_OWN_WEIGHT if small else 0)
    p_ptr = param.data_ptr()
    return ParamPlan(
        param,
        mask,
        own,
        k.MASKED_SGD_FLOAT32 if param.dtype == torch.float32 else k.MASKED_SGD_FLOAT64,
        p_ptr,
        mask.data_ptr(),
        param.numel(),
        p_ptr if own is None else own.data_ptr(),
        own_coeff,
        own_flags,
    )


def run_planned(
    plan: ParamPlan, group: GroupPlan, grad: torch.Tensor, state: dict[str, Any]
) -> None:
    """One fused step of ``plan``'s parameter with gradient ``grad`` (see
    :func:`masked_sgd_step`); ``state`` is ``optimizer.state[param]``."""
    flags = group.flags | plan.own_flags
    b_ptr = plan.p_ptr  # not read without momentum
    if group.momentum != 0.0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = torch.empty_like(plan.param, memory_format=torch.contiguous_format)
            state["momentum_buffer"] = buf
            flags |= _kernels().FIRST
        b_ptr = buf.data_ptr()
    plan.loop(
        plan.p_ptr,
        grad.data_ptr(),
        b_ptr,
        plan.mask_ptr,
        plan.n,
        group.neg_lr,
        group.weight_decay,
        group.momentum,
        group.damp1,
        plan.own_ptr,
        plan.own_coeff,
        flags,
    )


def masked_sgd_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    own: torch.Tensor | None = None,
    own_weight: float = 0.0,
) -> None:
    """One SGD step of ``param`` with gradient ``grad``, then weights outside ``mask`` set to +0.

    ``state`` is ``optimizer.state[param]``: its ``momentum_buffer`` is created on the first step
    (a copy of the gradient, weight decay included, as SGD does) and updated in place after.
    ``own``: the library's own gradient average of ``param`` (same dtype), folded in the same
    loop as ``torch.lerp(own, grad, own_weight)`` computes it, bit for bit.
    The caller guarantees what :func:`param_fusable` checks; ``mask`` is a contiguous boolean
    tensor of ``param``'s shape on the CPU. Training loops keep the plans between steps instead
    (:func:`plan_param`, :func:`plan_group`, :func:`run_planned`): this call builds both each time.
    """
    run_planned(plan_param(param, mask, own, own_weight), plan_group(group), grad, state)


_KERNELS: Any = None


def _kernels() -> Any:
    """The compiled loops (:mod:`sparsecore.torch.fused_step_kernels`), imported on first use so
    that Numba is loaded only when a fused step runs.

    They are C callables (``numba.cfunc``) called through ctypes with the tensors' data
    pointers: a call costs about a microsecond, where a jitted function's dispatcher spends
    several checking a dozen arguments, which on a small model is as long as the loop itself.
    """
    global _KERNELS
    if _KERNELS is None:
        from . import fused_step_kernels

        _KERNELS = fused_step_kernels
    return _KERNELS
