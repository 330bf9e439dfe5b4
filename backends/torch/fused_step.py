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
in float32 or float64 with a dense contiguous gradient of its dtype, a group with a float
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
from typing import Any

import numpy as np
import torch

_FLOATS = (torch.float32, torch.float64)


def optimizer_fusable(optimizer: Any) -> bool:
    """Whether ``optimizer``'s steps can be taken over for sparse parameters (see module doc)."""
    return type(optimizer) is torch.optim.SGD and available()


_AVAILABLE: bool | None = None


def available() -> bool:
    """Whether the fused loop can run here: Numba imports and compiles it (checked once).

    Where it cannot (Numba not installed, or failing), steps take the plain path and a warning
    says why, once.
    """
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            _kernels()
            _AVAILABLE = True
        except Exception as err:  # ImportError, or any failure of Numba itself
            _AVAILABLE = False
            warnings.warn(
                f"sparsecore.torch: the fused SGD + re-masking step is off ({type(err).__name__}: "
                f"{err}); SGD steps are followed by a separate re-masking multiply instead",
                RuntimeWarning,
                stacklevel=2,
            )
    return _AVAILABLE


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
    """Whether this parameter and its current gradient can take the fused step now."""
    grad = param.grad
    return (
        param.device.type == "cpu"
        and param.dtype in _FLOATS
        and param.is_contiguous()
        and grad is not None
        and not grad.is_sparse
        and grad.dtype == param.dtype
        and grad.device == param.device
        and grad.is_contiguous()
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
    tensor of ``param``'s shape on the CPU.
    """
    momentum = float(group.get("momentum", 0.0))
    weight_decay = float(group.get("weight_decay", 0.0))
    flags = 0
    buf = None
    if momentum != 0.0:
        flags |= _MOMENTUM
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = torch.empty_like(param, memory_format=torch.contiguous_format)
            state["momentum_buffer"] = buf
            flags |= _FIRST
        if group.get("nesterov", False):
            flags |= _NESTEROV
    if weight_decay != 0.0:
        flags |= _WEIGHT_DECAY
    if own is not None:
        flags |= _OWN
    p_ptr = param.data_ptr()
    # The scalars go in as C doubles and are rounded to the parameter's dtype inside, exactly
    # as PyTorch rounds a Python float ``alpha`` for a float32 tensor.
    _kernels()[param.dtype](
        p_ptr,
        grad.data_ptr(),
        p_ptr if buf is None else buf.data_ptr(),
        mask.data_ptr(),
        param.numel(),
        -float(group["lr"]),
        weight_decay,
        momentum,
        1.0 - float(group.get("dampening", 0.0)),
        p_ptr if own is None else own.data_ptr(),
        own_weight,
        flags,
    )


_MOMENTUM, _FIRST, _NESTEROV, _WEIGHT_DECAY, _OWN = 1, 2, 4, 8, 16
_KERNELS: dict[torch.dtype, Any] = {}


def _kernels() -> dict[torch.dtype, Any]:
    """The compiled loops by dtype, built on first use (Numba is imported only then).

    They are C callables (``numba.cfunc``) called through ctypes with the tensors' data
    pointers: a call costs about a microsecond, where a jitted function's dispatcher spends
    several checking a dozen arguments, which on a small model is as long as the loop itself.
    """
    if not _KERNELS:
        _KERNELS.update(_build_kernels())
    return _KERNELS


def _build_kernels() -> dict[torch.dtype, Any]:
    import ctypes

    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
        """a * b + c with one rounding (LLVM's llvm.fma: exact in software where no FMA unit)."""
        if not (isinstance(a, types.Float) and a == b == c):
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            ty = args[0].type
            fn = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty] * 3))
            return builder.call(fn, args)

        return a(a, b, c), codegen

    def build(nptype: Any, nbtype: Any) -> Any:
        ptr = types.CPointer(nbtype)
        sig = types.void(
            ptr, ptr, ptr, types.CPointer(types.uint8), types.int64,
            types.float64, types.float64, types.float64, types.float64,
            ptr, types.float64, types.int64,
        )  # fmt: skip

        def loop(
            p_ptr, g_ptr, b_ptr, keep_ptr, n, neg_lr_, wd_, momentum_, damp1_, o_ptr, w_, flags
        ):  # pragma: no cover - compiled
            p = numba.carray(p_ptr, n)
            g = numba.carray(g_ptr, n)
            buf = numba.carray(b_ptr, n)
            keep = numba.carray(keep_ptr, n)
            own = numba.carray(o_ptr, n)
            neg_lr, wd, momentum = nptype(neg_lr_), nptype(wd_), nptype(momentum_)
            damp1, zero = nptype(damp1_), nptype(0.0)
            has_momentum, first = (flags & 1) != 0, (flags & 2) != 0
            nesterov, has_wd, has_own = (flags & 4) != 0, (flags & 8) != 0, (flags & 16) != 0
            # torch.lerp(own, grad, w): own + w * (grad - own) as one fused multiply-add for
            # w < 0.5, else grad + (w - 1) * (grad - own), with w rounded to the dtype first.
            w = nptype(w_)
            small_w = abs(w) < nptype(0.5)
            w_coeff = w if small_w else w - nptype(1.0)
            for i in range(n):
                d = g[i]
                if has_own:
                    o = own[i]
                    own[i] = fma(w_coeff, d - o, o if small_w else d)
                if has_wd:  # grad.add(param, alpha=weight_decay)
                    d = fma(p[i], wd, d)
                if has_momentum:
                    if first:  # buf = grad.clone()
                        b = d
                    else:  # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                        b = fma(d, damp1, buf[i] * momentum)
                    buf[i] = b
                    d = fma(b, momentum, d) if nesterov else b  # grad.add(buf, alpha=momentum)
                # param.add_(grad, alpha=-lr), then +0 outside the mask
                p[i] = fma(d, neg_lr, p[i]) if keep[i] else zero

        try:
            compiled = numba.cfunc(sig, nopython=True, cache=True)(loop)
        except RuntimeError:  # Numba found no writable cache location
            compiled = numba.cfunc(sig, nopython=True, cache=False)(loop)
        fn = compiled.ctypes
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_double] * 4
        fn.argtypes += [ctypes.c_void_p, ctypes.c_double, ctypes.c_int64]
        return fn

    return {
        torch.float32: build(np.float32, types.float32),
        torch.float64: build(np.float64, types.float64),
    }
