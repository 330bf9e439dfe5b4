"""The compiled loop of :mod:`sparsecore.torch.fused_step`, one C callable per float dtype.

Imported only when a fused step first runs, so ``import sparsecore.torch`` does not load Numba.
The loop is one module-level function compiled for float32 and for float64 (``numba.cfunc``,
cached on disk where a cache directory is writable); its scalars arrive already in the
parameter's dtype (ctypes rounds a Python float to a C float exactly as PyTorch rounds a scalar
for a float32 tensor), so the loop itself never converts.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numba
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

MOMENTUM, FIRST, NESTEROV, WEIGHT_DECAY, OWN, SMALL_OWN_WEIGHT = 1, 2, 4, 8, 16, 32


@intrinsic
def _fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """a * b + c with one rounding (LLVM's llvm.fma: exact in software where no FMA unit)."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty] * 3))
        return builder.call(fn, args)

    return a(a, b, c), codegen


def _loop(
    p_ptr, g_ptr, b_ptr, keep_ptr, n, neg_lr, wd, momentum, damp1, o_ptr, own_coeff, flags
):  # pragma: no cover - compiled
    """One SGD step (PyTorch's roundings and order) of ``n`` weights, +0 outside the mask.

    ``own_coeff``: ``w`` or ``w - 1`` of ``torch.lerp(own, grad, w)`` (``SMALL_OWN_WEIGHT`` set
    when ``|w| < 0.5``): ``own + w * (grad - own)`` or ``grad + (w - 1) * (grad - own)``, each
    one fused multiply-add, as PyTorch's CPU lerp computes it.
    """
    p = numba.carray(p_ptr, n)
    g = numba.carray(g_ptr, n)
    buf = numba.carray(b_ptr, n)
    keep = numba.carray(keep_ptr, n)
    own = numba.carray(o_ptr, n)
    zero = neg_lr - neg_lr  # +0.0 in the parameter's dtype (the learning rate is finite)
    has_momentum, first = (flags & MOMENTUM) != 0, (flags & FIRST) != 0
    nesterov, has_wd = (flags & NESTEROV) != 0, (flags & WEIGHT_DECAY) != 0
    has_own, small_w = (flags & OWN) != 0, (flags & SMALL_OWN_WEIGHT) != 0
    for i in range(n):
        d = g[i]
        if has_own:
            o = own[i]
            own[i] = _fma(own_coeff, d - o, o if small_w else d)
        if has_wd:  # grad.add(param, alpha=weight_decay)
            d = _fma(p[i], wd, d)
        if has_momentum:
            if first:  # buf = grad.clone()
                b = d
            else:  # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                b = _fma(d, damp1, buf[i] * momentum)
            buf[i] = b
            d = _fma(b, momentum, d) if nesterov else b  # grad.add(buf, alpha=momentum)
        # param.add_(grad, alpha=-lr), then +0 outside the mask
        p[i] = _fma(d, neg_lr, p[i]) if keep[i] else zero


def _compile(float_type: Any, c_float: Any) -> Any:
    ptr = types.CPointer(float_type)
    f = float_type
    sig = types.void(
        ptr, ptr, ptr, types.CPointer(types.uint8), types.int64, f, f, f, f, ptr, f, types.int64
    )
    try:
        compiled = numba.cfunc(sig, nopython=True, cache=True)(_loop)
    except RuntimeError:  # Numba found no writable cache location
        compiled = numba.cfunc(sig, nopython=True, cache=False)(_loop)
    fn = compiled.ctypes
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [c_float] * 4
    fn.argtypes += [ctypes.c_void_p, c_float, ctypes.c_int64]
    return fn


#: The callables: (param, grad, buf, mask pointers, n, -lr, weight_decay, momentum,
#: 1 - dampening, own pointer, own coefficient, flags).
MASKED_SGD_FLOAT32 = _compile(types.float32, ctypes.c_float)
MASKED_SGD_FLOAT64 = _compile(types.float64, ctypes.c_double)
